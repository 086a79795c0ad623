"""RLHF as a bandit (notes 000 "RLHF + PPO", 003) and as a token MDP (ppo.py, reinforce.py): the two
views give the same expected policy gradient, by exact enumeration.

The bandit: the context is the prompt x, the action the whole completion y ∈ V^|y|, one reward
s(x, y); its gradient is ∇J = E_y[s(y) ∇log π(y|x)] = ∇ Σ_y π(y|x) s(y). The token MDP: the state
s_t is (x, y_<t), the action y_t, the reward r_t = s · 1[t = last] (β = 0), and PPO's estimator
Σ_t ∇log π(y_t|s_t) Â_t with GAE at γ = λ = 1. Since log π(y|x) = Σ_t log π(y_t|s_t), and at
γ = λ = 1 Â_t = s − V(s_t) (the return minus a baseline of the state), the two agree: exactly per
sample when V = 0, in expectation for any V(s_t).

A tiny autoregressive softmax policy over V = 3 tokens, completions of length 2 (9 of them, all
enumerated), float64: π(y_1) = softmax(z_0), π(y_2|y_1) = softmax(z_1[y_1]).
"""

from __future__ import annotations

import itertools

import torch

import ppo

F64 = torch.float64
V = 3
gen = torch.Generator().manual_seed(0)
Z0 = torch.randn(V, generator=gen, dtype=F64)  # logits of the first token
Z1 = torch.randn(V, V, generator=gen, dtype=F64)  # logits of the second token, per first token
SCORE = torch.randn(V, V, generator=gen, dtype=F64)  # s(x, y) of the 9 completions y = (y_1, y_2)
V_PROMPT = 0.7  # a critic's V(s_0), the state "prompt only"
V_PREFIX = torch.tensor([-1.3, 0.4, 2.0], dtype=F64)  # V(s_1) for each first token y_1
SEQUENCES = list(itertools.product(range(V), repeat=2))
MASK = torch.ones(1, 2)  # one completion of 2 tokens, no EOS (a fixed length)


def token_logprobs(z0, z1, y) -> torch.Tensor:
    """[log π(y_1|x), log π(y_2|x, y_1)]  -> [1, 2]"""
    return torch.stack([torch.log_softmax(z0, -1)[y[0]], torch.log_softmax(z1[y[0]], -1)[y[1]]])[None]


def token_level_expected_gradient(values, gamma=1.0, lam=1.0, per_token_mean=False):
    """Σ_y π(y) · ∇_θ Σ_t log π(y_t|s_t) Â_t, Â from ppo.kl_shaped_rewards (β = 0) and ppo.gae; with
    per_token_mean, −∇ of ppo.ppo_clip_loss at ρ = 1 instead (the mean over the T = 2 tokens)."""
    z0, z1 = Z0.clone().requires_grad_(True), Z1.clone().requires_grad_(True)
    total = [torch.zeros_like(Z0), torch.zeros_like(Z1)]
    for y in SEQUENCES:
        logp = token_logprobs(z0, z1, y)  # [1, 2]
        rewards, _ = ppo.kl_shaped_rewards(SCORE[y][None], logp.detach(), logp.detach(), MASK, beta=0.0)  # [1, 2]
        adv, _ = ppo.gae(rewards, values(y), MASK, gamma=gamma, lam=lam)  # Â_t   [1, 2]
        if per_token_mean:
            loss, _ = ppo.ppo_clip_loss(logp, logp.detach(), adv, MASK)  # −mean_t min(ρÂ, clip(ρ)Â), ρ = 1
            estimate = -loss
        else:
            estimate = (logp * adv).sum()  # Σ_t log π(y_t|s_t) Â_t, its gradient is the estimator
        grads = torch.autograd.grad(estimate, (z0, z1))
        weight = logp.sum().exp().detach()  # π(y|x)
        total = [acc + weight * g for acc, g in zip(total, grads)]
    return total


def bandit_gradient():
    """∇_θ J = ∇_θ Σ_y π(y|x) s(y), the exact gradient of the bandit's expected reward."""
    z0, z1 = Z0.clone().requires_grad_(True), Z1.clone().requires_grad_(True)
    J = sum(token_logprobs(z0, z1, y).sum().exp() * SCORE[y] for y in SEQUENCES)
    return torch.autograd.grad(J, (z0, z1))


def no_value(y):
    return torch.zeros(1, 2, dtype=F64)


def a_critic(y):
    return torch.tensor([[V_PROMPT, V_PREFIX[y[0]]]], dtype=F64)  # V(s_0), V(s_1): a function of the state only


def test_the_token_mdp_estimator_has_the_bandits_expected_gradient():
    exact = bandit_gradient()
    # V = 0: Â_t = s for every token, and Σ_t ∇log π(y_t|s_t) s = ∇log π(y|x) s, the bandit's
    # REINFORCE estimator, sample by sample; so also in expectation
    for got, want in zip(token_level_expected_gradient(no_value), exact):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # a critic V(s_t): Â_t = s − V(s_t) is a baseline of the state, zero in expectation (notes 004,
    # "Why is the Baseline Unbiased?"): the expected gradient is still the bandit's
    for got, want in zip(token_level_expected_gradient(a_critic), exact):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # ppo.py's own loss at ρ = 1 averages over the T = 2 tokens: the same direction, ÷ T
    for got, want in zip(token_level_expected_gradient(a_critic, per_token_mean=True), exact):
        torch.testing.assert_close(2 * got, want, atol=1e-12, rtol=0)


def test_the_views_part_when_gae_bootstraps_from_an_inexact_value():
    # λ < 1 (or γ < 1) mixes V(s_{t+1}) into Â_t: with a V that is not V^π the estimator is biased,
    # and the token MDP no longer has the bandit's expected gradient (the default λ = 0.95 trades
    # this bias for variance; the GAE paper's bias–variance trade-off)
    exact = bandit_gradient()
    biased = token_level_expected_gradient(a_critic, lam=0.5)
    assert max(float((got - want).abs().max()) for got, want in zip(biased, exact)) > 1e-3
    # V = 0 at λ < 1 gives Â_t = Σ_l (γλ)^l r_{t+l}: the first token's score is discounted by λ, also biased
    biased = token_level_expected_gradient(no_value, lam=0.5)
    assert max(float((got - want).abs().max()) for got, want in zip(biased, exact)) > 1e-3
