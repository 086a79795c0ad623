"""Q-learning and Deep Q-learning on the notes' maze, each checked against the exact Q*.

Notes 002, section 2.2 (the maze as an MDP) and section 3 (3.1 Q-learning, 3.2 Deep Q-learning).
A maze is small enough that the true answer is known, so this script computes it first and then
measures two learners against it:

    value iteration     the exact Q*, from the transition table (the limit both learners chase)
    tabular Q-learning  the notes' Q-table: all zeros at the start, ε-greedy, one update per step
    DQN                 a Q network over one-hot states, a replay buffer and a target network

The default maze is a 2×3 grid like the notes' example: +10 for entering the goal G, −10 for the
trap T, 0 for every other move (bumping into an edge or a wall `#` leaves the agent where it is).
From the notes (2.2): the size, the rewards, one-hot states, the four moves, walls that block.
Ours (the notes' figure is not in their text): where S, T and G sit, that G and T end the episode,
and γ = 0.9, with which a shorter path is worth more. The trap sits on two of the three
shortest-looking routes, so only one path is both short and safe (V* and Q* are derived by hand
in tests/test_dqn_maze.py):

        col 0   col 1   col 2           optimal policy       V*(s)
      +-------+-------+-------+
row 0 |   S   |       |       |           >   >   v        8.1    9.0   10.0
      +-------+-------+-------+
row 1 |       |   T   |   G   |           ^   T   G        7.29    T      G
      +-------+-------+-------+

When the reward is paid. Notes 2.1 write R(τ) = Σ_t γ^t r_{s_t}, a reward per state counted from
s_0; the Maze pays r(s, a) on the move into a cell, at the step that enters it, as the notes' own
3.1 has it ("r_t is the reward received after taking action a_t at state s_t"). Read literally, the
notes' return of the path above is γ³·10 = 7.29 from S; the code's V*(S) is γ²·10 = 8.1. Every
reward here ends the episode, so the two differ by one factor γ in every state and share the optimal
policy (tests/test_dqn_maze.py computes both).

Pseudocode (N is --tabular-steps or --dqn-steps):

    Q* ← value iteration: Q(s,a) ← r + γ (1 − done) max_a' Q(s',a') until it stops changing
    tabular (3.1):  Q ← 0
        for t = 1..N:  a ← ε-greedy(Q(s,·));  s', r, done ← step(a)
            Q(s,a) ← Q(s,a) + α [r + γ (1 − done) max_a' Q(s',a') − Q(s,a)]
            (the notes' 3.1 rule is the assignment Q(s,a) = r + γ max_a' Q(s',a'), i.e. α = 1;
             the step size α < 1 is Watkins' Q-learning, not the notes)
    DQN (3.2):  θ random;  θ' ← θ;  D ← empty replay buffer
        for t = 1..N:  a ← ε-greedy(Q_θ(onehot(s),·));  s', r, done ← step(a)
            store (s, a, r, s', done) in D
            every k steps:  sample a batch B from D
                y ← r + γ (1 − done) max_a' Q_θ'(s',a')
                    (Double DQN: Q_θ'(s', argmax_a' Q_θ(s',a')) instead of the max)
                θ ← θ − lr ∇_θ mean_B (y − Q_θ(s,a))²
            every C updates:  θ' ← τ θ + (1 − τ) θ'      (τ = 1 is the notes' plain copy)
    report max |Q − Q*| and whether argmax_a Q(s,a) is Q*-optimal in every reachable state

Policy gradients on the same maze (notes 002 §4): the section "exact policy evaluation" below
computes V^π, Q^π and A^π of any tabular policy π(a|s) = softmax(z[s])_a by a linear solve, and
the discounted state visitation, in torch so that J = V^π(start) can be differentiated;
tests/test_pg_forms.py uses them to check, by exact enumeration, that Ψ = R(τ), G_t, G_t − b(s_t),
Q^π and A^π all give the same expected policy gradient ∇J (the "alternative forms" of note 000).

"done" is 1 only when s' is the goal or a trap. An episode cut by the step limit is not done: its
s' still has a future, so the target bootstraps from it.

Run it (the run folder gets metrics.jsonl, summary.json and the Q network's q_network.pt):

    python dqn_maze.py                        # the notes' 2×3 maze
    python dqn_maze.py --maze 6x6             # the larger built-in maze (MAZES below)
    python dqn_maze.py --maze my_maze.txt     # rows of S start, G goal, T trap, # wall, . free
    python dqn_maze.py --double-dqn --loss huber --tau 0.01 --target-update-every 1 --show-every 5000
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError, check
from harness import (RunLogger, default_run_dir, main, pick_device, prepare_run_dir, seed_everything,
                     set_threads)


@dataclass
class Args:
    maze: str = "2x3"
    """`2x3` (the size and rewards of the notes' example; the positions are ours), `6x6` (walls,
    four traps), or a text file with one row per line and one character per cell: S start, G goal,
    T trap, # wall, . free"""
    seed: int = 1
    """seed of Python, numpy and torch: network init, ε-greedy draws, replay sampling"""
    gamma: float = 0.9
    """γ, the discount in R(τ) = Σ_t γ^t r_t (notes 2.1); below 1, so a shorter path is worth more;
    0.8 to 0.99"""
    max_episode_steps: int = 100
    """step limit of an episode; it truncates the episode, but s' is not terminal: the target still
    bootstraps from it"""
    tabular_steps: int = 300_000
    """N of tabular Q-learning, in environment steps. A step is cheap but updates one Q(s,a) once,
    so rarely visited states need many steps (on 6x6, 200k were enough in 2 of 5 seeds, 300k in 5)"""
    dqn_steps: int = 40_000
    """N of DQN, in environment steps. Replay reuses each transition many times, so DQN needs far
    fewer steps than the table, but every k-th step costs a gradient step"""
    eps_start: float = 1.0
    """ε of the ε-greedy policy (notes 3.1) at step 0"""
    eps_end: float = 0.05
    """ε at the end of the linear decay, and after it"""
    exploration_fraction: float = 0.5
    """fraction of each learner's N over which ε decays linearly from --eps-start to --eps-end"""
    q_lr: float = 1.0
    """α, the step size of the tabular update Q ← Q + α [y − Q], in (0, 1]. 1 is the notes' 3.1 rule,
    the plain assignment Q(s_t, a_t) = r_t + γ max_a Q(s_{t+1}, a): on a deterministic maze each
    target is exact once Q(s', ·) is, and the table reaches Q* exactly (2x3 and 6x6, seeds 1–3: max
    |Q − Q*| = 0, 6x6 optimal after 11–12k steps against 13–24k at α = 0.5). α < 1 is the step size of
    Watkins' Q-learning (Sutton & Barto 6.5), which averages the targets when rewards or moves are
    random, and approaches Q* only geometrically (at 0.5, |Q − Q*| ≤ 5e-4 after 300k steps)"""
    learning_rate: float = 5e-4
    """Adam learning rate of the Q network; 1e-4 to 1e-3 (with 1e-3 and B = 64 the values of rarely
    visited states kept drifting, by up to 0.5)"""
    hidden: int = 64
    """width of the two hidden layers of the Q network"""
    buffer_size: int = 50_000
    """capacity of the replay buffer D; at least --dqn-steps keeps every transition, as the notes'
    cumulative buffer does; a smaller one drops the oldest"""
    batch_size: int = 256
    """B, transitions sampled from D per gradient step; 64 to 512 (a larger batch replays the rare
    transitions more often)"""
    learning_starts: int = 1_000
    """environment steps of ε-greedy play before the first gradient step"""
    train_every: int = 4
    """k, environment steps per gradient step; 1 to 4 (4 as in Mnih et al. 2015; with 2, DQN was
    optimal on 6x6 after fewer steps, 6-8k instead of 11-16k, for twice the gradient steps)"""
    target_update_every: int = 100
    """C, gradient steps between target updates θ' ← τθ + (1 − τ)θ' (notes 3.2: "every several
    iterations")"""
    tau: float = 1.0
    """τ of the target update: 1 is the notes' copy; e.g. 0.005 with --target-update-every 1 is the
    mean teacher's moving average"""
    loss: Literal["mse", "huber"] = "mse"
    """loss on the TD error δ = y − Q_θ(s,a): `mse` as in the notes, or `huber` (linear for |δ| > 1)"""
    double_dqn: bool = False
    """Double DQN: the online network picks argmax_a' and the target network scores it"""
    eval_every: int = 100
    """steps between measurements of max |Q − Q*| and greedy optimality (the resolution of
    steps_to_optimal)"""
    log_lines: int = 15
    """about this many log lines (and rows of metrics.jsonl) per learner"""
    show_every: int = 0
    """print the maze with greedy arrows, and max_a Q beside V*, every this many steps; 0: only at
    the end"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N for the Q network; default: CUDA when present (the CPU is fine here)"""
    threads: Optional[int] = None
    """torch's CPU threads; default: 1 for a model under 20M parameters, whose operations are too small
    to split (the threads only wait for each other, and for the cores when anything else runs), else
    torch's own choice (every core); recorded in summary.json; no effect on a GPU"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and q_network.pt; default:
    runs/dqn_maze__s<seed>__<time>"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""


#####  the maze (notes 2.2) #######################################################################

MAZES = {
    "2x3": ["S..",
            ".TG"],
    "6x6": ["S..#..",
            ".#.T..",
            ".#...#",
            ".T##.T",
            "...#..",
            "#T...G"],
}
MOVES = [(-1, 0), (1, 0), (0, -1), (0, 1)]  # actions: up, down, left, right, as (row, column) steps
ARROWS = "^v<>"
REWARDS = {"G": 10.0, "T": -10.0}  # notes 2.2: +10 at the goal, −10 at the trap, 0 elsewhere


def read_maze(spec: str) -> tuple[list[str], str]:
    """`--maze` -> (rows, source): a built-in name, or a text file with trailing blanks stripped."""
    if spec in MAZES:
        return MAZES[spec], spec
    path = Path(spec)
    check(path.is_file(), f"--maze {spec}: not a built-in maze ({', '.join(MAZES)}) and no such file")
    return [line.rstrip() for line in path.read_text().rstrip().splitlines()], str(path)


class Maze:
    """The notes' maze MDP. State s = row·W + column, one per cell; the network sees onehot(s).

    The transition function T(s'|s,a) is deterministic, so it is stored as three [S, A] tables:
    `next_state`, `reward` and `done` (1 when s' is a goal or a trap). A malformed maze raises a
    UsageError that names `source:line` and says why.
    """

    def __init__(self, rows: list[str], max_episode_steps: int, source: str = "maze"):
        check(len(rows) > 0 and len(rows[0]) > 0, f"{source}: the maze is empty")
        self.H, self.W = len(rows), len(rows[0])
        starts = []
        for i, row in enumerate(rows):
            check(len(row) == self.W, f"{source}:{i + 1}: ragged rows: this row has {len(row)} cells, "
                                      f"line 1 has {self.W}")
            for j, ch in enumerate(row):
                check(ch in "SGT#.", f"{source}:{i + 1}: unknown character {ch!r} in column {j + 1} "
                                     "(use S start, G goal, T trap, # wall, . free)")
                if ch == "S" and starts:
                    raise UsageError(f"{source}:{i + 1}: a second start 'S' (the first is on line "
                                     f"{starts[0][0] + 1}); a maze has one start")
                starts += [(i, j)] if ch == "S" else []
        check(starts, f"{source}: no start 'S'")
        check(any("G" in row for row in rows), f"{source}: no goal 'G'")
        self.rows, self.max_episode_steps = rows, max_episode_steps
        self.n_states, self.n_actions = self.H * self.W, len(MOVES)
        self.start = starts[0][0] * self.W + starts[0][1]
        shape = (self.n_states, self.n_actions)
        self.next_state = np.zeros(shape, dtype=np.int64)  # s'  [S, A]
        self.reward = np.zeros(shape)                      # r   [S, A]
        self.done = np.zeros(shape, dtype=bool)            # s' is G or T  [S, A]
        for s in range(self.n_states):
            for a, (di, dj) in enumerate(MOVES):
                i, j = s // self.W + di, s % self.W + dj
                if not (0 <= i < self.H and 0 <= j < self.W) or rows[i][j] == "#":
                    i, j = s // self.W, s % self.W  # an edge or a wall: the agent stays put
                self.next_state[s, a] = i * self.W + j
                self.reward[s, a] = REWARDS.get(rows[i][j], 0.0)
                self.done[s, a] = rows[i][j] in "GT"
        # reachable non-terminal states, by breadth-first search from S (an episode stops at G and T)
        self.reachable, frontier, goal_reached = [self.start], deque([self.start]), False
        while frontier:
            s = frontier.popleft()
            for a in range(self.n_actions):
                s2 = self.next_state[s, a]
                goal_reached |= self.cell(s2) == "G"
                if not self.done[s, a] and s2 not in self.reachable:
                    self.reachable.append(s2)
                    frontier.append(s2)
        check(goal_reached, f"{source}: no goal 'G' can be reached from the start without "
                            "passing a wall or a trap")
        self.reachable = np.array(sorted(self.reachable))

    def cell(self, s: int) -> str:
        return self.rows[s // self.W][s % self.W]

    def reset(self) -> int:
        self.s, self.t = self.start, 0
        return self.s

    def step(self, a: int) -> tuple[int, float, bool, bool]:
        """-> s', r, terminated (s' is G or T), truncated (the step limit cut the episode)."""
        s, self.t = self.s, self.t + 1
        self.s = int(self.next_state[s, a])
        done = bool(self.done[s, a])
        return self.s, float(self.reward[s, a]), done, (not done and self.t >= self.max_episode_steps)


#####  the math: Bellman targets, value iteration, loss #########################################


def td_target(reward, next_q, done, gamma: float):
    """The Bellman target of notes 3.1, y = r + γ (1 − done) max_a' Q(s', a'), max already taken.

    `next_q` is Q(s', a*) for the action a* that the target picks ([B]; for plain DQN
    a* = argmax_a' Q_θ'(s', a')). `done` is 1 when s' is terminal (goal or trap) and 0 otherwise,
    also when the step limit cut the episode, because that s' still has a future. Works on floats,
    numpy arrays and torch tensors (for torch, pass `done` as a float).

    >>> td_target(0.0, 10.0, 0.0, 0.9)  # one step before a state worth 10
    9.0
    >>> td_target(10.0, 5.0, 1.0, 0.9)  # s' is the goal: nothing after it counts
    10.0
    """
    return reward + gamma * (1.0 - done) * next_q  # y = r + γ (1 − done) max_a' Q(s', a')


def double_dqn_next_q(online_next_q: torch.Tensor, target_next_q: torch.Tensor) -> torch.Tensor:
    """Double DQN (van Hasselt et al. 2016): Q_θ'(s', argmax_a' Q_θ(s', a')). [B, A], [B, A] -> [B].

    The max of one noisy estimate is biased upward; letting the online network choose and the
    target network score separates the two errors.
    """
    a_star = online_next_q.argmax(dim=-1, keepdim=True)  # argmax_a' Q_θ(s', a')  [B, 1]
    return target_next_q.gather(-1, a_star).squeeze(-1)  # Q_θ'(s', a*)  [B]


def value_iteration(next_state, reward, done, gamma: float, tol: float = 1e-10) -> np.ndarray:
    """The exact Q* [S, A] of a deterministic MDP given as [S, A] tables, by applying the Bellman
    optimality equation (notes 3.1) to every (s, a) at once until the largest change is below
    `tol`. It is a γ-contraction, so for γ < 1 the error shrinks by γ every sweep."""
    q = np.zeros(reward.shape)  # [S, A]
    for _ in range(100_000):
        # Q(s,a) ← r + γ (1 − done) max_a' Q(s',a') for every (s, a) at once
        new_q = td_target(reward, q.max(axis=1)[next_state], done, gamma)  # [S, A]
        if np.abs(new_q - q).max() < tol:
            return new_q
        q = new_q
    raise RuntimeError("value iteration did not converge")


def dqn_loss(q_taken: torch.Tensor, y: torch.Tensor, kind: str = "mse") -> tuple[torch.Tensor, dict]:
    """L(θ) = mean_B (y − Q_θ(s, a))² (notes 3.2, MSE), or its Huber version. q_taken, y: [B].
    `y` carries no gradient: it comes from the target network, which the notes hold fixed."""
    td_error = y - q_taken  # δ = y − Q_θ(s, a)  [B]
    loss = td_error.pow(2).mean() if kind == "mse" else F.smooth_l1_loss(q_taken, y)  # L(θ)
    return loss, {"losses/td_loss": loss.item(), "losses/q_values": q_taken.mean().item()}


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """θ' ← τ θ + (1 − τ) θ' (notes 3.2, the mean teacher's moving average); τ = 1 copies θ."""
    if tau == 1.0:
        target.load_state_dict(online.state_dict())
        return
    for p_target, p in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p, tau)  # θ' ← θ' + τ (θ − θ')


def linear_epsilon(step: int, start: float, end: float, duration: float) -> float:
    """ε falls linearly from `start` at step 0 to `end` at `duration`, then stays at `end`."""
    return end + (start - end) * max(0.0, 1.0 - step / duration)


def epsilon_greedy(q_s: np.ndarray, eps: float, rng: np.random.Generator) -> int:
    """A uniform action with probability ε, else argmax_a Q(s, a) with ties broken at random (with
    the notes' all-zero start, a plain argmax would pick `up` every time)."""
    if rng.random() < eps:
        return int(rng.integers(len(q_s)))
    best = np.flatnonzero(q_s == q_s.max())  # every greedy action
    return int(best[rng.integers(len(best))])


def evaluate(q: np.ndarray, q_star: np.ndarray, states: np.ndarray, tol: float = 1e-6):
    """-> max |Q − Q*| over the reachable (s, a), and per reachable s whether the greedy action is
    Q*-optimal: Q*(s, argmax_a Q(s,a)) ≥ V*(s) − tol. When Q* ties (two equally short paths),
    either choice counts as optimal. q, q_star: [S, A]."""
    q, q_star = q[states], q_star[states]  # [R, A]
    greedy = q.argmax(axis=1)  # [R]
    optimal = q_star[np.arange(len(states)), greedy] >= q_star.max(axis=1) - tol  # [R]
    return float(np.abs(q - q_star).max()), optimal


def render(maze: Maze, q: np.ndarray, q_star: np.ndarray) -> str:
    """The maze with the greedy action of each reachable cell as an arrow (`!` when it is not
    Q*-optimal), and max_a Q(s, a) beside V*(s) = max_a Q*(s, a)."""
    _, optimal = evaluate(q, q_star, maze.reachable)
    is_optimal = dict(zip(maze.reachable.tolist(), optimal))
    lines = [f"{'greedy':<{3 * maze.W + 4}}{'max_a Q(s,a)':<{7 * maze.W + 4}}V*(s)"]
    for i in range(maze.H):
        policy, values, v_star = "", "", ""
        for s in range(i * maze.W, (i + 1) * maze.W):
            if s in is_optimal:
                policy += f"{ARROWS[q[s].argmax()] + ('' if is_optimal[s] else '!'):>3}"
                values += f"{q[s].max():7.2f}"
                v_star += f"{q_star[s].max():7.2f}"
            else:  # a wall, a goal, a trap, or a cell the agent cannot reach
                policy += f"{maze.cell(s):>3}"
                values += f"{maze.cell(s):>7}"
                v_star += f"{maze.cell(s):>7}"
        lines.append(f"{policy}    {values}    {v_star}")
    return "\n".join(lines)


#####  exact policy evaluation: V^π, Q^π, A^π of a softmax policy (notes 002 §4.1, §4.4) ########
#
# For policy gradients (notes 002 §4) the maze is small enough to know every value exactly. A
# tabular policy is a table of logits z [S, A] with π(a|s) = softmax(z[s])_a. All functions are torch
# (so that J = V^π(start) can be differentiated by autograd) and take the Maze's [S, A] tables.
#   - discounted, infinite horizon (the notes' 4.1: "all of which assume the infinite-horizon
#     discounted return"): V^π solves the linear Bellman equation V = r_π + γ P_π V, i.e.
#     (I − γ P_π) V^π = r_π, one `torch.linalg.solve`  -> `policy_evaluation`
#   - finite horizon H (the notes' R(τ) = Σ_t γ^t r_t over a trajectory of at most H steps, which is
#     what can be enumerated): the values depend on the steps left h, V_0 = 0 and
#     Q_h(s,a) = r(s,a) + γ (1 − done) V_{h−1}(s'), V_h(s) = Σ_a π(a|s) Q_h(s,a), a block-triangular
#     linear system solved by back-substitution  -> `finite_horizon_evaluation`
# In both, A^π = Q^π − V^π (notes 4.1, the advantage). The values of a goal, trap or wall cell are
# computed but mean nothing: no episode is ever in one (entering G or T ends it).


def policy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """π(a|s) = softmax(z[s])_a, the tabular softmax policy.  z: [S, A] -> π: [S, A]"""
    return torch.softmax(z, dim=-1)  # [S, A]


def policy_transitions(next_state, done, pi: torch.Tensor) -> torch.Tensor:
    """P_π(s, s') = Σ_a π(a|s) (1 − done(s,a)) 1[s' = next(s,a)]: the probability that the episode
    goes on from s to s' in one step (rows sum to 1 − P(the episode ends now)).
    next_state, done: [S, A] tables; pi: [S, A].  -> [S, S]"""
    S, A = pi.shape
    nxt = torch.as_tensor(next_state, dtype=torch.long)  # [S, A]
    go_on = 1.0 - torch.as_tensor(done, dtype=pi.dtype)  # 1 − done   [S, A]
    P = torch.zeros(S, S, dtype=pi.dtype)  # [S, S]
    return P.index_put((torch.arange(S).repeat_interleave(A), nxt.reshape(-1)),
                       (pi * go_on).reshape(-1), accumulate=True)  # P_π   [S, S]


def policy_evaluation(next_state, reward, done, pi: torch.Tensor, gamma: float):
    """V^π, Q^π, A^π of the discounted infinite-horizon return (notes 002 §4.1), by a linear solve.

        r_π(s) = Σ_a π(a|s) r(s,a)                                   [S]
        (I − γ P_π) V^π = r_π                                        (the Bellman equation of π)
        Q^π(s,a) = r(s,a) + γ (1 − done(s,a)) V^π(next(s,a))         [S, A]
        A^π(s,a) = Q^π(s,a) − V^π(s)                                 [S, A]
    next_state, reward, done: the Maze's [S, A] tables; pi: [S, A] (rows sum to 1; autograd flows
    through it); 0 ≤ γ < 1 makes I − γ P_π invertible. -> (V [S], Q [S, A], A [S, A]).
    """
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma {gamma}: the infinite-horizon solve needs 0 ≤ γ < 1 "
                         "(use finite_horizon_evaluation for γ = 1)")
    r = torch.as_tensor(reward, dtype=pi.dtype)  # [S, A]
    go_on = 1.0 - torch.as_tensor(done, dtype=pi.dtype)  # [S, A]
    nxt = torch.as_tensor(next_state, dtype=torch.long)  # [S, A]
    P = policy_transitions(next_state, done, pi)  # [S, S]
    r_pi = (pi * r).sum(-1)  # r_π(s)   [S]
    V = torch.linalg.solve(torch.eye(len(r_pi), dtype=pi.dtype) - gamma * P, r_pi)  # V^π   [S]
    Q = r + gamma * go_on * V[nxt]  # Q^π(s,a) = r + γ (1 − done) V^π(s')   [S, A]
    return V, Q, Q - V[:, None]  # V [S], Q [S, A], A = Q − V [S, A]


def finite_horizon_evaluation(next_state, reward, done, pi: torch.Tensor, gamma: float, horizon: int):
    """V^π_h, Q^π_h, A^π_h of the return over the next h steps, for h = 0..horizon (γ = 1 allowed).

        V_0 = 0;   Q_h(s,a) = r(s,a) + γ (1 − done(s,a)) V_{h−1}(next(s,a));   V_h(s) = Σ_a π Q_h
    so V_H(s) = E[Σ_{t<H} γ^t r_t | s_0 = s] for trajectories cut after H steps (or ended earlier
    at G or T), and at step t of such a trajectory the values that apply are those with h = H − t.
    -> (V [H+1, S], Q [H+1, S, A], A [H+1, S, A]); row 0 is all zeros (no steps left).
    """
    r = torch.as_tensor(reward, dtype=pi.dtype)  # [S, A]
    go_on = 1.0 - torch.as_tensor(done, dtype=pi.dtype)  # [S, A]
    nxt = torch.as_tensor(next_state, dtype=torch.long)  # [S, A]
    Vs, Qs = [torch.zeros(pi.shape[0], dtype=pi.dtype)], [torch.zeros_like(pi)]  # h = 0
    for _ in range(horizon):
        Q = r + gamma * go_on * Vs[-1][nxt]  # Q_h = r + γ (1 − done) V_{h−1}(s')   [S, A]
        Qs.append(Q)
        Vs.append((pi * Q).sum(-1))  # V_h(s) = Σ_a π(a|s) Q_h(s,a)   [S]
    V, Q = torch.stack(Vs), torch.stack(Qs)  # [H+1, S], [H+1, S, A]
    return V, Q, Q - V[:, :, None]  # A_h = Q_h − V_h   [H+1, S, A]


def discounted_visitation(next_state, done, pi: torch.Tensor, gamma: float, start: int) -> torch.Tensor:
    """d_γ(s) = Σ_t γ^t P(s_t = s | s_0 = start): (I − γ P_π)ᵀ d = e_start.  -> [S]

    With it the policy gradient theorem reads ∇J = Σ_s d_γ(s) Σ_a ∇π(a|s) Q^π(s,a) for
    J = V^π(start); the γ^t inside d_γ is the factor that Ψ_t = Q^π(s_t,a_t) alone leaves out."""
    P = policy_transitions(next_state, done, pi)  # [S, S]
    e = torch.zeros(P.shape[0], dtype=pi.dtype)
    e[start] = 1.0
    return torch.linalg.solve((torch.eye(P.shape[0], dtype=pi.dtype) - gamma * P).T, e)  # d_γ   [S]


#####  the learners (notes 3.1 and 3.2) ##########################################################


class ReplayBuffer:
    """Experience replay D (notes 3.2): a ring of the last `capacity` transitions (s, a, r, s', done).

    With capacity ≥ the number of steps it keeps everything, like the notes' cumulative data set.
    Once full, each new transition overwrites the oldest one. `sample` draws B indices uniformly
    (with replacement) from the filled slots only, so empty slots are never trained on.
    """

    def __init__(self, capacity: int, obs_dim: int):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)       # onehot(s)   [N, S]
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)  # onehot(s')  [N, S]
        self.actions = np.zeros(capacity, dtype=np.int64)                # a  [N]
        self.rewards = np.zeros(capacity, dtype=np.float32)              # r  [N]
        self.dones = np.zeros(capacity, dtype=np.float32)                # 1 if s' is terminal  [N]
        self.capacity, self.pos, self.size = capacity, 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs, action: int, reward: float, next_obs, done: bool) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.dones[i] = next_obs, done
        self.pos = (self.pos + 1) % self.capacity  # the slot after the newest holds the oldest entry
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator, device="cpu"):
        """-> obs [B, S], actions [B], rewards [B], next_obs [B, S], dones [B], as tensors."""
        idx = rng.integers(0, self.size, size=batch_size)  # only filled slots  [B]
        return tuple(torch.as_tensor(x[idx], device=device)
                     for x in (self.obs, self.actions, self.rewards, self.next_obs, self.dones))


def q_network(n_states: int, n_actions: int, hidden: int) -> nn.Module:
    """Q_θ: onehot(s) [B, S] -> Q_θ(s, ·) [B, A], one output per action as in the notes' figure."""
    return nn.Sequential(nn.Linear(n_states, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_actions))


class Tracker:
    """Measures a learner against Q* every --eval-every steps; logs, shows the maze, keeps history."""

    def __init__(self, name: str, prefix: str, maze: Maze, q_star: np.ndarray, args: Args, total: int,
                 logger: RunLogger | None = None):
        self.name, self.prefix, self.maze, self.q_star, self.args = name, prefix, maze, q_star, args
        self.total, self.logger = total, logger
        self.log_every = max(1, total // args.eval_every // args.log_lines) * args.eval_every
        self.history, self.returns = [], []  # history: (step, max |Q − Q*|, optimal everywhere)
        self.t0 = self.t_end = time.time()

    def measure(self, step: int, q: np.ndarray, metrics: dict) -> None:
        err, optimal = evaluate(q, self.q_star, self.maze.reachable)
        self.t_end = time.time()
        self.history.append((step, err, bool(optimal.all())))
        a = self.args
        if self.logger and (step % self.log_every == 0 or step == self.total):
            p = self.prefix
            ret = {f"{p}/episodic_return": float(np.mean(self.returns))} if self.returns else {}
            metrics = {f"{p}/max_q_error": err, f"{p}/optimal_everywhere": bool(optimal.all()),
                       **ret, **metrics}
            self.logger.log(step, metrics, keys=[k for k in metrics if not k.endswith("q_values")])
            self.returns = []
        if a.show_every and step % a.show_every == 0:
            print(f"--- {self.name}, step {step}\n{render(self.maze, q, self.q_star)}")

    def result(self) -> dict:
        """`steps_to_optimal`: the first measurement from which the greedy policy stayed optimal."""
        step, err, optimal = self.history[-1]
        to_optimal = None
        for s, _, opt in reversed(self.history):
            if not opt:
                break
            to_optimal = s
        return {"max_q_error": err, "optimal_everywhere": optimal, "env_steps": step,
                "steps_to_optimal": to_optimal, "wall_seconds": round(self.t_end - self.t0, 3),
                "max_q_error_at_start": self.history[0][1]}


def tabular_q_learning(maze: Maze, args: Args, rng: np.random.Generator, tracker: Tracker):
    """The notes' Q-table (3.1), started at zero, one ε-greedy step and one update at a time. The
    update moves Q(s,a) a fraction α = --q-lr towards the target; the notes' rule is α = 1."""
    q = np.zeros((maze.n_states, maze.n_actions))  # Q(s, a) = 0 everywhere  [S, A]
    decay = args.exploration_fraction * args.tabular_steps  # steps over which ε falls
    s, ep_return = maze.reset(), 0.0
    tracker.measure(0, q, {})
    for step in range(1, args.tabular_steps + 1):
        eps = linear_epsilon(step, args.eps_start, args.eps_end, decay)
        a = epsilon_greedy(q[s], eps, rng)
        s2, r, done, truncated = maze.step(a)
        y = td_target(r, q[s2].max(), done, args.gamma)  # y = r + γ (1 − done) max_a' Q(s', a')
        q[s, a] += args.q_lr * (y - q[s, a])  # Q(s,a) ← Q(s,a) + α [y − Q(s,a)]
        s, ep_return = s2, ep_return + r
        if done or truncated:
            tracker.returns.append(ep_return)
            s, ep_return = maze.reset(), 0.0
        if step % args.eval_every == 0 or step == args.tabular_steps:
            tracker.measure(step, q, {"tabular/epsilon": eps})
    return q


def train_dqn(maze: Maze, args: Args, rng: np.random.Generator, tracker: Tracker, device) -> nn.Module:
    """Deep Q-learning (notes 3.2): the Q-table becomes Q_θ, trained on replayed transitions
    against a target network Q_θ' that is held fixed between updates."""
    onehot = np.eye(maze.n_states, dtype=np.float32)  # row s is the state vector of s  [S, S]
    all_states = torch.as_tensor(onehot, device=device)  # every state at once, for measuring  [S, S]
    q_net = q_network(maze.n_states, maze.n_actions, args.hidden).to(device)
    target_net = copy.deepcopy(q_net)  # θ' ← θ
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate)
    buffer = ReplayBuffer(args.buffer_size, maze.n_states)
    decay = args.exploration_fraction * args.dqn_steps  # steps over which ε falls
    s, ep_return, updates, metrics, t0 = maze.reset(), 0.0, 0, {}, time.time()
    with torch.no_grad():
        tracker.measure(0, q_net(all_states).cpu().numpy(), {})
    for step in range(1, args.dqn_steps + 1):
        eps = linear_epsilon(step, args.eps_start, args.eps_end, decay)
        with torch.no_grad():
            q_s = q_net(all_states[s]).cpu().numpy()  # Q_θ(s, ·)  [A]
        a = epsilon_greedy(q_s, eps, rng)
        s2, r, done, truncated = maze.step(a)
        buffer.add(onehot[s], a, r, onehot[s2], done)
        s, ep_return = s2, ep_return + r
        if done or truncated:
            tracker.returns.append(ep_return)
            s, ep_return = maze.reset(), 0.0

        if step > args.learning_starts and step % args.train_every == 0:
            obs, actions, rewards, next_obs, dones = buffer.sample(args.batch_size, rng, device)
            with torch.no_grad():  # the target network is held fixed (notes 3.2)
                target_next_q = target_net(next_obs)  # Q_θ'(s', ·)  [B, A]
                if args.double_dqn:
                    next_q = double_dqn_next_q(q_net(next_obs), target_next_q)  # [B]
                else:
                    next_q = target_next_q.max(dim=-1).values  # max_a' Q_θ'(s', a')  [B]
                y = td_target(rewards, next_q, dones, args.gamma)  # r + γ (1 − done) next_q  [B]
            q_taken = q_net(obs).gather(1, actions[:, None]).squeeze(1)  # Q_θ(s, a)  [B]
            loss, metrics = dqn_loss(q_taken, y, args.loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            if updates % args.target_update_every == 0:
                update_target(target_net, q_net, args.tau)  # θ' ← τ θ + (1 − τ) θ'

        if step % args.eval_every == 0 or step == args.dqn_steps:
            with torch.no_grad():
                q_all = q_net(all_states).cpu().numpy()  # Q_θ(s, a) for every s  [S, A]
            sps = int(step / (time.time() - t0))
            tracker.measure(step, q_all, {"dqn/epsilon": eps, **metrics, "charts/SPS": sps})
    return q_net


def train(args: Args) -> dict:
    for name in ("tabular_steps", "dqn_steps", "max_episode_steps", "hidden", "batch_size",
                 "train_every", "target_update_every", "eval_every", "log_lines"):
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    check(0 < args.gamma < 1, f"--gamma {args.gamma}: must be in (0, 1); at 1 every safe path to the "
                              "goal is worth the same, so 'optimal' would not prefer the short one")
    check(0 <= args.eps_end <= args.eps_start <= 1, "--eps-start, --eps-end: need 0 <= end <= start <= 1")
    check(0 < args.exploration_fraction <= 1, "--exploration-fraction must be in (0, 1]")
    check(0 < args.q_lr <= 1, "--q-lr (α) must be in (0, 1]")
    check(0 < args.tau <= 1, "--tau must be in (0, 1]")
    check(args.buffer_size >= args.batch_size, "--buffer-size must be at least --batch-size")
    check(args.learning_starts >= args.batch_size, "--learning-starts must be at least --batch-size")
    check(args.show_every >= 0, "--show-every must be 0 (only at the end) or positive")
    rows, source = read_maze(args.maze)
    maze = Maze(rows, args.max_episode_steps, source)
    device = pick_device(args.device)
    seed_everything(args.seed)
    # A network this small gains nothing from a second CPU thread, and on a busy machine the two
    # threads wait for each other (with 2 threads on 2 busy cores we saw 5-10x fewer steps/s).
    set_threads(args.threads, device)  # the Q-network is far under harness.SMALL_MODEL: 1 thread
    out = prepare_run_dir(args.out_dir or default_run_dir("dqn_maze", args.seed), args.overwrite)
    logger = RunLogger(out)

    q_star = value_iteration(maze.next_state, maze.reward, maze.done, args.gamma)  # [S, A]
    print(f"maze {source}: {maze.H}x{maze.W}, {len(maze.reachable)} reachable states, "
          f"V*(start) = {q_star[maze.start].max():.4f}\n" + "\n".join(maze.rows))
    print("\n## tabular Q-learning (notes 3.1)")
    tab = Tracker("tabular Q-learning", "tabular", maze, q_star, args, args.tabular_steps, logger)
    q_table = tabular_q_learning(maze, args, np.random.default_rng([args.seed, 0]), tab)
    print(f"\n## DQN (notes 3.2) on {device}")
    dqn = Tracker("DQN", "dqn", maze, q_star, args, args.dqn_steps, logger)
    q_net = train_dqn(maze, args, np.random.default_rng([args.seed, 1]), dqn, device)
    torch.save(q_net.state_dict(), out / "q_network.pt")
    with torch.no_grad():
        q_dqn = q_net(torch.eye(maze.n_states, device=device)).cpu().numpy()  # [S, A]

    results = {"tabular": tab.result(), "dqn": dqn.result()}
    for name, q in (("tabular Q-learning", q_table), ("DQN", q_dqn)):
        print(f"\n{name}\n{render(maze, q, q_star)}")
    print(f"\n{'learner':<9}{'steps':>8}{'steps to optimal':>18}{'max|Q-Q*| at start':>20}"
          f"{'at end':>10}{'optimal everywhere':>20}{'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<9}{r['env_steps']:>8}{str(r['steps_to_optimal']):>18}"
              f"{r['max_q_error_at_start']:>20.4f}{r['max_q_error']:>10.4f}"
              f"{str(r['optimal_everywhere']):>20}{r['wall_seconds']:>8.1f}")
    summary = logger.summary({**results, "v_star_start": float(q_star[maze.start].max()),
                              "reachable_states": len(maze.reachable), "maze": maze.rows,
                              "q_network": "q_network.pt", "config": asdict(args),
                              "threads": torch.get_num_threads()})
    logger.close()
    print(f"\nwrote {out}/metrics.jsonl, summary.json, q_network.pt")
    return summary


if __name__ == "__main__":
    main(Args, train, __doc__)
