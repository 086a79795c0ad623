"""Tests of dqn_maze.py: the maze MDP, the Bellman math derived by hand, the replay buffer, the
target network, malformed maze files, and a short run of the script.

The 2×3 maze of the notes (section 2.2), as laid out in dqn_maze.py, with (row, column) cells:

    S(0,0)  .(0,1)  .(0,2)         G: +10 and the episode ends
    .(1,0)  T(1,1)  G(1,2)         T: −10 and the episode ends; every other move: 0

Actions are 0 up, 1 down, 2 left, 3 right; a move into an edge or a wall leaves the agent in place.
"""

from __future__ import annotations

import copy
import doctest
import json

import numpy as np
import pytest
import torch

import dqn_maze as D
from common import UsageError

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
GAMMA = 0.9


def maze_2x3(max_episode_steps: int = 100) -> D.Maze:
    return D.Maze(D.MAZES["2x3"], max_episode_steps)


def s(row: int, col: int, width: int = 3) -> int:
    """State index of a cell: s = row·W + column."""
    return row * width + col


#####  the environment ############################################################################


def test_transitions_edges_walls_goal_and_trap():
    m = maze_2x3()
    assert m.reset() == s(0, 0)
    # The top edge and the left edge keep the agent at S, with reward 0 and no end.
    assert m.step(UP) == (s(0, 0), 0.0, False, False)
    assert m.step(LEFT) == (s(0, 0), 0.0, False, False)
    assert m.step(RIGHT) == (s(0, 1), 0.0, False, False)
    # Down from (0,1) enters the trap: −10, terminal.
    assert m.step(DOWN) == (s(1, 1), -10.0, True, False)
    # From (0,2), down enters the goal: +10, terminal.
    m.reset()
    m.step(RIGHT), m.step(RIGHT)
    assert m.step(DOWN) == (s(1, 2), 10.0, True, False)
    # A wall '#' also blocks: in "S#." / "..G", right from S stays at S.
    w = D.Maze(["S#.", "..G"], 100)
    w.reset()
    assert w.step(RIGHT) == (s(0, 0), 0.0, False, False)
    assert w.step(DOWN) == (s(1, 0), 0.0, False, False)


def test_step_limit_truncates_without_terminating():
    # Three bumps into the top edge with a limit of 3: the third step is truncated, not terminal,
    # so the learner must still bootstrap from s' (done = 0 in the target).
    m = maze_2x3(max_episode_steps=3)
    m.reset()
    assert m.step(UP)[2:] == (False, False)
    assert m.step(UP)[2:] == (False, False)
    assert m.step(UP)[2:] == (False, True)


def test_reachable_states_exclude_walls_and_terminals():
    # 2×3: the four non-terminal cells are reachable; G and T end the episode.
    assert maze_2x3().reachable.tolist() == [s(0, 0), s(0, 1), s(0, 2), s(1, 0)]
    # In "S#." / "..G" the cell (0,2) can only be entered from the goal (1,2), where the episode
    # has already ended, so it is not reachable.
    assert D.Maze(["S#.", "..G"], 100).reachable.tolist() == [s(0, 0), s(1, 0), s(1, 1)]


#####  the math ###################################################################################


def test_td_target_by_hand():
    # Non-terminal: y = r + γ (1 − done) max_a' Q(s', a') = 1 + 0.9 · 1 · 5 = 5.5
    assert D.td_target(1.0, 5.0, False, GAMMA) == pytest.approx(5.5)
    # Terminal: the future is cut off, y = r = 10 (next_q = 5 is ignored).
    assert D.td_target(10.0, 5.0, True, GAMMA) == pytest.approx(10.0)
    # The same two as a torch batch, with done as a float as the replay buffer stores it.
    reward, next_q, done = torch.tensor([1.0, 10.0]), torch.tensor([5.0, 5.0]), torch.tensor([0.0, 1.0])
    y = D.td_target(reward, next_q, done, GAMMA)
    assert torch.allclose(y, torch.tensor([5.5, 10.0]))


def test_docstring_examples_are_true():
    # td_target's docstring shows two worked examples; doctest runs them.
    assert doctest.testmod(D).failed == 0


def test_double_dqn_next_q_by_hand():
    # Online Q(s', ·) = [[1, 3], [2, 0]] picks a* = [1, 0]; the target network scores them:
    # target Q(s', ·) = [[10, 20], [30, 40]] -> [20, 30]. Plain DQN would take max = [20, 40].
    online = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    target = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    assert D.double_dqn_next_q(online, target).tolist() == [20.0, 30.0]
    assert target.max(dim=-1).values.tolist() == [20.0, 40.0]


def test_value_iteration_2x3_matches_hand_derivation():
    # V* backwards from the goal, γ = 0.9 (a bump keeps s, so its value is γ V*(s)):
    #   V*(0,2) = 10                (down into G)
    #   V*(0,1) = 0.9 · 10  = 9     (right)
    #   V*(0,0) = 0.9 · 9   = 8.1   (right)
    #   V*(1,0) = 0.9 · 8.1 = 7.29  (up; right is the trap)
    # Q*(s, a) = r + γ V*(s'):            up      down     left     right
    #   (0,0): bump, to (1,0), bump, (0,1)   7.29    6.561    7.29     8.1
    #   (0,1): bump, trap, (0,0), (0,2)      8.1     −10      7.29     9
    #   (0,2): bump, goal, (0,1), bump       9       10       8.1      9
    #   (1,0): (0,0), bump, bump, trap       7.29    6.561    6.561    −10
    m = maze_2x3()
    q_star = D.value_iteration(m.next_state, m.reward, m.done, GAMMA)
    expected = {s(0, 0): [7.29, 6.561, 7.29, 8.1],
                s(0, 1): [8.1, -10.0, 7.29, 9.0],
                s(0, 2): [9.0, 10.0, 8.1, 9.0],
                s(1, 0): [7.29, 6.561, 6.561, -10.0]}
    for state, row in expected.items():
        np.testing.assert_allclose(q_star[state], row, atol=1e-8)


def test_the_maze_pays_on_the_move_so_v_star_is_one_gamma_above_the_notes_literal_return():
    # Notes 002 §2.1 write R(τ) = Σ_t γ^t r_{s_t}, a reward per *state*, counted from s_0. The Maze
    # pays r(s, a) on the *move* into G, at the step that enters it. On the optimal path
    # S -> (0,1) -> (0,2) -> G (states s_0 .. s_3):
    #   the code:           r_0 = r_1 = 0, r_2 = 10 (the move into G):  R = γ² · 10 = 8.1
    #   the literal notes:  r_{s_0} = r_{s_1} = r_{s_2} = 0, r_{s_3} = 10:  R = γ³ · 10 = 7.29
    # Every reward here ends an episode, so the two differ by one factor γ on every path, and the
    # optimal policy is the same.
    m = maze_2x3()
    q_star = D.value_iteration(m.next_state, m.reward, m.done, GAMMA)
    assert q_star[m.start].max() == pytest.approx(8.1, abs=1e-9)
    m.reset()
    rewards = [m.step(a)[1] for a in (RIGHT, RIGHT, DOWN)]
    assert rewards == [0.0, 0.0, 10.0]
    assert sum(GAMMA ** t * r for t, r in enumerate(rewards)) == pytest.approx(8.1)  # Σ_t γ^t r(s_t, a_t)
    # the literal reading: a reward per cell, V(s) = r_s at G and T, else r_s + γ max_a V(next(s, a))
    r_state = np.array([D.REWARDS.get(m.cell(c), 0.0) for c in range(m.n_states)])  # [S]
    terminal = np.array([m.cell(c) in "GT" for c in range(m.n_states)])  # [S]
    v = np.zeros(m.n_states)
    for _ in range(200):
        v = np.where(terminal, r_state, r_state + GAMMA * v[m.next_state].max(axis=1))  # [S]
    assert v[m.start] == pytest.approx(7.29, abs=1e-9)  # γ³ · 10
    # in every reachable state, the literal Q(s, a) = r_s + γ V(next(s, a)) = γ Q*(s, a): one γ apart,
    # and so the same greedy moves
    for c in m.reachable:
        np.testing.assert_allclose(r_state[c] + GAMMA * v[m.next_state[c]], GAMMA * q_star[c], atol=1e-9)


def test_linear_epsilon():
    # ε = end + (start − end)·max(0, 1 − t/T): 1 at t = 0, halfway 1 − 0.95/2 = 0.525, then 0.05.
    assert D.linear_epsilon(0, 1.0, 0.05, 100) == pytest.approx(1.0)
    assert D.linear_epsilon(50, 1.0, 0.05, 100) == pytest.approx(0.525)
    assert D.linear_epsilon(100, 1.0, 0.05, 100) == pytest.approx(0.05)
    assert D.linear_epsilon(500, 1.0, 0.05, 100) == pytest.approx(0.05)


class ScriptedRng:
    """Stands in for np.random.Generator: `random()` and `integers(n)` return the scripted draws."""

    def __init__(self, uniforms, ints):
        self.uniforms, self.ints, self.ranges = list(uniforms), list(ints), []

    def random(self):
        return self.uniforms.pop(0)

    def integers(self, n):
        self.ranges.append(n)
        return self.ints.pop(0)


def test_epsilon_greedy_by_hand():
    # Notes 002 §3.1: with probability ε a uniform action, else argmax_a Q(s, a), ties broken at random.
    # Q(s, ·) = (0, 5, 3, 1), ε = 0.25:
    #   u = 0.1 < ε: explore, a uniform draw over the 4 actions; the draw 2 gives action 2
    #   u = 0.9 ≥ ε: exploit, the one greedy action 1 (a draw over 1 candidate)
    q = np.array([0.0, 5.0, 3.0, 1.0])
    rng = ScriptedRng([0.1, 0.9], [2, 0])
    assert D.epsilon_greedy(q, 0.25, rng) == 2 and D.epsilon_greedy(q, 0.25, rng) == 1
    assert rng.ranges == [4, 1]
    # a tie, Q = (0, 3, 3, 1): exploiting draws among the two greedy actions 1 and 2
    q = np.array([0.0, 3.0, 3.0, 1.0])
    rng = ScriptedRng([0.9, 0.9], [0, 1])
    assert [D.epsilon_greedy(q, 0.25, rng), D.epsilon_greedy(q, 0.25, rng)] == [1, 2]
    assert rng.ranges == [2, 2]
    # so π(a|s) = ε/|A| + (1 − ε) · 1[a greedy] / #greedy = (0.0625, 0.4375, 0.4375, 0.0625); in
    # 40,000 draws each frequency is within 0.01 of it (4 standard deviations: √(0.4375 · 0.5625 / 40000) = 0.0025)
    gen = np.random.default_rng(0)
    counts = np.bincount([D.epsilon_greedy(q, 0.25, gen) for _ in range(40_000)], minlength=4)
    np.testing.assert_allclose(counts / 40_000, [0.0625, 0.4375, 0.4375, 0.0625], atol=0.01)


def test_tabular_update_by_hand_at_the_notes_alpha_1_and_at_alpha_0_5(monkeypatch):
    # Three episodes along the optimal path, the actions scripted (right, right, down; ε-greedy is
    # replaced), from Q = 0, γ = 0.9. The update Q(s,a) ← Q(s,a) + α [r + γ (1 − done) max_a' Q(s',a') − Q(s,a)]:
    #   α = 1, the notes' Q(s,a) = r + γ max_a' Q(s',a'): the goal's value moves back one cell per episode
    #     episode 1:  Q(S,→) = 0 + 0.9·0 = 0    Q((0,1),→) = 0            Q((0,2),↓) = 10
    #     episode 2:  Q(S,→) = 0                Q((0,1),→) = 0.9·10 = 9   Q((0,2),↓) = 10
    #     episode 3:  Q(S,→) = 0.9·9 = 8.1      Q((0,1),→) = 9            Q((0,2),↓) = 10   (= Q* on the path)
    #   α = 0.5:
    #     episode 1:  0                         0                              5
    #     episode 2:  0                         0.5·(0.9·5) = 2.25             5 + 0.5·(10 − 5) = 7.5
    #     episode 3:  0.5·(0.9·2.25) = 1.0125   2.25 + 0.5·(0.9·7.5 − 2.25) = 4.5   7.5 + 0.5·2.5 = 8.75
    script = [RIGHT, RIGHT, DOWN] * 3
    m = maze_2x3()
    q_star = D.value_iteration(m.next_state, m.reward, m.done, GAMMA)
    for alpha, expected in ((1.0, (8.1, 9.0, 10.0)), (0.5, (1.0125, 4.5, 8.75))):
        actions = iter(script)
        monkeypatch.setattr(D, "epsilon_greedy", lambda q_s, eps, rng: next(actions))
        args = D.Args(tabular_steps=len(script), q_lr=alpha, gamma=GAMMA)
        q = D.tabular_q_learning(m, args, np.random.default_rng(0),
                                 D.Tracker("tabular", "tabular", m, q_star, args, args.tabular_steps))
        hand = np.zeros((m.n_states, m.n_actions))
        hand[s(0, 0), RIGHT], hand[s(0, 1), RIGHT], hand[s(0, 2), DOWN] = expected
        np.testing.assert_allclose(q, hand, atol=1e-12)


def test_evaluate_accepts_any_action_in_a_tie_of_q_star():
    # State 0: Q* ties up and down (two equally short paths); the greedy action `down` counts.
    # State 1: the greedy action `left` has Q* = 0 < V* = 2, so it is not optimal.
    q_star = np.array([[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    q = np.array([[0.5, 0.9, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    err, optimal = D.evaluate(q, q_star, np.array([0, 1]))
    assert optimal.tolist() == [True, False]
    assert err == pytest.approx(3.0)  # |3 − 0| at (state 1, left)


def test_tabular_q_learning_converges_to_q_star_on_2x3():
    m = maze_2x3()
    q_star = D.value_iteration(m.next_state, m.reward, m.done, GAMMA)
    args = D.Args(tabular_steps=10_000)
    tracker = D.Tracker("tabular", "tabular", m, q_star, args, args.tabular_steps)
    q = D.tabular_q_learning(m, args, np.random.default_rng(0), tracker)
    err, optimal = D.evaluate(q, q_star, m.reachable)
    assert err < 1e-3
    assert optimal.all()
    assert tracker.result()["steps_to_optimal"] is not None


@pytest.mark.parametrize("maze, steps", [("2x3", 2_000), ("6x6", 100_000)])
def test_tabular_q_learning_at_the_default_alpha_1_reaches_q_star_exactly(maze, steps):
    # The default α = 1 is the notes' assignment Q(s,a) = r + γ max_a' Q(s',a'). On a deterministic
    # maze, started at 0, every update writes an exact target as soon as Q(s', ·) is exact, so the
    # table ends equal to value iteration's Q* (to rounding), not near it as at α < 1.
    assert D.Args().q_lr == 1.0
    m = D.Maze(D.MAZES[maze], 100)
    q_star = D.value_iteration(m.next_state, m.reward, m.done, GAMMA)
    args = D.Args(maze=maze, tabular_steps=steps)
    tracker = D.Tracker("tabular", "tabular", m, q_star, args, args.tabular_steps)
    q = D.tabular_q_learning(m, args, np.random.default_rng([1, 0]), tracker)
    err, optimal = D.evaluate(q, q_star, m.reachable)
    assert err < 1e-12 and optimal.all()


#####  the replay buffer and the target network #################################################


def test_replay_buffer_evicts_the_oldest_when_full():
    buf = D.ReplayBuffer(capacity=3, obs_dim=2)
    for i in range(5):  # rewards 1..5 tell the entries apart
        buf.add(np.array([i, 0.0]), i % 2, float(i + 1), np.array([0.0, i]), i == 4)
    assert len(buf) == 3
    # 1 and 2 were overwritten by 4 and 5: slots hold [4, 5, 3], and slot 2 (reward 3) is next.
    assert buf.rewards.tolist() == [4.0, 5.0, 3.0]
    assert buf.pos == 2
    assert buf.dones.tolist() == [0.0, 1.0, 0.0]


def test_replay_buffer_at_least_as_large_as_the_run_keeps_every_transition():
    # Notes 002 §3.2: the replay data set is cumulative, every transition seen is kept. With capacity
    # ≥ the number of steps (the default --buffer-size 50,000 ≥ --dqn-steps 40,000) nothing is
    # overwritten, and a uniform draw reaches every transition, the oldest as often as the newest:
    # 50 transitions, 50,000 draws, each about 1,000 times (all within ±150, 5 standard deviations).
    buf = D.ReplayBuffer(capacity=50, obs_dim=2)
    for i in range(50):  # transition i: s = (i, 0), a = i % 4, r = i + 1, s' = (0, i), done on the last
        buf.add(np.array([i, 0.0]), i % 4, float(i + 1), np.array([0.0, i]), i == 49)
    assert len(buf) == 50 and buf.rewards.tolist() == [float(i + 1) for i in range(50)]
    obs, actions, rewards, next_obs, dones = buf.sample(50_000, np.random.default_rng(0))
    i = obs[:, 0].long()  # which transition each draw is   [B]
    torch.testing.assert_close(rewards, (i + 1).float())  # the fields of one transition stay together
    assert torch.equal(actions, i % 4) and torch.equal(next_obs[:, 1].long(), i)
    assert torch.equal(dones, (i == 49).float())
    counts = torch.bincount(i, minlength=50)
    assert counts.min() > 850 and counts.max() < 1150


def test_replay_buffer_samples_only_filled_slots():
    buf = D.ReplayBuffer(capacity=10, obs_dim=2)
    for i in range(3):  # slots 3..9 stay empty (reward 0); the filled ones have rewards 1, 2, 3
        buf.add(np.zeros(2), 0, float(i + 1), np.zeros(2), False)
    obs, actions, rewards, next_obs, dones = buf.sample(500, np.random.default_rng(0))
    assert obs.shape == (500, 2) and actions.shape == (500,) and dones.dtype == torch.float32
    assert set(rewards.tolist()) == {1.0, 2.0, 3.0}


def test_target_network_is_fixed_between_syncs_and_equal_after_one():
    torch.manual_seed(0)
    q_net = D.q_network(6, 4, 16)
    target_net = copy.deepcopy(q_net)
    frozen = copy.deepcopy(target_net.state_dict())
    opt = torch.optim.Adam(q_net.parameters(), lr=1e-2)
    obs = torch.eye(6)[torch.tensor([0, 1, 2, 3])]
    actions, next_obs = torch.tensor([3, 3, 1, 0]), torch.eye(6)[torch.tensor([1, 2, 5, 0])]
    rewards, dones = torch.tensor([0.0, 0.0, 10.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    for _ in range(5):  # five gradient steps, no sync
        with torch.no_grad():
            y = D.td_target(rewards, target_net(next_obs).max(dim=-1).values, dones, GAMMA)
        loss, metrics = D.dqn_loss(q_net(obs).gather(1, actions[:, None]).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[k]) for k, p in target_net.state_dict().items())
    assert not all(torch.equal(p, frozen[k]) for k, p in q_net.state_dict().items())
    D.update_target(target_net, q_net, tau=1.0)  # θ' ← θ
    assert all(torch.equal(p, q_net.state_dict()[k]) for k, p in target_net.state_dict().items())


def test_soft_update_by_hand():
    # θ' ← τ θ + (1 − τ) θ' with τ = 0.25: θ = 4, θ' = 0 -> 1.
    online, target = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    for p in online.parameters():
        p.data.fill_(4.0)
    for p in target.parameters():
        p.data.fill_(0.0)
    D.update_target(target, online, tau=0.25)
    assert all(torch.allclose(p, torch.ones_like(p)) for p in target.parameters())


def test_dqn_loss_mse_and_huber_by_hand():
    # δ = y − Q = [1, 3]; MSE = (1 + 9)/2 = 5; Huber = (0.5·1² + (3 − 0.5))/2 = (0.5 + 2.5)/2 = 1.5
    q, y = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0])
    assert D.dqn_loss(q, y, "mse")[0].item() == pytest.approx(5.0)
    assert D.dqn_loss(q, y, "huber")[0].item() == pytest.approx(1.5)


#####  malformed mazes ##########################################################################

BAD_MAZES = {
    "empty": ("\n", "the maze is empty"),
    "no_start": ("..G\n...\n", "no start 'S'"),
    "two_starts": ("S.G\nS..\n", ":2: a second start 'S' (the first is on line 1)"),
    "ragged": ("S..\n.G\n", ":2: ragged rows"),
    "unknown_char": ("S.x\n..G\n", ":1: unknown character 'x' in column 3"),
    "no_goal": ("S..\n...\n", "no goal 'G'"),
    "goal_walled_off": ("S#G\n.#.\n", "no goal 'G' can be reached"),
    "goal_behind_trap": ("STG\n", "no goal 'G' can be reached"),
}


@pytest.mark.parametrize("name", BAD_MAZES)
def test_malformed_maze_file_is_a_clear_error(tmp_path, name):
    text, message = BAD_MAZES[name]
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    rows, source = D.read_maze(str(path))
    with pytest.raises(UsageError) as e:
        D.Maze(rows, 100, source)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_unknown_maze_name_is_a_clear_error():
    with pytest.raises(UsageError, match="not a built-in maze"):
        D.read_maze("no_such_maze.txt")


def test_malformed_maze_via_cli_exits_2_with_one_line(tmp_path, run_script):
    bad = tmp_path / "bad.txt"
    bad.write_text("S..\n.G\n")
    out = tmp_path / "run"
    r = run_script("dqn_maze.py", "--maze", str(bad), "--out-dir", str(out), timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    expected = f"error: {bad}:2: ragged rows: this row has 2 cells, line 1 has 3"
    assert r.stderr.strip().splitlines() == [expected]
    assert not out.exists()  # the maze is checked before a run folder is made


#####  a short run of the script ##################################################################


def test_short_run_writes_metrics_summary_and_weights(tmp_path, run_script):
    maze = tmp_path / "maze.txt"
    maze.write_text("S.#\n..T\n#.G\n")
    out = tmp_path / "run"
    r = run_script("dqn_maze.py", "--maze", str(maze), "--out-dir", str(out), "--tabular-steps", "300",
                   "--dqn-steps", "300", "--learning-starts", "64", "--batch-size", "16",
                   "--eval-every", "50", "--log-lines", "3", "--show-every", "150", "--double-dqn",
                   "--loss", "huber", "--device", "cpu", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "greedy" in r.stdout and "V*(s)" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dqn_rows = [row for row in rows if "dqn/max_q_error" in row]
    assert [row["step"] for row in dqn_rows] == [0, 100, 200, 300]  # step 0 is the "before"
    expected_keys = {"dqn/optimal_everywhere", "dqn/episodic_return", "dqn/epsilon", "losses/td_loss"}
    assert expected_keys <= set(dqn_rows[-1])
    assert any("tabular/max_q_error" in row for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    for learner in ("tabular", "dqn"):
        keys = {"max_q_error", "optimal_everywhere", "env_steps", "steps_to_optimal", "wall_seconds"}
        assert keys <= set(summary[learner])
        assert summary[learner]["env_steps"] == 300
    assert summary["config"]["double_dqn"] is True
    net = D.q_network(9, 4, summary["config"]["hidden"])
    net.load_state_dict(torch.load(out / "q_network.pt"))
