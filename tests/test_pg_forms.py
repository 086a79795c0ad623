"""The policy gradient's alternative forms, proved by exact enumeration on the notes' maze.

Notes `000_e75205f5b80b652d.txt` ("Other forms of Policy gradient ... proofs won't be covered"),
`002_53ad65790e79eb4c.txt` §4.1 (V^π, Q^π, A^π) and §4.4 (Ψ_t = R(τ), the reward-to-go, the
reward-to-go minus a baseline b(s_t), the advantage), `004_e77bb721393eb42b.txt` ("Why is the
Baseline Unbiased?"). The code under test is dqn_maze.py's section "exact policy evaluation".

The policy is tabular: logits z [S, A], π(a|s) = softmax(z[s])_a, so the score of one step is
    ∇_z log π(a_t|s_t) = e_{s_t} ⊗ (e_{a_t} − π(·|s_t))          (zero in every other row of z)
and E[ĝ] = Σ_τ P(τ) Σ_t ∇_z log π(a_t|s_t) Ψ_t can be summed over every trajectory exactly.

Proof sketch of the forms (what the enumeration checks), for J = E[Σ_{t<H} γ^t r_t]:
  0. ∇J = E[Σ_t ∇log π(a_t|s_t) R(τ)], R(τ) = Σ_k γ^k r_k (the log-derivative trick, notes 000).
  1. Causality. For k < t, r_k is fixed once s_t is reached, and E_{a_t~π(·|s_t)}[∇log π(a_t|s_t)]
     = Σ_a ∇π(a|s_t) = ∇1 = 0, so E[∇log π(a_t|s_t) γ^k r_k] = 0: the past rewards drop out and
     Ψ_t = Σ_{k≥t} γ^k r_k = γ^t G_t, with G_t = Σ_{k≥t} γ^{k−t} r_k the reward-to-go.
  2. Baseline. The same zero times b(s_t), for any b that depends on the state only (notes 004):
     Ψ_t = γ^t (G_t − b(s_t)).
  3. Q. Condition on (s_t, a_t): E[∇log π(a_t|s_t) G_t] = E[∇log π(a_t|s_t) E[G_t | s_t, a_t]], and
     by the Markov property E[G_t | s_t, a_t] = Q^π_{H−t}(s_t, a_t), the value with H − t steps left
     (the past does not change the future). So Ψ_t = γ^t Q^π_{H−t}(s_t, a_t).
  4. A. A = Q − V, and V^π_{H−t}(s_t) is a baseline (step 2): Ψ_t = γ^t A^π_{H−t}(s_t, a_t).
With γ = 1 (the notes' finite-horizon return) every γ^t is 1 and these are the notes' forms as
written. With γ < 1 the forms need the factor γ^t, which the notes (and most code) leave out;
without it G_t is biased (reinforce.py's docstring says the same). For the infinite-horizon
discounted return the γ^t sits in the discounted visitation d_γ: ∇V^π(s_0) = Σ_s d_γ(s) Σ_a ∇π Q^π.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from dqn_maze import (MAZES, Maze, discounted_visitation, finite_horizon_evaluation, policy_evaluation,
                      policy_from_logits, policy_transitions, value_iteration)

F64 = torch.float64  # every tensor here: exact identities are compared to 1e-10, not to float32 noise
MAZE = Maze(MAZES["2x3"], max_episode_steps=100)
S, A = MAZE.n_states, MAZE.n_actions


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(S, A, generator=torch.Generator().manual_seed(seed), dtype=F64)


def trajectories(pi: np.ndarray, horizon: int, reward: np.ndarray = MAZE.reward):
    """Every trajectory from the start, cut after `horizon` steps or ended at G or T:
    yields (probability, states [T], actions [T], rewards [T]) with T ≤ horizon. No sampling.
    `reward` [S, A]: the maze's table, or another one on the same moves."""
    def extend(s, prob, states, actions, rewards):
        if len(actions) == horizon:
            yield prob, states, actions, rewards
            return
        for a in range(A):
            p = prob * pi[s, a]
            s2, r, done = int(MAZE.next_state[s, a]), float(reward[s, a]), bool(MAZE.done[s, a])
            if done:
                yield p, states + [s], actions + [a], rewards + [r]
            else:
                yield from extend(s2, p, states + [s], actions + [a], rewards + [r])
    yield from extend(MAZE.start, 1.0, [], [], [])


def score(pi: np.ndarray, s: int, a: int) -> np.ndarray:
    """∇_z log π(a|s) for the tabular softmax: row s is e_a − π(·|s), every other row 0.  -> [S, A]"""
    g = np.zeros((S, A))
    g[s] = -pi[s]
    g[s, a] += 1.0
    return g


#####################################################################################################
#####  the evaluation itself
#####################################################################################################


def test_policy_evaluation_of_the_optimal_policy_is_v_star():
    # The deterministic optimal policy of the module docstring (S > > v on row 0, ^ at (1,0)):
    # V^π = V*: V(0,2) = 10 (enter G), V(0,1) = 0.9·10 = 9, V(0,0) = 0.9·9 = 8.1, V(1,0) = 0.9·8.1 = 7.29;
    # and Q^π = Q* in every reachable state, since π is greedy in Q* (value_iteration).
    pi = torch.zeros(S, A, dtype=F64)
    for s, a in ((0, 3), (1, 3), (2, 1), (3, 0)):  # up 0, down 1, left 2, right 3
        pi[s, a] = 1.0
    pi[4:, 0] = 1.0  # the trap and the goal: never occupied, any row will do
    V, Q, Adv = policy_evaluation(MAZE.next_state, MAZE.reward, MAZE.done, pi, 0.9)
    torch.testing.assert_close(V[[0, 1, 2, 3]], torch.tensor([8.1, 9.0, 10.0, 7.29], dtype=F64))
    q_star = torch.as_tensor(value_iteration(MAZE.next_state, MAZE.reward, MAZE.done, 0.9))
    torch.testing.assert_close(Q[MAZE.reachable], q_star[MAZE.reachable], atol=1e-8, rtol=0)
    # A = Q − V: 0 for the chosen action, e.g. A((0,0), down) = Q* = 0.9·7.29 − 8.1 = −1.539
    assert Adv[0, 3].item() == pytest.approx(0.0, abs=1e-12)
    assert Adv[0, 1].item() == pytest.approx(0.9 * 7.29 - 8.1)


def test_softmax_policy_values_satisfy_bellman_and_the_finite_horizon_converges():
    pi = policy_from_logits(random_logits(0))  # [S, A]
    V, Q, Adv = policy_evaluation(MAZE.next_state, MAZE.reward, MAZE.done, pi, 0.9)
    # V = Σ_a π Q (the definition of V from Q) and E_π[A] = 0 in every state
    torch.testing.assert_close(V, (pi * Q).sum(-1))
    torch.testing.assert_close((pi * Adv).sum(-1), torch.zeros(S, dtype=F64), atol=1e-12, rtol=0)
    # rows of P_π: the probability of going on, 1 − Σ_a π(a|s) done(s,a)
    P = policy_transitions(MAZE.next_state, MAZE.done, pi)
    torch.testing.assert_close(P.sum(-1), 1 - (pi * torch.as_tensor(MAZE.done, dtype=pi.dtype)).sum(-1))
    # the H-step values approach the infinite-horizon ones: |V_H − V| ≤ γ^H · max|r| / (1 − γ)
    Vh, Qh, _ = finite_horizon_evaluation(MAZE.next_state, MAZE.reward, MAZE.done, pi, 0.9, 200)
    assert (Vh[0] == 0).all() and (Qh[0] == 0).all()
    torch.testing.assert_close(Vh[200], V, atol=0.9 ** 200 * 10 / 0.1, rtol=0)
    with pytest.raises(ValueError, match="γ < 1"):
        policy_evaluation(MAZE.next_state, MAZE.reward, MAZE.done, pi, 1.0)


def test_discounted_policy_gradient_theorem_with_q_a_and_a_baseline():
    # J = V^π(start), infinite horizon, γ = 0.9, differentiated through the linear solve by autograd,
    # against the policy gradient theorem ∇J = Σ_s d_γ(s) Σ_a π(a|s) ∇log π(a|s) Ψ(s,a), which for
    # the tabular softmax is the [S, A] table d_γ(s) π(a|s) (Ψ(s,a) − Σ_b π(b|s) Ψ(s,b)),
    # with Ψ = Q^π, A^π and Q^π − b(s) for an arbitrary b.
    z = random_logits(1).requires_grad_(True)
    pi = policy_from_logits(z)
    V, Q, Adv = policy_evaluation(MAZE.next_state, MAZE.reward, MAZE.done, pi, 0.9)
    (grad_J,) = torch.autograd.grad(V[MAZE.start], z)
    with torch.no_grad():
        d = discounted_visitation(MAZE.next_state, MAZE.done, pi, 0.9, MAZE.start)  # [S]
        assert d[MAZE.start] >= 1.0 and d.sum() <= 1 / (1 - 0.9) + 1e-9  # Σ_t γ^t P(s_t = s) ≤ Σ_t γ^t
        b = torch.randn(S, generator=torch.Generator().manual_seed(7), dtype=F64) * 5
        for psi in (Q, Adv, Q - b[:, None]):
            expected = d[:, None] * pi * (psi - (pi * psi).sum(-1, keepdim=True))  # [S, A]
            torch.testing.assert_close(expected, grad_J, atol=1e-10, rtol=0)


#####################################################################################################
#####  the five forms of Ψ_t, by exact enumeration of every trajectory
#####################################################################################################


@pytest.mark.parametrize("step_cost", [0.0, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_every_psi_form_gives_the_exact_policy_gradient_by_enumeration(gamma, step_cost):
    # The 2×3 maze, horizon H = 4 (the goal is 3 moves away, so trajectories reach G, T, or neither),
    # a random softmax policy: all ≤ 4^4 trajectories with their probabilities. ∇J is autograd of
    # J = Σ_τ P(τ) R(τ) (and J equals V^π_H(start) of the finite-horizon evaluation).
    # The notes' maze pays only on entering G or T, the last step, so there G_t = R(τ) for every t;
    # step_cost = 1 also charges −1 for every other move, so that G_t ≠ R(τ) and causality is tested.
    # Each Ψ_t below must give Σ_τ P(τ) Σ_t ∇log π(a_t|s_t) Ψ_t = ∇J to 1e-10 (proof: the docstring):
    #   R(τ);  γ^t G_t;  γ^t (G_t − b(s_t));  γ^t Q^π_{H−t}(s_t,a_t);  γ^t A^π_{H−t}(s_t,a_t)
    H = 4
    reward = MAZE.reward - step_cost * (1 - MAZE.done)  # [S, A]
    z = random_logits(2).requires_grad_(True)
    pi_t = policy_from_logits(z)
    Vh, Qh, Ah = (x.detach().numpy() for x in
                  finite_horizon_evaluation(MAZE.next_state, reward, MAZE.done, pi_t, gamma, H))
    pi = pi_t.detach().numpy()
    b = np.random.default_rng(3).normal(size=S) * 5  # any baseline of the state alone
    forms = {name: np.zeros((S, A)) for name in ("R(τ)", "G_t", "G_t − b(s_t)", "Q", "A", "G_t, no γ^t")}
    J_enum, total_prob, n = 0.0, 0.0, 0
    for prob, states, actions, rewards in trajectories(pi, H, reward):
        n += 1
        total_prob += prob
        T = len(actions)
        disc = gamma ** np.arange(T)  # γ^t   [T]
        R = float((disc * rewards).sum())  # R(τ) = Σ_t γ^t r_t
        G = [float((gamma ** np.arange(T - t) * rewards[t:]).sum()) for t in range(T)]  # G_t   [T]
        J_enum += prob * R
        for t, (s, a) in enumerate(zip(states, actions)):
            g = prob * score(pi, s, a)  # P(τ) ∇log π(a_t|s_t)   [S, A]
            forms["R(τ)"] += g * R
            forms["G_t"] += g * disc[t] * G[t]
            forms["G_t − b(s_t)"] += g * disc[t] * (G[t] - b[s])
            forms["Q"] += g * disc[t] * Qh[H - t, s, a]
            forms["A"] += g * disc[t] * Ah[H - t, s, a]
            forms["G_t, no γ^t"] += g * G[t]  # the notes' G_t as written, without γ^t
    assert total_prob == pytest.approx(1.0, abs=1e-12) and 10 < n <= A ** H
    assert J_enum == pytest.approx(Vh[H, MAZE.start], abs=1e-12)  # enumeration = finite-horizon solve

    # the analytical gradient: J(z) = Σ_τ P_z(τ) R(τ), differentiated by autograd
    J = 0.0
    for _, states, actions, rewards in trajectories(pi, H, reward):
        logp = sum(torch.log(pi_t[s, a]) for s, a in zip(states, actions))
        J = J + logp.exp() * float((gamma ** np.arange(len(rewards)) * rewards).sum())
    (grad_J,) = torch.autograd.grad(J, z)
    grad_J = grad_J.numpy()
    assert np.abs(grad_J).max() > 0.1  # not a trivially zero gradient
    for name in ("R(τ)", "G_t", "G_t − b(s_t)", "Q", "A"):
        np.testing.assert_allclose(forms[name], grad_J, atol=1e-10, rtol=0, err_msg=name)
    if gamma == 1.0:  # the notes' forms exactly as written
        np.testing.assert_allclose(forms["G_t, no γ^t"], grad_J, atol=1e-10, rtol=0)
    else:  # without γ^t the reward-to-go is biased for J_γ
        assert np.abs(forms["G_t, no γ^t"] - grad_J).max() > 1e-3


def test_the_forms_differ_in_variance_though_not_in_mean():
    # Same enumeration, γ = 1, H = 4: the second moment E‖Σ_t ∇log π Ψ_t‖² (tr Cov(ĝ) of one
    # trajectory plus ‖∇J‖², the same for all) is what the forms change. Measured, not assumed:
    # on this maze every reward arrives on the last step (entering G or T ends the episode), so
    # G_t = R(τ) at every t and the reward-to-go changes nothing; A^π is below Q^π.
    H = 4
    pi_t = policy_from_logits(random_logits(2))
    _, Qh, Ah = (x.numpy() for x in finite_horizon_evaluation(MAZE.next_state, MAZE.reward, MAZE.done,
                                                              pi_t, 1.0, H))
    pi = pi_t.numpy()
    second = dict.fromkeys(("R", "G", "Q", "A"), 0.0)
    for prob, states, actions, rewards in trajectories(pi, H):
        R, G = sum(rewards), np.cumsum(rewards[::-1])[::-1]  # R(τ), G_t (γ = 1)
        g = {k: np.zeros((S, A)) for k in second}
        for t, (s, a) in enumerate(zip(states, actions)):
            sc = score(pi, s, a)
            g["R"] += sc * R
            g["G"] += sc * G[t]
            g["Q"] += sc * Qh[H - t, s, a]
            g["A"] += sc * Ah[H - t, s, a]
        for k in second:
            second[k] += prob * float((g[k] ** 2).sum())
    assert second["G"] == pytest.approx(second["R"], rel=1e-12) and second["A"] < 0.9 * second["Q"]
