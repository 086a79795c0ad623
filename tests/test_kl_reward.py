"""The KL penalty as a PPO *reward* (ppo.py --kl-estimator k1 | k3), checked by exact enumeration.

Notes `000_e75205f5b80b652d.txt`, "RLHF + PPO": R(x, y) = r_φ(x, y) − β log π(y|x)/π_ref(y|x), so the
policy gradient of the penalty is the score-function gradient with the per-token KL estimate as a
fixed (detached) reward. On one step with three actions, π = softmax(z), everything is a finite sum:

    expected gradient of the reward −k(a):   g = −Σ_a π(a) ∇_z log π(a) · k(a)

and, with ∇_z log π(a) = e_a − π:
    k1(a) = log π(a) − log π_ref(a):
        g = −Σ_a π(a)(e_a − π)(log π(a) − log π_ref(a)) = −∇KL(π ‖ π_ref)    (exactly; the Σ π ∇log π = 0
        term that ∇KL also has vanishes)
    k3(a) = ρ(a) − 1 − log ρ(a), ρ = π_ref/π:
        Σ_a π ∇log π · (ρ − 1) = Σ_a π_ref ∇log π = −∇KL(π_ref ‖ π),   and the −log ρ part is k1's, so
        g = −(∇KL(π ‖ π_ref) − ∇KL(π_ref ‖ π)).
Both KLs are ½ (z − z_ref)ᵀ F (z − z_ref) + O(‖z − z_ref‖³) with the same Fisher matrix F, so their
gradients agree to first order and k3's g is O(‖z − z_ref‖²): near π_ref the k3 reward barely pulls
the policy back, while its *value* is still an unbiased estimate of KL(π ‖ π_ref) (Tang & Munos 2025,
"On a few pitfalls in KL divergence gradient estimation for RL").

For softmax logits, ∂KL(π ‖ π_ref)/∂z_j = π_j (log π_j/π_ref,j − KL(π ‖ π_ref)) and
∂KL(π_ref ‖ π)/∂z_j = π_j − π_ref,j (the analytic gradients the tests compare against).
"""

from __future__ import annotations

import pytest
import torch

from ppo import kl_shaped_rewards

Z_REF = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)  # π_ref = softmax(Z_REF)


def reward_per_action(z: torch.Tensor, estimator: str) -> torch.Tensor:
    """−k(a) for each of the three actions, from ppo.kl_shaped_rewards (β = 1, score 0): row a is the
    one-token completion `a`, with log π_old(a) = log π(a) (the policy that sampled it).  -> [3]"""
    logp = torch.log_softmax(z.detach(), -1)[:, None]  # log π(a)   [3, 1]
    ref = torch.log_softmax(Z_REF, -1)[:, None]  # log π_ref(a)   [3, 1]
    rewards, _ = kl_shaped_rewards(torch.zeros(3, dtype=torch.float64), logp, ref, torch.ones(3, 1),
                                   beta=1.0, kl_estimator=estimator)
    return rewards[:, 0]  # −β KL_t(a)   [3]


def expected_policy_gradient(z: torch.Tensor, estimator: str) -> torch.Tensor:
    """g = Σ_a π(a) ∇_z log π(a) · r(a), the expectation of REINFORCE's estimate over a ~ π, with the
    reward r(a) = −k(a) held fixed (it is computed from detached log-probs, as in the rollout)."""
    z = z.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)  # [3]
    r = reward_per_action(z, estimator)  # [3], no gradient
    surrogate = (logp.exp().detach() * logp * r).sum()  # Σ_a π(a) log π(a) r(a), π(a) as weights
    (g,) = torch.autograd.grad(surrogate, z)
    return g  # [3]


def grad_kl_forward(z: torch.Tensor) -> torch.Tensor:
    """∇_z KL(π ‖ π_ref) = π ⊙ (log π/π_ref − KL), analytic.  -> [3]"""
    p, lp, lq = torch.softmax(z, -1), torch.log_softmax(z, -1), torch.log_softmax(Z_REF, -1)
    kl = (p * (lp - lq)).sum()
    return p * (lp - lq - kl)


def grad_kl_reverse(z: torch.Tensor) -> torch.Tensor:
    """∇_z KL(π_ref ‖ π) = π − π_ref, analytic.  -> [3]"""
    return torch.softmax(z, -1) - torch.softmax(Z_REF, -1)


def test_analytic_kl_gradients_match_autograd():
    # the closed forms above against autograd of the two KLs themselves, at a point away from π_ref
    z = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64, requires_grad=True)
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(Z_REF, -1)
    (g_fwd,) = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), z, retain_graph=True)
    (g_rev,) = torch.autograd.grad((lq.exp() * (lq - lp)).sum(), z)
    torch.testing.assert_close(g_fwd, grad_kl_forward(z.detach()), rtol=0, atol=1e-14)
    torch.testing.assert_close(g_rev, grad_kl_reverse(z.detach()), rtol=0, atol=1e-14)


@pytest.mark.parametrize("z", [[1.0, -0.5, 0.2], [0.31, -0.21, 0.52], [-2.0, 3.0, 0.0]])
def test_k1_reward_expected_gradient_is_exactly_the_kl_gradient(z):
    z = torch.tensor(z, dtype=torch.float64)
    torch.testing.assert_close(expected_policy_gradient(z, "k1"), -grad_kl_forward(z), rtol=0, atol=1e-14)


@pytest.mark.parametrize("z", [[1.0, -0.5, 0.2], [0.31, -0.21, 0.52], [-2.0, 3.0, 0.0]])
def test_k3_reward_expected_gradient_is_the_difference_of_the_two_kl_gradients(z):
    z = torch.tensor(z, dtype=torch.float64)
    g3 = expected_policy_gradient(z, "k3")
    torch.testing.assert_close(g3, -(grad_kl_forward(z) - grad_kl_reverse(z)), rtol=0, atol=1e-14)


def test_k3_value_is_unbiased_but_its_reward_gradient_vanishes_near_the_reference():
    # The two faces: E_π[k3] = KL(π ‖ π_ref) exactly (the value is unbiased), yet its expected
    # policy gradient shrinks like ε² as z = z_ref + ε u approaches z_ref, while k1's (the true
    # −∇KL) shrinks like ε. So |g_k3| / |g_k1| = O(ε): ÷10 for every ÷10 of ε.
    u = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ratios = []
    for eps in (1e-1, 1e-2, 1e-3):
        z = Z_REF + eps * u
        p, lp, lq = torch.softmax(z, -1), torch.log_softmax(z, -1), torch.log_softmax(Z_REF, -1)
        k3_mean = -(p * reward_per_action(z, "k3")).sum()  # E_{a~π}[k3(a)]
        assert float(k3_mean) == pytest.approx(float((p * (lp - lq)).sum()), rel=1e-9)  # = KL(π ‖ π_ref)
        g1, g3 = expected_policy_gradient(z, "k1"), expected_policy_gradient(z, "k3")
        ratios.append(float(g3.norm() / g1.norm()))
    assert ratios[0] < 0.2  # already small at ε = 0.1
    for big, small in zip(ratios, ratios[1:]):
        assert small == pytest.approx(big / 10, rel=0.2)  # linear in ε
    assert ratios[-1] < 2e-3  # at ε = 0.001 the k3 reward gives ~0.1% of the KL's pull
    # far from π_ref it is not small, and not the KL's gradient either
    z = torch.tensor([-2.0, 3.0, 0.0], dtype=torch.float64)
    g1, g3 = expected_policy_gradient(z, "k1"), expected_policy_gradient(z, "k3")
    assert float((g3 - g1).norm() / g1.norm()) > 0.1
