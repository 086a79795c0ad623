"""Tests of grpo.py: the maths by hand, then the script end to end.

Notes `000_e75205f5b80b652d.txt`, "Group Relative Policy Optimization" and "GRPO Done Right".
Every expected number is derived in a comment next to it, so that it can be checked on paper.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
import tasks
import grpo
from grpo import grpo_loss, group_advantages, k3_kl, process_advantages

E = math.e


def random_llama(seed: int = 0, vocab: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def batch_with_different_lengths():
    """Two prompts with two completions each (B = 4), of lengths 4, 2, 3 and 1.
    Returns ids, mask [B, P+T], completion mask [B, T], T."""
    p_ids, p_mask = common.left_pad([[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]], 0)  # [4, 3]
    c_ids = torch.tensor([[10, 11, 12, 1], [13, 1, 0, 0], [14, 15, 1, 0], [1, 0, 0, 0]])  # [4, 4]
    c_mask = common.completion_mask(c_ids, 1)  # lengths 4, 2, 3, 1
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [4, 7]
    return ids, mask, c_mask, c_ids.shape[1]


def flat_grad(scalar, params, retain_graph=True):
    grads = torch.autograd.grad(scalar, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])


#####################################################################################################
#####  group_advantages (outcome supervision)
#####################################################################################################


def test_group_advantages_one_correct_of_four():
    # rewards [1, 0, 0, 0], G = 4:
    #   mean = 1/4 = 0.25; deviations r − mean = (0.75, −0.25, −0.25, −0.25)
    #   Bessel (sample) variance = (0.75² + 3 · 0.25²) / (4 − 1) = (0.5625 + 0.1875) / 3 = 0.25
    #   std = 0.5  ->  Â = dev / (0.5 + eps) ≈ (1.5, −0.5, −0.5, −0.5)
    eps = 1e-4
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=eps)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + eps)
    torch.testing.assert_close(adv, expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=1e-12),
                               torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert adv.sum().abs() < 1e-6  # centred: the advantages of a group sum to 0


def test_group_advantages_all_equal_group_is_exactly_zero():
    # mean = r, deviations 0, std 0: 0 / (0 + eps) = 0 exactly, never 0/0 = NaN
    for r in ([1.0, 1, 1, 1], [0.0, 0, 0, 0], [0.3, 0.3, 0.3, 0.3]):
        adv = group_advantages(torch.tensor(r), 4)
        assert torch.equal(adv, torch.zeros(4)), adv
    assert torch.equal(group_advantages(torch.tensor([1.0, 1.0]), 2), torch.zeros(2))
    # eps acts only there: beside it in the batch, the mixed group [1, 0, 0, 0] keeps its z-scores,
    # dev (0.75, −0.25, −0.25, −0.25), std √(0.75/3) = 0.5, Â = dev / 0.5001 = (1.49970006, −0.49990002, ...)
    adv = group_advantages(torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0]), 4)
    assert torch.equal(adv[:4], torch.zeros(4))
    torch.testing.assert_close(adv[4:], torch.tensor([1.49970006, -0.49990002, -0.49990002, -0.49990002]),
                               atol=1e-7, rtol=0)


def test_dr_grpo_advantages_only_centre():
    # Dr. GRPO: Â = r − mean = (1 − 0.25, 0 − 0.25, ...) = (0.75, −0.25, −0.25, −0.25), no std
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_std=False)
    assert adv.tolist() == [0.75, -0.25, -0.25, -0.25]


def test_group_advantages_groups_are_independent():
    # group 1 [1, 0, 0, 0]: as above, dev (0.75, −0.25, −0.25, −0.25), std 0.5
    # group 2 [1, 1, 0, 0]: mean 0.5, dev (0.5, 0.5, −0.5, −0.5),
    #   Bessel variance = 4 · 0.25 / 3 = 1/3, std = 1/√3 ≈ 0.57735 -> ±0.5 / (1/√3 + eps) ≈ ±0.866
    # group 3 [0, 0, 0, 0]: 0
    eps = 1e-4
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    s = 1 / math.sqrt(3)
    expected = torch.tensor([0.75 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps),
                             0.5 / (s + eps), 0.5 / (s + eps), -0.5 / (s + eps), -0.5 / (s + eps),
                             0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(r, 4, eps=eps), expected)
    # changing one group does not change another
    r2 = r.clone()
    r2[4:8] = torch.tensor([0.0, 0, 0, 1])
    torch.testing.assert_close(group_advantages(r2, 4)[:4], group_advantages(r, 4)[:4], rtol=0, atol=0)
    torch.testing.assert_close(group_advantages(r2, 4)[8:], torch.zeros(4), rtol=0, atol=0)


#####################################################################################################
#####  process supervision
#####################################################################################################


def test_process_advantages_two_steps_per_completion():
    # One group, G = 2, T = 3. A step's reward sits at the token that ends the step.
    #   completion 0: steps end at tokens 0 and 2, rewards 1 and 1     step_mask [1, 0, 1]
    #   completion 1: steps end at tokens 1 and 2, rewards 0 and 1     step_mask [0, 1, 1]
    # (7.0 is written where no step ends, and must be ignored.)
    # All step rewards of the group together: R = {1, 1, 0, 1}
    #   mean = 3/4 = 0.75; deviations (0.25, 0.25, −0.75, 0.25)
    #   Bessel variance = (3 · 0.25² + 0.75²) / (4 − 1) = (0.1875 + 0.5625) / 3 = 0.25, std 0.5
    #   normalised r̃ = dev / 0.5 = (0.5, 0.5, −1.5, 0.5)
    # Â_t = sum of r̃ of the steps that end at or after t:
    #   completion 0: r̃ = 0.5 @0, 0.5 @2   ->  Â = [0.5 + 0.5, 0.5, 0.5] = [1.0, 0.5, 0.5]
    #   completion 1: r̃ = −1.5 @1, 0.5 @2  ->  Â = [−1.5 + 0.5, −1.5 + 0.5, 0.5] = [−1.0, −1.0, 0.5]
    r = torch.tensor([[1.0, 7.0, 1.0], [7.0, 0.0, 1.0]])
    m = torch.tensor([[1, 0, 1], [0, 1, 1]])
    adv = process_advantages(r, m, 2, eps=1e-12)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.5, 0.5], [-1.0, -1.0, 0.5]]))
    # with the default eps: r̃ = dev / (0.5 + 1e-4), so
    #   completion 0: Â = [0.25 + 0.25, 0.25, 0.25] / d,  completion 1: [−0.75 + 0.25, −0.5, 0.25] / d
    d = 0.5 + 1e-4
    torch.testing.assert_close(process_advantages(r, m, 2),
                               torch.tensor([[0.5, 0.25, 0.25], [-0.5, -0.5, 0.25]]) / d)
    # Dr. GRPO (no std): r̃ = dev = (0.25, 0.25, −0.75, 0.25)
    #   completion 0: [0.25 + 0.25, 0.25, 0.25] = [0.5, 0.25, 0.25]
    #   completion 1: [−0.75 + 0.25, −0.75 + 0.25, 0.25] = [−0.5, −0.5, 0.25]
    torch.testing.assert_close(process_advantages(r, m, 2, scale_std=False),
                               torch.tensor([[0.5, 0.25, 0.25], [-0.5, -0.5, 0.25]]))


def test_process_advantages_groups_are_independent_and_equal_groups_zero():
    # group 1 as in the test above; group 2: every step reward 1 -> deviations 0 -> Â = 0 exactly
    r = torch.tensor([[1.0, 7.0, 1.0], [7.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    m = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    adv = process_advantages(r, m, 2, eps=1e-12)
    torch.testing.assert_close(adv[:2], torch.tensor([[1.0, 0.5, 0.5], [-1.0, -1.0, 0.5]]))
    assert torch.equal(adv[2:], torch.zeros(2, 3))


def test_process_advantages_with_digit_rewards():
    # grpo.py's process mode: every completion token ends a step, rewarded by digit_step_rewards.
    # target "85<eos>" = [8, 5, 1]; G = 2:
    #   "85<eos>" -> step rewards [1, 1, 1]      "75<eos>" -> [0, 1, 1]
    # R = {1, 1, 1, 0, 1, 1}: mean 5/6; deviations 1/6 (five times) and −5/6
    #   Bessel variance = (5 · (1/6)² + (5/6)²) / 5 = (5/36 + 25/36) / 5 = 1/6, std = 1/√6
    #   r̃ = (1/6) · √6 = √6/6 ≈ 0.408 for the 1s, −(5/6) · √6 = −5√6/6 ≈ −2.041 for the 0
    #   completion 0: Â = [3, 2, 1] · √6/6;   completion 1: Â = [−5 + 2, 2, 1] · √6/6 = [−3, 2, 1] · √6/6
    c_ids = torch.tensor([[8, 5, 1], [7, 5, 1]])
    c_mask = common.completion_mask(c_ids, 1)
    step_r = tasks.digit_step_rewards(c_ids, c_mask, [[8, 5, 1]] * 2)
    adv = process_advantages(step_r, c_mask, 2, eps=1e-12)
    u = math.sqrt(6) / 6
    torch.testing.assert_close(adv, torch.tensor([[3 * u, 2 * u, u], [-3 * u, 2 * u, u]]))


#####################################################################################################
#####  k3 KL
#####################################################################################################


def test_k3_kl_values():
    # equal log-probs: e^0 − 0 − 1 = 0
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    # log(π_ref/π) = ref − logp = 1: e^1 − 1 − 1 = e − 2 ≈ 0.71828
    assert k3_kl(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == pytest.approx(E - 2, rel=1e-6)
    # ref − logp = −1: e^−1 + 1 − 1 = 1/e ≈ 0.36788
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(1 / E, rel=1e-6)
    # nearly equal, x = ref − logp = 1e-3: e^x − 1 − x = x²/2 + x³/6 + … ≈ 5.0017e-7, which float32
    # can only give to 1 % when it does not subtract 1 from a number close to 1
    assert k3_kl(torch.tensor([-2.0]), torch.tensor([-2.0 + 1e-3])).item() == pytest.approx(5.0017e-7, rel=1e-2)


def test_k3_kl_never_negative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(200_000, generator=g) * 20  # log-probs in (−20, 0]
    ref = torch.where(torch.rand(200_000, generator=g) < 0.5,
                      logp + torch.randn(200_000, generator=g) * 1e-3,  # near-equal pairs
                      -torch.rand(200_000, generator=g) * 20)
    kl = k3_kl(logp, ref)
    assert torch.isfinite(kl).all()
    assert (kl >= 0).all(), kl.min()
    grid = torch.linspace(-30, 0, 301)
    kl = k3_kl(grid[:, None], grid[None, :])  # every pair of a grid
    assert (kl >= 0).all(), kl.min()


#####################################################################################################
#####  grpo_loss: the clipped surrogate
#####################################################################################################


def one_token(ratio: float, adv: float, **kw):
    """grpo_loss on a single token with log π_old = 0, so that ρ = exp(logp). -> (loss, dL/dlogp, metrics)"""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_clipped_surrogate_binding_cases():
    # ε = 0.2, so ρ is clipped to [0.8, 1.2]; one token, so every aggregation is the token itself.
    # ρ = 1.5, Â = +1: min(1.5 · 1, clip(1.5) · 1) = min(1.5, 1.2) = 1.2  -> loss −1.2
    loss, grad, m = one_token(1.5, 1.0, epsilon=0.2)
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0  # the clipped branch is a constant: no gradient where clipping binds
    assert m["clip_frac"] == 1.0 and m["clip_frac_high"] == 1.0 and m["clip_frac_low"] == 0.0
    # ρ = 0.5, Â = −1: min(0.5 · −1, clip(0.5) · −1) = min(−0.5, −0.8) = −0.8  -> loss +0.8
    loss, grad, m = one_token(0.5, -1.0, epsilon=0.2)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0
    assert m["clip_frac"] == 1.0 and m["clip_frac_low"] == 1.0 and m["clip_frac_high"] == 0.0


def test_clipped_surrogate_inside_the_range_and_on_the_pessimistic_side():
    # inside: ρ = 1.1, Â = +1: min(1.1, 1.1) = 1.1 -> loss −1.1; dL/dlogp = −Â · dρ/dlogp = −ρ = −1.1
    loss, grad, m = one_token(1.1, 1.0, epsilon=0.2)
    assert loss == pytest.approx(-1.1) and grad == pytest.approx(-1.1) and m["clip_frac"] == 0.0
    # inside: ρ = 0.9, Â = −2: min(−1.8, −1.8) -> loss 1.8; dL/dlogp = −Â · ρ = 1.8
    loss, grad, m = one_token(0.9, -2.0, epsilon=0.2)
    assert loss == pytest.approx(1.8) and grad == pytest.approx(1.8)
    # outside, but the unclipped term is the smaller one (min keeps the pessimistic bound):
    # ρ = 0.5, Â = +1: min(0.5, 0.8) = 0.5 -> loss −0.5, gradient −ρ = −0.5 (not clipped)
    loss, grad, m = one_token(0.5, 1.0, epsilon=0.2)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5) and m["clip_frac"] == 0.0
    # ρ = 1.5, Â = −1: min(−1.5, −1.2) = −1.5 -> loss 1.5, gradient −Â · ρ = 1.5
    loss, grad, m = one_token(1.5, -1.0, epsilon=0.2)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and m["clip_frac"] == 0.0


def test_epsilon_high_is_a_separate_upper_bound():
    # ε = 0.2, ε_high = 0.28: ρ is clipped to [0.8, 1.28]
    # ρ = 1.25, Â = +1: inside [0.8, 1.28] -> loss −1.25, gradient −1.25
    loss, grad, _ = one_token(1.25, 1.0, epsilon=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
    # ... while with ε_high = ε it is clipped at 1.2: loss −1.2, gradient 0
    loss, grad, _ = one_token(1.25, 1.0, epsilon=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    # ρ = 1.5, Â = +1: clipped at 1.28 -> loss −1.28, gradient 0
    loss, grad, m = one_token(1.5, 1.0, epsilon=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(-1.28) and grad == 0.0 and m["clip_frac_high"] == 1.0
    # the lower bound stays 1 − ε: ρ = 0.75, Â = −1: min(−0.75, −0.8) = −0.8 -> loss 0.8, gradient 0
    loss, grad, m = one_token(0.75, -1.0, epsilon=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["clip_frac_low"] == 1.0


#####################################################################################################
#####  grpo_loss: aggregation over tokens and sequences
#####################################################################################################


def aggregation_example():
    # B = 2, T = 3, log π_old = 0 so ρ = exp(logp); every ρ inside [0.8, 1.2], so ℓ_t = ρ_t Â_i.
    #   row 0: ρ = [1.0, 1.1, 0.9], Â = +1, |y| = 3 -> ℓ = [1.0, 1.1, 0.9],  Σ = 3.0, Σ/|y| = 1.0
    #   row 1: ρ = [1.1, 0.9, 5.0], Â = −2, |y| = 2 -> ℓ = [−2.2, −1.8, ·], Σ = −4.0, Σ/|y| = −2.0
    #   (the third token of row 1 is masked out; ρ = 5 there would give −10 if it leaked)
    ratio = torch.tensor([[1.0, 1.1, 0.9], [1.1, 0.9, 5.0]])
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, torch.zeros(2, 3), adv, mask


@pytest.mark.parametrize("loss_agg, max_len, expected", [
    # seq-mean (the notes' GRPO): L = −1/B Σ_i 1/|y_i| Σ_t ℓ = −(1.0 + (−2.0)) / 2 = 0.5
    ("seq-mean", None, 0.5),
    # token-mean (DAPO): L = −Σ_i Σ_t ℓ / Σ_i |y_i| = −(3.0 − 4.0) / (3 + 2) = 0.2
    ("token-mean", None, 0.2),
    # constant (Dr. GRPO): L = −Σ_i Σ_t ℓ / (B · max_len); max_len = T = 3: −(−1.0) / 6 = 1/6
    ("constant", None, 1 / 6),
    # ... and with the constant max_len = 4 (grpo.py passes --max-new-tokens): 1.0 / 8 = 0.125
    ("constant", 4, 0.125),
])
def test_loss_aggregation_by_hand(loss_agg, max_len, expected):
    logp, old, adv, mask = aggregation_example()
    loss, _ = grpo_loss(logp, old, adv, mask, loss_agg=loss_agg, max_len=max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_agg, weights", [
    # dL/dlogp_{i,t} = −Â_i ρ_{i,t} · c_i, where c_i is the weight of row i's tokens:
    #   seq-mean: c_i = 1/(B |y_i|) = 1/6 for row 0, 1/4 for row 1 (short rows weigh more per token)
    ("seq-mean", (1 / 6, 1 / 4)),
    #   token-mean: c_i = 1 / Σ|y| = 1/5 for both rows
    ("token-mean", (1 / 5, 1 / 5)),
    #   constant: c_i = 1/(B · T) = 1/6 for both rows (no length normalisation)
    ("constant", (1 / 6, 1 / 6)),
])
def test_loss_aggregation_gradients_by_hand(loss_agg, weights):
    logp, old, adv, mask = aggregation_example()
    loss, _ = grpo_loss(logp, old, adv, mask, loss_agg=loss_agg)
    loss.backward()
    ratio = logp.detach().exp()
    c = torch.tensor(weights)[:, None]  # [2, 1]
    expected = -adv[:, None] * ratio * c * mask  # [2, 3], 0 on the masked token
    torch.testing.assert_close(logp.grad, expected)


def test_unknown_loss_agg_raises():
    logp, old, adv, mask = aggregation_example()
    with pytest.raises(ValueError, match="bogus"):
        grpo_loss(logp, old, adv, mask, loss_agg="bogus")


def test_per_token_advantages_broadcast_like_per_sequence():
    # an advantage [B] is the same as the [B, T] advantage that repeats it on every token
    logp, old, adv, mask = aggregation_example()
    for agg in ("seq-mean", "token-mean", "constant"):
        a, _ = grpo_loss(logp, old, adv, mask, loss_agg=agg)
        b, _ = grpo_loss(logp, old, adv[:, None].expand(2, 3), mask, loss_agg=agg)
        assert a.item() == pytest.approx(b.item())


#####################################################################################################
#####  grpo_loss with a real model: the policy gradient, micro-batches, the KL term
#####################################################################################################


@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean", "constant"])
def test_gradient_at_ratio_one_is_the_policy_gradient(loss_agg):
    """At ρ = 1 and β = 0, ∇ grpo_loss = −1/B Σ_i 1/|y_i| Σ_t ∇log π(y_t) Â_i (seq-mean), where each
    ∇log π(y_{i,t}) is taken separately by autograd and summed here by hand."""
    model = random_llama(seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, c_mask, T = batch_with_different_lengths()  # |y| = 4, 2, 3, 1
    adv = torch.tensor([1.5, -0.5, 0.7, -1.2])  # [B]
    B = ids.shape[0]
    logp, _ = common.token_logprobs(model, ids, mask, T)  # [B, T], with a graph to the weights

    # ρ = exp(logp − logp.detach()) = 1, as on the first inner iteration of a GRPO step
    loss, m = grpo_loss(logp, logp.detach(), adv, c_mask, loss_agg=loss_agg)
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0
    got = flat_grad(loss, params)

    lengths = c_mask.sum(1)  # [B] = [4, 2, 3, 1]
    expected = torch.zeros_like(got)
    for i in range(B):
        for t in range(T):
            if not c_mask[i, t]:
                continue
            weight = {"seq-mean": 1 / (B * lengths[i].item()),  # 1/B · 1/|y_i|
                      "token-mean": 1 / lengths.sum().item(),  # 1/Σ|y|
                      "constant": 1 / (B * T)}[loss_agg]  # 1/(B · max_len)
            expected -= weight * adv[i] * flat_grad(logp[i, t], params)  # −w Â_i ∇log π(y_{i,t})
    assert expected.abs().max() > 1e-4  # the check is not vacuous
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


LOSS_VARIANTS = {
    "gspo": {"ratio": "sequence", "epsilon": 1e-3, "epsilon_high": 1e-3},  # a row's ratio uses only its tokens
    "cispo": {"policy_loss": "cispo", "epsilon": None, "epsilon_high": 0.3},
    "k2": {"kl_estimator": "k2"},
    "k1": {"kl_estimator": "k1"},
}


@pytest.mark.parametrize("loss_agg, micro_batch, variant", [
    *[(agg, mb, {}) for agg in ("seq-mean", "token-mean", "constant") for mb in (1, 2, 3)],  # GRPO
    *[pytest.param(agg, 3, kw, id=f"{agg}-3-{name}") for name, kw in LOSS_VARIANTS.items()
      for agg in ("seq-mean", "token-mean", "constant")],
])
def test_micro_batch_gradients_sum_to_the_full_batch_gradient(loss_agg, micro_batch, variant):
    """grpo.py accumulates micro-batch gradients with weight w = (tokens in the micro-batch / tokens
    in the batch) for token-mean and (rows in the micro-batch / B) otherwise, and passes the
    constant max_len = --max-new-tokens. The sum must equal the full-batch gradient, with clipping
    active (ρ ≠ 1), per-token advantages and a KL term, for GRPO and each variant of the loss."""
    model = random_llama(seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, c_mask, T = batch_with_different_lengths()
    B = ids.shape[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logp0, _ = common.token_logprobs(model, ids, mask, T)
    old = logp0 + 0.3 * torch.randn(B, T, generator=g)  # ρ = exp(logp − old) spread around 1
    ref = logp0 + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)  # per-token (as in process supervision)
    kw = dict(beta=0.1, epsilon=0.2, loss_agg=loss_agg, max_len=6)
    kw.update(variant)

    logp, _ = common.token_logprobs(model, ids, mask, T)
    full_loss, m = grpo_loss(logp, old, adv, c_mask, ref, **kw)
    full = flat_grad(full_loss, params, retain_graph=False)
    assert m["clip_frac"].item() > 0  # the clip (or CISPO's cap) is active somewhere

    summed, loss_sum = torch.zeros_like(full), 0.0
    n_tokens = c_mask.sum()
    for i in range(0, B, micro_batch):  # as in grpo.py's training loop
        sl = slice(i, i + micro_batch)
        lp, _ = common.token_logprobs(model, ids[sl], mask[sl], T)
        loss, _ = grpo_loss(lp, old[sl], adv[sl], c_mask[sl], ref[sl], **kw)
        w = (c_mask[sl].sum() / n_tokens) if loss_agg == "token-mean" else (lp.shape[0] / B)
        summed += flat_grad(loss * w, params, retain_graph=False)
        loss_sum += (loss * w).item()
    assert loss_sum == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(summed, full, atol=1e-6, rtol=1e-4)


def test_kl_term_value_and_gradient_sign():
    # One token, Â = 0, ρ = 1: ℓ = −β D_KL, so loss = β (e^{ref−logp} − (ref − logp) − 1).
    #   logp = −1, ref = 0: ref − logp = 1 -> loss = β (e − 2); metrics["kl"] = e − 2
    #   dL/dlogp = β (1 − e^{ref−logp}) = β (1 − e) < 0: descending raises logp toward ref
    for beta in (0.04, 0.5):
        logp = torch.tensor([[-1.0]], requires_grad=True)
        loss, m = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 1),
                            ref_logp=torch.tensor([[0.0]]), beta=beta)
        loss.backward()
        assert loss.item() == pytest.approx(beta * (E - 2), rel=1e-6)
        assert m["kl"].item() == pytest.approx(E - 2, rel=1e-6)
        assert logp.grad.item() == pytest.approx(beta * (1 - E), rel=1e-6)
    #   logp = 0, ref = −1: ref − logp = −1 -> dL/dlogp = β (1 − e^{−1}) > 0: descending lowers logp
    logp = torch.tensor([[0.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 1),
                        ref_logp=torch.tensor([[-1.0]]), beta=0.5)
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.5 * (1 - 1 / E), rel=1e-6)
    # β = 0 or no reference: no KL term at all, and the metric is 0
    for kw in ({"ref_logp": torch.tensor([[0.0]]), "beta": 0.0}, {"ref_logp": None, "beta": 0.1}):
        loss, m = grpo_loss(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.zeros(1),
                            torch.ones(1, 1), **kw)
        assert loss.item() == 0.0 and m["kl"].item() == 0.0


def test_kl_term_pulls_the_policy_toward_the_reference():
    """With Â = 0 the loss is β · mean k3, so a small gradient step lowers the KL to the reference,
    and the step with twice the β lowers it about twice as much (the gradient is linear in β)."""
    ids, mask, c_mask, T = batch_with_different_lengths()
    with torch.no_grad():
        ref_logp, _ = common.token_logprobs(random_llama(seed=6), ids, mask, T)

    def kl_drop(beta: float, lr: float = 0.02) -> tuple[float, float]:
        policy = random_llama(seed=6)
        with torch.no_grad():  # move the policy away from the reference
            for i, p in enumerate(policy.parameters()):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        kls = []
        for _ in range(2):
            logp, _ = common.token_logprobs(policy, ids, mask, T)
            loss, m = grpo_loss(logp, logp.detach(), torch.zeros(4), c_mask, ref_logp, beta=beta)
            kls.append(m["kl"].item())
            policy.zero_grad()
            loss.backward()
            with torch.no_grad():  # one plain gradient step θ ← θ − lr ∇L
                for p in policy.parameters():
                    p -= lr * p.grad
        return kls[0], kls[0] - kls[1]

    start, drop = kl_drop(0.5)
    start2, drop2 = kl_drop(1.0)
    assert start == start2 and start > 1e-3
    assert drop > 0 and drop2 > 0  # toward the reference
    assert drop2 == pytest.approx(2 * drop, rel=0.1)


#####################################################################################################
#####  the training loop in-process: micro-batches do not change the update
#####################################################################################################


@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean", "constant"])
def test_train_micro_batch_matches_full_batch(loss_agg, tiny_path, tmp_path):
    """One GRPO step of grpo.train with --micro-batch 1 logs the same loss, gradient norm and
    statistics as with the whole batch at once (μ = 2, β > 0, so old and ref log-probs are used).
    Temperature 1.5 makes the completions differ in length, where a wrong weighting would show."""
    rows = {}
    for mb in (None, 1):
        args = grpo.Args(steps=1, prompts_per_step=4, group_size=4, eval_size=2, mu=2, beta=0.04,
                         temperature=1.5, loss_agg=loss_agg, micro_batch=mb, save_model=False,
                         out_dir=str(tmp_path / f"mb{mb}"))
        grpo.train(args)
        lines = (tmp_path / f"mb{mb}" / "metrics.jsonl").read_text().splitlines()
        rows[mb] = json.loads(lines[1])
    full, micro = rows[None], rows[1]
    assert full["step"] == micro["step"] == 1
    assert full["reward/mean"] == micro["reward/mean"]  # the same samples
    # the check is not vacuous: a gradient, and completions of different lengths
    assert full["policy/grad_norm"] > 0 and full["kl/ref"] > 0
    assert full["completions/mean_length"] != int(full["completions/mean_length"])
    for key in ("loss/policy", "policy/grad_norm", "kl/ref", "policy/clip_frac", "policy/ratio_mean",
                "policy/entropy"):
        assert micro[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key


#####################################################################################################
#####  the script: bad input and short runs, as subprocesses (started together on a small pool)
#####################################################################################################

SHORT = ["--steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "2",
         "--eval-size", "20"]


def selected_jobs(session) -> set[str]:
    """The subprocess jobs that the selected tests need: their `job` marker, or their `name` param."""
    names: set[str] = set()
    for item in session.items:
        for mark in item.iter_markers("job"):
            names.update(mark.args)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "runs" in item.fixturenames and "name" in callspec.params:
            names.add(callspec.params["name"])
    return names


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, tiny_path, tiny_random_other_arch, run_script):
    """Start the subprocesses that the selected tests need, all at once on a small pool (the runs
    are short, so most of their time is Python start-up), and hand each test its own result:
    {name: (out_dir, future of CompletedProcess)}."""
    base = tmp_path_factory.mktemp("grpo_runs")
    train = tasks.arithmetic_task()[0]
    data = base / "task.jsonl"  # a small --data file: 30 rows, 6 held out
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": int(r["answer"])}) + "\n"
                            for r in train[:30]))
    bad = base / "bad.jsonl"  # line 2 is cut short
    bad.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2=", "answer": 4\n')

    jobs = {
        # bad input: each must fail before doing any work
        "bad_group_size": ["--group-size", "1"],
        "bad_epsilon": ["--epsilon", "0"],
        "bad_beta": ["--beta", "-1"],
        "bad_loss_agg": ["--loss-agg", "bogus"],
        "bad_data": ["--data", str(bad)],
        "bad_model": ["--model", "/nonexistent/model"],
        "bad_chat_template": ["--chat-template"],  # `tiny`'s tokenizer has no chat template
        # short runs
        "default": SHORT,
        "other_arch": SHORT + ["--model", str(tiny_random_other_arch)],
        "process": SHORT + ["--reward", "process"],
        # also the GPU path's autocast (bfloat16 forward passes over fp32 weights), run on the CPU
        "beta_mu": SHORT + ["--beta", "0.04", "--mu", "2", "--dtype", "bfloat16"],
        "data": SHORT + ["--data", str(data)],
    }

    def run(name, argv):
        result = run_script("grpo.py", *argv, "--out-dir", str(base / name))
        if name != "default":
            return result
        # then the same command again into the same folder, without --overwrite
        return result, run_script("grpo.py", *argv, "--out-dir", str(base / name))

    wanted = selected_jobs(request.session)
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    futures = {name: (base / name, pool.submit(run, name, argv))
               for name, argv in jobs.items() if name in wanted}
    yield futures
    pool.shutdown(wait=True)


def one_line_error(result, must_name: str):
    """A clear failure: non-zero exit, no traceback, and the last stderr line names the problem."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "error" in lines[-1] and must_name in lines[-1], result.stderr
    return lines


@pytest.mark.parametrize("name, must_name", [
    ("bad_group_size", "--group-size"),
    ("bad_epsilon", "--epsilon"),
    ("bad_beta", "--beta"),
    ("bad_model", "--model /nonexistent/model"),
    ("bad_chat_template", "--chat-template"),
])
def test_bad_input_gives_one_line(runs, name, must_name):
    result = runs[name][1].result()
    lines = one_line_error(result, must_name)
    assert lines == [lines[-1]] and lines[0].startswith("error: "), result.stderr  # exactly one line
    assert result.returncode == 2


@pytest.mark.job("bad_loss_agg")
def test_bad_loss_agg_is_rejected_by_argparse(runs):
    # argparse prints its usage, then one error line naming the flag and the choices
    result = runs["bad_loss_agg"][1].result()
    lines = one_line_error(result, "--loss-agg")
    assert "invalid choice: 'bogus'" in lines[-1] and "seq-mean" in lines[-1]
    assert result.returncode == 2


@pytest.mark.job("bad_data")
def test_bad_jsonl_line_names_file_and_line(runs):
    result = runs["bad_data"][1].result()
    lines = one_line_error(result, "bad.jsonl:2:")
    assert lines == [lines[-1]] and "not valid JSON" in lines[0]


def check_run(out, result, model_type: str):
    """A short run finished, logged, summarised and saved a model that reloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert all("/" in k for k in r if k not in ("step", "time")), r  # namespaced metrics
    for r in rows[1:]:
        for key in ("reward/mean", "reward/std", "reward/frac_zero_std_groups", "loss/policy",
                    "kl/ref", "policy/clip_frac", "policy/entropy", "completions/mean_length"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert 0 <= r["reward/mean"] <= 1 and 1 <= r["completions/mean_length"] <= 4
        # the right (fraction p = reward/batch_mean) and the wrong completions' mean lengths average
        # to the mean length, p·len_correct + (1 − p)·len_incorrect; a kind absent from the batch is None
        p, len_c, len_i = r["reward/batch_mean"], r["completions/len_correct"], r["completions/len_incorrect"]
        assert (len_c is None) == (p == 0) and (len_i is None) == (p == 1), r
        assert p * (len_c or 0) + (1 - p) * (len_i or 0) == pytest.approx(r["completions/mean_length"])
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, 2, 3]  # before training, every 2 steps, and after the last step

    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_accuracy"] == evals[0] and summary["final_accuracy"] == evals[3]
    # what sampling reaches, before and after: k = G, and the same numbers as the logged rows
    for key, row in (("start_pass_at_k", rows[0]), ("final_pass_at_k", rows[-1])):
        p = summary[key]
        assert p["k"] == 2 and 0 <= p["pass_at_1"] <= p["pass_at_k"] <= 1, p
        assert (row["eval/pass@1"], row["eval/pass@2"]) == (p["pass_at_1"], p["pass_at_k"])
    assert 0 <= summary["final_accuracy"] <= 1 and summary["wall_seconds"] > 0
    cfg = summary["config"]
    assert cfg["steps"] == 3 and cfg["group_size"] == 2 and cfg["prompts_per_step"] == 2
    assert set(cfg) == {f for f in grpo.Args.__dataclass_fields__}

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.model_type == model_type
    acc = tasks.greedy_accuracy(model, tok, tasks.arithmetic_task()[1][:8], 4)
    assert 0 <= acc <= 1
    return rows, summary


@pytest.mark.job("default")
def test_short_run_on_the_embedded_model(runs):
    out, fut = runs["default"]
    first, again = fut.result()
    check_run(out, first, "llama")
    assert "GRPO summary" in first.stdout


@pytest.mark.job("default")
def test_rerun_into_the_same_out_dir_refuses(runs):
    out, fut = runs["default"]
    first, again = fut.result()
    assert first.returncode == 0
    lines = one_line_error(again, "--out-dir")
    assert lines == [lines[-1]] and "--overwrite" in lines[0]
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 3  # left intact


@pytest.mark.job("other_arch")
def test_short_run_on_another_architecture(runs):
    out, fut = runs["other_arch"]
    check_run(out, fut.result(), "gpt2")


@pytest.mark.job("process")
def test_short_run_with_process_rewards(runs):
    out, fut = runs["process"]
    _, summary = check_run(out, fut.result(), "llama")
    assert summary["config"]["reward"] == "process"


@pytest.mark.job("beta_mu")
def test_short_run_with_kl_and_inner_iterations(runs):
    out, fut = runs["beta_mu"]
    rows, summary = check_run(out, fut.result(), "llama")
    assert summary["config"]["beta"] == 0.04 and summary["config"]["mu"] == 2
    assert summary["config"]["dtype"] == "bfloat16"
    # the KL is measured on the last inner iteration, after the policy has moved off the reference
    assert all(r["kl/ref"] >= 0 for r in rows[1:]) and max(r["kl/ref"] for r in rows[1:]) > 0


@pytest.mark.job("data")
def test_short_run_with_a_data_file(runs):
    out, fut = runs["data"]
    result = fut.result()
    _, summary = check_run(out, result, "llama")
    assert summary["config"]["data"].endswith("task.jsonl")
    assert "(6 prompts)" in result.stdout  # 30 rows: a fifth (6) held out, scored by the last number
