"""Tests of grpo.py's GRPO family: GSPO's sequence ratio, CISPO, DAPO's dynamic sampling and
overlong shaping, and the k1/k2/k3 estimators of the KL term.

None of these is in the notes; each function's docstring cites its paper. Every expected number
is derived in a comment next to it, so that it can be checked on paper.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import common
import grpo
import harness
from grpo import (cispo_loss, grpo_loss, kl_estimate, merge_rounds, mixed_reward_groups,
                  overlong_penalty, sequence_ratio)
from test_grpo import random_llama

E = math.e


#####################################################################################################
#####  GSPO: the sequence-level ratio
#####################################################################################################


def two_lengths():
    """B = 2, T = 3, log π_old = 0, so log ρ_t = logp_t.
        row 0: |y| = 2, log ρ = [0.2, −0.4, ·]    (the third token is masked out; 9.0 must not leak)
        row 1: |y| = 3, log ρ = [0.3, 0.3, 0.6]"""
    logp = torch.tensor([[0.2, -0.4, 9.0], [0.3, 0.3, 0.6]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp, torch.zeros(2, 3, dtype=torch.float64), mask


def test_sequence_ratio_two_lengths():
    # s_i = exp(1/|y_i| Σ_t log ρ_t):
    #   row 0: (0.2 − 0.4) / 2 = −0.1  -> s_0 = e^−0.1 ≈ 0.904837
    #   row 1: (0.3 + 0.3 + 0.6) / 3 = 0.4 -> s_1 = e^0.4 ≈ 1.491825
    # (the token ratios' product for row 1 is e^1.2 ≈ 3.32: the 1/|y| keeps s near 1)
    logp, old, mask = two_lengths()
    s = sequence_ratio(logp, old, mask)
    torch.testing.assert_close(s, torch.tensor([math.exp(-0.1), math.exp(0.4)], dtype=torch.float64))
    # the gradient: ∂s_i/∂logp_{i,t} = s_i / |y_i| on the sequence's own tokens, 0 elsewhere
    s.sum().backward()
    expected = torch.tensor([[math.exp(-0.1) / 2] * 2 + [0.0], [math.exp(0.4) / 3] * 3], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_gspo_clips_per_sequence_and_every_token_shares_the_ratio():
    # Â = +1 for both rows; ε = ε_high = 0.2 here (easy numbers; GSPO's own default is 3e-4/4e-4).
    #   row 0: s_0 = e^−0.1 ≈ 0.9048, inside [0.8, 1.2]: ℓ = s_0 on both tokens, Σ_t ℓ / |y| = s_0
    #   row 1: s_1 = e^0.4 ≈ 1.4918 > 1.2 with Â > 0: clipped, ℓ = 1.2 on all three tokens
    #   seq-mean: L = −(s_0 + 1.2) / 2
    #   gradient: row 0, each token: −1/B · ∂s_0/∂logp = −½ · s_0/2 = −s_0/4; row 1: 0 (clipped)
    logp, old, mask = two_lengths()
    adv = torch.ones(2, dtype=torch.float64)
    loss, m = grpo_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.2, ratio="sequence")
    loss.backward()
    s0 = math.exp(-0.1)
    assert loss.item() == pytest.approx(-(s0 + 1.2) / 2, rel=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]],
                                                       dtype=torch.float64))
    # the clip fraction counts tokens: row 1's 3 of the 5 real tokens
    assert m["clip_frac"].item() == pytest.approx(3 / 5) and m["clip_frac_high"].item() == pytest.approx(3 / 5)
    # ratio_mean: token mean of the shared ratio, (2 s_0 + 3 s_1) / 5
    assert m["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * math.exp(0.4)) / 5, rel=1e-12)

    # token-level GRPO on the same numbers decides per token instead:
    #   row 0: ρ = e^0.2 ≈ 1.221 > 1.2 (clipped, gradient 0), ρ = e^−0.4 ≈ 0.670 (min(0.670, 0.8) = 0.670,
    #          not clipped: gradient −1/B · 1/|y| · ρ = −e^−0.4 / 4)
    #   row 1: ρ = e^0.3, e^0.3, e^0.6, all > 1.2: gradient 0
    logp2, _, _ = two_lengths()
    loss2, _ = grpo_loss(logp2, old, adv, mask, epsilon=0.2, epsilon_high=0.2, ratio="token")
    loss2.backward()
    torch.testing.assert_close(logp2.grad, torch.tensor([[0.0, -math.exp(-0.4) / 4, 0.0], [0.0, 0.0, 0.0]],
                                                        dtype=torch.float64))


@pytest.mark.parametrize("policy_loss, ratio", [("clip", "sequence"), ("cispo", "token")])
def test_at_ratio_one_gspo_and_cispo_give_grpos_gradient(policy_loss, ratio):
    """On the first inner iteration (log π_old = log π_θ, detached), s_i = ρ_t = 1 and
    ∇(s_i Â_i) = Â_i · 1/|y_i| Σ_t ∇log π_θ(y_t)  and  ∇(sg(1) Â_t log π_θ) = Â_t ∇log π_θ,
    the same per-token weights as GRPO's ∇(ρ_t Â_t) = Â_t ∇log π_θ: equal gradients for every
    aggregation (so at μ = 1 neither variant changes the update)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    for agg in ("seq-mean", "token-mean", "constant"):
        base = torch.randn(4, 4, generator=g, dtype=torch.float64)
        adv = torch.randn(4, generator=g, dtype=torch.float64)
        grads = []
        for kw in ({}, {"policy_loss": policy_loss, "ratio": ratio}):
            logp = base.clone().requires_grad_(True)
            eps = {"epsilon": None, "epsilon_high": 4.0} if kw.get("policy_loss") == "cispo" else {}
            loss, m = grpo_loss(logp, logp.detach(), adv, mask, loss_agg=agg, **kw, **eps)
            loss.backward()
            grads.append(logp.grad)
            assert m["ratio_mean"].item() == pytest.approx(1.0) and m["clip_frac"].item() == 0.0
        assert grads[0].abs().max() > 1e-3
        torch.testing.assert_close(grads[1], grads[0])


#####################################################################################################
#####  CISPO
#####################################################################################################


def cispo_one_token(ratio: float, adv: float, **kw):
    """cispo_loss on one token with log π_old = 0, so ρ = exp(logp). -> (loss, dL/dlogp, metrics)"""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, m = cispo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                         torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_cispo_loss_and_gradient_where_ppo_clip_has_none():
    # L = −sg(w) Â log π_θ with w = clip(ρ, 1−ε_low, 1+ε_high); one token, so the aggregation is the token.
    # dL/dlogp = −w Â (w is detached).
    # ρ = 1.5, Â = +1, ε_low = ε_high = 0.2: w = 1.2; L = −1.2 · log 1.5 ≈ −0.48656; gradient −1.2.
    #   PPO-clip here: min(1.5, 1.2) = 1.2 is the clipped branch, a constant: gradient 0
    #   (test_grpo.py::test_clipped_surrogate_binding_cases).
    loss, grad, m = cispo_one_token(1.5, 1.0, epsilon_low=0.2, epsilon_high=0.2)
    assert loss == pytest.approx(-1.2 * math.log(1.5), rel=1e-12) and grad == pytest.approx(-1.2)
    assert m["clip_frac_high"].item() == 1.0
    _, ppo_grad, _ = ppo_one_token(1.5, 1.0)
    assert ppo_grad == 0.0
    # ρ = 0.5, Â = −1, ε_low = 0.2: w = 0.8; L = −0.8 · (−1) · log 0.5 = 0.8 · (−0.6931) ≈ −0.55452;
    #   gradient −0.8 · (−1) = +0.8 (descending lowers log π of this bad token). PPO-clip: 0.
    loss, grad, m = cispo_one_token(0.5, -1.0, epsilon_low=0.2, epsilon_high=0.2)
    assert loss == pytest.approx(0.8 * math.log(0.5), rel=1e-12) and grad == pytest.approx(0.8)
    assert m["clip_frac_low"].item() == 1.0
    assert ppo_one_token(0.5, -1.0)[1] == 0.0
    # inside the range, ρ = 1.1, Â = +1: w = ρ = 1.1, gradient −1.1, the same as PPO-clip's −ρÂ
    _, grad, m = cispo_one_token(1.1, 1.0, epsilon_low=0.2, epsilon_high=0.2)
    assert grad == pytest.approx(-1.1) and m["clip_frac"].item() == 0.0
    assert ppo_one_token(1.1, 1.0)[1] == pytest.approx(-1.1)


def ppo_one_token(ratio: float, adv: float):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                        torch.ones(1, 1), epsilon=0.2)
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_cispo_defaults_no_lower_bound_and_a_cap_of_five():
    # the defaults: ε_low = None (no lower bound, MiniMax-M1), ε_high = 4 (w ≤ 5)
    # ρ = 0.1, Â = −1: w = 0.1 (not raised): gradient −0.1 · (−1) = +0.1
    _, grad, m = cispo_one_token(0.1, -1.0)
    assert grad == pytest.approx(0.1) and m["clip_frac"].item() == 0.0
    # ρ = 6, Â = +1: w = min(6, 5) = 5: gradient −5
    _, grad, m = cispo_one_token(6.0, 1.0)
    assert grad == pytest.approx(-5.0) and m["clip_frac_high"].item() == 1.0


def test_cispo_token_mean_weights_every_token_alike():
    # B = 2, T = 3, log π_old = 0, masks of lengths 3 and 2, weights inside the cap (ρ < 5):
    #   L = −Σ_i Σ_t ρ_t Â_i logp_t / Σ|y|, Σ|y| = 5;   dL/dlogp_t = −ρ_t Â_i / 5 (masked: 0)
    ratio = torch.tensor([[1.0, 1.1, 0.9], [1.1, 0.9, 5.0]], dtype=torch.float64)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = cispo_loss(logp, torch.zeros(2, 3, dtype=torch.float64), adv, mask)
    loss.backward()
    expected_loss = -(ratio * adv[:, None] * ratio.log() * mask).sum() / 5
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    torch.testing.assert_close(logp.grad, -ratio * adv[:, None] * mask / 5)


#####################################################################################################
#####  DAPO: overlong shaping and dynamic sampling
#####################################################################################################


def test_cispo_defaults_to_the_papers_token_mean_unless_loss_agg_is_given():
    # MiniMax-M1 (§3.1) and TRL's loss_type="cispo" divide by the batch's token count; the notes'
    # GRPO averages per sequence first. --loss-agg, when given, wins.
    assert grpo.loss_agg_of(grpo.Args()) == "seq-mean"
    assert grpo.loss_agg_of(grpo.Args(policy_loss="cispo")) == "token-mean"
    assert grpo.loss_agg_of(grpo.Args(policy_loss="cispo", loss_agg="seq-mean")) == "seq-mean"
    assert grpo.loss_agg_of(grpo.Args(loss_agg="constant")) == "constant"
    assert grpo.loss_agg_of(harness.parse_args(grpo.Args, ["--policy-loss", "cispo"])) == "token-mean"


def test_overlong_penalty_at_the_buffer_edges():
    # L_max = 6, L = 2: the buffer is |y| ∈ (4, 6]; R = ((L_max − L) − |y|) / L there.
    #   |y| = 3, 4 -> 0 (4 = L_max − L is the last length without penalty)
    #   |y| = 5    -> (4 − 5) / 2 = −0.5
    #   |y| = 6    -> (4 − 6) / 2 = −1   (= L_max, the limit: the full penalty)
    #   |y| = 7    -> −1 (past L_max; generation never gets there, the formula's third case)
    lengths = torch.tensor([3, 4, 5, 6, 7])
    assert overlong_penalty(lengths, 6, 2).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    # c = 0.5 scales it: [0, 0, −0.25, −0.5, −0.5]
    assert overlong_penalty(lengths, 6, 2, penalty=0.5).tolist() == [0.0, 0.0, -0.25, -0.5, -0.5]
    # L = 1: only |y| = L_max is punished, by −c
    assert overlong_penalty(lengths, 6, 1).tolist() == [0.0, 0.0, 0.0, -1.0, -1.0]
    # L = L_max = 4: −|y|/4 from the first token: |y| = 1 -> −0.25, 2 -> −0.5, 4 -> −1
    assert overlong_penalty(torch.tensor([1, 2, 4]), 4, 4).tolist() == [-0.25, -0.5, -1.0]
    # L = 0: off
    assert overlong_penalty(lengths, 6, 0).tolist() == [0.0] * 5


def test_dynamic_sampling_keeps_only_groups_with_mixed_rewards():
    # G = 4, five groups:
    #   [1, 1, 1, 1]  all right -> Â = 0 everywhere: dropped
    #   [0, 1, 0, 0]  mixed: kept
    #   [0, 0, 0, 0]  all wrong: dropped
    #   [0.5] × 4     all equal (any value): dropped
    #   [1, 1, 0.5, 1] not all equal: kept (the function sees values; dynamic sampling gives it the
    #                  task's 0/1 scores, never the overlong-shaped reward: see the test below)
    r = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 1, 1, 0.5, 1])
    assert mixed_reward_groups(r, 4).tolist() == [False, True, False, False, True]
    # and the group advantage of a dropped group is exactly 0, of a kept one not
    adv = grpo.group_advantages(r, 4).view(5, 4)
    assert (adv.abs().sum(1) > 0).tolist() == [False, True, False, False, True]


def test_dynamic_sampling_filters_on_correctness_not_on_the_overlong_shaped_reward():
    # G = 4, --overlong-buffer on; two groups, each with one completion 0.5 into the buffer:
    #   scores [0, 0, 0, 0], shaped [0, 0, 0, −0.5]: no right answer. On the shaped reward the group
    #     looks mixed (and its Â is not 0); DAPO's 0 < #correct < G drops it.
    #   scores [1, 1, 1, 1], shaped [1, 1, 0.5, 1]: all right: dropped too.
    #   scores [0, 1, 0, 0]: one right: kept.
    scores = torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0])
    shaped = torch.tensor([0.0, 0, 0, -0.5, 1, 1, 0.5, 1, 0, 1, 0, 0])
    assert mixed_reward_groups(shaped[:4], 4).tolist() == [True]  # what filtering on the shaped reward did
    args = grpo.Args(dynamic_sampling=True, group_size=4, max_new_tokens=6, overlong_buffer=2)
    r = dict(scores=scores, shaped=shaped)
    assert grpo.groups_to_keep(r, args, tok=None).tolist() == [False, False, True]


def test_dynamic_sampling_under_process_rewards_filters_on_the_step_rewards():
    """--reward process: a group is dropped exactly when its advantage is 0 everywhere, i.e. when
    its step rewards are all equal, whatever the outcome scores say.
    G = 2, answer "12" (tokens 1, 2; EOS 9), so each completion token is a step rewarded by
    `digit_step_rewards`:
      group 1: "1 3 <eos>" -> steps [1, 0, 1]; "4 2 <eos>" -> [0, 1, 1]. Both wrong (score 0), but the
               steps differ: mean 4/6, Â ≠ 0. Kept (an outcome filter would drop it).
      group 2: "5 <eos>" -> [0, 0]; "6 <eos>" -> [0, 0]: every step 0, Â = 0. Dropped.
      group 3: "1 2 <eos>" -> [1, 1, 1]; "1 2 <eos>" -> [1, 1, 1]: every step 1, Â = 0. Dropped."""
    class Tok:
        eos_token_id = 9

        def encode(self, text, add_special_tokens=False):
            return [int(ch) for ch in text]
    c_ids = torch.tensor([[1, 3, 9], [4, 2, 9], [5, 9, 0], [6, 9, 0], [1, 2, 9], [1, 2, 9]])  # [6, 3]
    c_mask = common.completion_mask(c_ids, 9)  # [6, 3]
    r = dict(c_ids=c_ids, c_mask=c_mask, answers=["12"] * 6, scores=torch.tensor([0.0, 0, 0, 0, 1, 1]))
    args = grpo.Args(dynamic_sampling=True, group_size=2, reward="process")
    assert grpo.groups_to_keep(r, args, Tok()).tolist() == [True, False, False]
    steps = grpo.process_rewards(Tok(), r)  # [6, 3]
    assert steps[:2].tolist() == [[1, 0, 1], [0, 1, 1]]
    adv = grpo.process_advantages(steps, c_mask, 2).view(3, -1)  # [3, 2·3]
    assert (adv.abs().sum(1) > 0).tolist() == [True, False, False]  # the same groups
    assert mixed_reward_groups(r["scores"], 2).tolist() == [False, False, False]  # the outcome filter's


def fake_round(prompts: list[list[int]], completions: list[list[int]], scores: list[float], tag: str):
    """A sampling round as grpo.train's sample_round returns it, from token lists (pad 0, EOS 1)."""
    p_ids, p_mask = common.left_pad(prompts, 0)  # [b, P]
    T = max(len(c) for c in completions)
    c_ids = torch.tensor([c + [0] * (T - len(c)) for c in completions])  # [b, T]
    c_mask = common.completion_mask(c_ids, 1)
    s = torch.tensor(scores)
    return dict(p_ids=p_ids, p_mask=p_mask, c_ids=c_ids, c_mask=c_mask, finished=[True] * len(s),
                answers=[f"{tag}{i}" for i in range(len(s))], scores=s, shaped=s)  # answers tag the rows


def test_merge_rounds_pads_and_keeps_whole_groups_in_order():
    """Two rounds of G = 2 with different prompt and completion widths. Round A keeps its second
    group, round B both: the batch is capped at 4 rows, so it holds A's group 2 and B's group 1.
    The merged rows' log-probs under a model equal those of the rows in their own rounds: left
    padding of prompts and right padding of completions do not change them (position ids come
    from the mask)."""
    a = fake_round([[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]], [[10, 1], [11, 1], [12, 13, 1], [1]],
                   [0, 0, 1, 0], "a")
    b = fake_round([[4], [4], [5], [5]], [[14, 15, 16, 1], [1], [17, 1], [18, 1]], [1, 0, 0, 1], "b")
    keep_a = mixed_reward_groups(a["shaped"], 2).repeat_interleave(2)  # groups [F, T] -> rows 2, 3
    keep_b = mixed_reward_groups(b["shaped"], 2).repeat_interleave(2)  # groups [T, T]
    assert keep_a.tolist() == [False, False, True, True] and keep_b.all()
    batch = merge_rounds([(a, keep_a), (b, keep_b)], 4, 0)
    assert batch["answers"] == ["a2", "a3", "b0", "b1"] and batch["scores"].tolist() == [1, 0, 1, 0]
    assert batch["p_ids"].shape == (4, 3) and batch["c_ids"].shape == (4, 4)
    assert batch["p_ids"][2].tolist() == [0, 0, 4] and batch["p_mask"][2].tolist() == [0, 0, 1]
    assert batch["c_ids"][0].tolist() == [12, 13, 1, 0] and batch["c_mask"][0].tolist() == [1, 1, 1, 0]

    model = random_llama(seed=3)
    with torch.no_grad():
        ids, mask = common.concat_prompt_completion(batch["p_ids"], batch["p_mask"], batch["c_ids"], batch["c_mask"])
        merged, _ = common.token_logprobs(model, ids, mask, 4)  # [4, 4]
        for rows, r, src in (([0, 1], a, [2, 3]), ([2, 3], b, [0, 1])):
            ids_r, mask_r = common.concat_prompt_completion(r["p_ids"], r["p_mask"], r["c_ids"], r["c_mask"])
            own, _ = common.token_logprobs(model, ids_r, mask_r, r["c_ids"].shape[1])
            T_r = r["c_ids"].shape[1]
            torch.testing.assert_close(merged[rows, :T_r] * batch["c_mask"][rows, :T_r],
                                       own[src] * r["c_mask"][src], atol=1e-5, rtol=1e-5)
    assert merge_rounds([(a, torch.zeros(4, dtype=torch.bool))], 4, 0) is None


#####################################################################################################
#####  k1, k2, k3: values by hand, expected gradients by exact enumeration
#####################################################################################################


def test_kl_estimators_values_by_hand():
    # log r = ref − logp.
    # logp = −1, ref = −2: log r = −1 -> k1 = 1, k2 = ½, k3 = e^−1 − 1 + 1 = 1/e ≈ 0.36788
    # logp = −2, ref = −1: log r = +1 -> k1 = −1 (an estimator of a KL can be negative), k2 = ½,
    #                                    k3 = e − 1 − 1 = e − 2 ≈ 0.71828
    # equal: all 0
    logp = torch.tensor([[-1.0, -2.0, -0.7]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -1.0, -0.7]], dtype=torch.float64)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[1 / E, E - 2, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def softmax_example():
    """A 3-action softmax policy π_θ = softmax(θ) and a fixed reference, in float64."""
    theta = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([-0.2, 0.4, 0.0], dtype=torch.float64), 0)  # log π_ref   [3]
    return theta, ref


def test_kl_estimators_expected_values_by_exact_enumeration():
    # E_{y~π}[k(y)] = Σ_y π(y) k(y), every action enumerated.
    #   k1 and k3: exactly KL(π‖π_ref) = Σ π (log π − log π_ref)
    #     (k3: Σ π (π_ref/π − 1 − log(π_ref/π)) = Σ π_ref − 1 + KL = KL)
    #   k2: not KL (biased), but close to it near π_ref
    theta, ref = softmax_example()
    logp = torch.log_softmax(theta, 0)  # [3]
    pi = logp.exp()
    kl = (pi * (logp - ref)).sum()
    e = {k: (pi * kl_estimate(logp, ref, k)).sum() for k in ("k1", "k2", "k3")}
    assert e["k1"].item() == pytest.approx(kl.item(), rel=1e-12)
    assert e["k3"].item() == pytest.approx(kl.item(), rel=1e-12)
    assert abs(e["k2"].item() - kl.item()) > 1e-4 and e["k2"].item() == pytest.approx(kl.item(), rel=0.2)


def test_kl_estimators_expected_gradients_by_exact_enumeration():
    """The gradient that the loss term β·k(y) gives, with the samples y fixed (only log π_θ(y) is
    differentiated), averaged over y ~ π_θ by enumerating the 3 actions:
        ḡ_k = Σ_y π_θ(y) ∇_θ k(log π_θ(y), log π_ref(y))       (π_θ(y) itself held fixed)
    Expected (derivations in kl_estimate's docstring):
        ḡ_k1 = Σ π ∇log π = ∇Σ π = 0
        ḡ_k2 = Σ π (log π − log π_ref) ∇log π = ∇KL(π_θ‖π_ref)
        ḡ_k3 = Σ π (1 − π_ref/π) ∇log π = −Σ π_ref ∇log π = ∇KL(π_ref‖π_θ)
    For a softmax these are closed forms: ∇_θ log π(y) = e_y − π, so
        ∇KL(π_ref‖π_θ) = −Σ_y π_ref(y)(e_y − π) = π − π_ref
        ∇KL(π_θ‖π_ref) = π ⊙ (a − Σ π a), with a = log π − log π_ref.
    So inside GRPO's loss, k3's value estimates KL(π_θ‖π_ref) but its gradient is that of the
    other direction; k2's gradient is the one of the direction it names."""
    theta, ref = softmax_example()
    logp = torch.log_softmax(theta, 0)  # [3]
    pi = logp.exp().detach()  # sampling probabilities: fixed
    expected_grad = {}
    for k in ("k1", "k2", "k3"):
        per_action = kl_estimate(logp, ref, k)  # [3], differentiable through log π_θ(y)
        (g,) = torch.autograd.grad((pi * per_action).sum(), theta, retain_graph=True)
        expected_grad[k] = g

    # the two KL directions, differentiated exactly by autograd
    lp = torch.log_softmax(theta, 0)
    (grad_fwd,) = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)  # ∇KL(π_θ‖π_ref)
    lp = torch.log_softmax(theta, 0)
    (grad_rev,) = torch.autograd.grad((ref.exp() * (ref - lp)).sum(), theta)  # ∇KL(π_ref‖π_θ)
    a = (pi.log() - ref)
    torch.testing.assert_close(grad_fwd, pi * (a - (pi * a).sum()))  # the closed forms
    torch.testing.assert_close(grad_rev, pi - ref.exp())
    assert (grad_fwd - grad_rev).abs().max() > 1e-3  # the directions really differ here

    torch.testing.assert_close(expected_grad["k1"], torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(expected_grad["k2"], grad_fwd)
    torch.testing.assert_close(expected_grad["k3"], grad_rev)


def test_trl_bias_corrected_k3_has_the_expected_gradient_of_kl_pi_to_ref():
    """TRL 1.16's default KL term (use_bias_correction_kl=True) is ρ·k3, with ρ = π_θ/π_old
    differentiable and = 1 on the samples' own policy (π_old = sg(π_θ)). By hand, at ρ = 1:
        ∇(ρ k3) = k3 ∇log π + ∇k3 = (r − 1 − log r) ∇log π + (1 − r) ∇log π = −log r ∇log π
                = (log π − log π_ref) ∇log π = ∇k2          (r = π_ref/π)
    so, enumerating y ~ π_θ over the 3 actions, its expected gradient is ∇KL(π_θ‖π_ref), the
    gradient of k2, and not k3's ∇KL(π_ref‖π_θ)."""
    theta, ref = softmax_example()
    logp = torch.log_softmax(theta, 0)  # [3]
    pi = logp.exp().detach()  # sampling probabilities: fixed
    rho = torch.exp(logp - logp.detach())  # ρ = π_θ/π_old, value 1, gradient ∇log π   [3]
    per_action = rho * kl_estimate(logp, ref, "k3")  # ρ·k3   [3]
    torch.testing.assert_close(per_action, kl_estimate(logp, ref, "k3"))  # the same value at ρ = 1
    (g_trl,) = torch.autograd.grad((pi * per_action).sum(), theta, retain_graph=True)
    (g_k2,) = torch.autograd.grad((pi * kl_estimate(logp, ref, "k2")).sum(), theta, retain_graph=True)
    (g_k3,) = torch.autograd.grad((pi * kl_estimate(logp, ref, "k3")).sum(), theta, retain_graph=True)
    lp = torch.log_softmax(theta, 0)
    (grad_fwd,) = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)  # ∇KL(π_θ‖π_ref)
    a = pi.log() - ref
    torch.testing.assert_close(grad_fwd, pi * (a - (pi * a).sum()))  # the closed form (test above)
    torch.testing.assert_close(g_trl, grad_fwd)
    torch.testing.assert_close(g_trl, g_k2)
    assert (g_trl - g_k3).abs().max() > 1e-3  # and not k3's direction
    # per sample too: ∂(ρ k3)/∂log π(y) = log π(y) − log π_ref(y) = ∂k2/∂log π(y)
    lpy = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    refy = torch.tensor([-2.0, -1.0], dtype=torch.float64)
    (d,) = torch.autograd.grad((torch.exp(lpy - lpy.detach()) * kl_estimate(lpy, refy, "k3")).sum(), lpy)
    torch.testing.assert_close(d, torch.tensor([1.0, -1.0], dtype=torch.float64))  # logp − ref


def test_kl_term_in_the_loss_uses_the_chosen_estimator():
    # one token, Â = 0, ρ = 1: L = β k(logp, ref); logp = −1, ref = 0, so log r = 1
    #   k1: L = β · (−1), dL/dlogp = β               (d(logp − ref)/dlogp = 1)
    #   k2: L = β · ½,    dL/dlogp = β (logp − ref) = −β
    #   k3: L = β (e − 2), dL/dlogp = β (1 − e^{ref − logp}) = β (1 − e)
    # metrics["kl"] is k3 whatever the estimator (e − 2), metrics["kl_estimate"] the estimator's value
    beta = 0.1
    for kind, value, grad in (("k1", -1.0, 1.0), ("k2", 0.5, -1.0), ("k3", E - 2, 1 - E)):
        logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
        loss, m = grpo_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                            ref_logp=torch.tensor([[0.0]], dtype=torch.float64), beta=beta, kl_estimator=kind)
        loss.backward()
        assert loss.item() == pytest.approx(beta * value, rel=1e-12), kind
        assert logp.grad.item() == pytest.approx(beta * grad, rel=1e-12), kind
        assert m["kl"].item() == pytest.approx(E - 2, rel=1e-12)
        assert m["kl_estimate"].item() == pytest.approx(value, rel=1e-12)


#####################################################################################################
#####  micro-batches, flags, and short runs
#####################################################################################################


@pytest.mark.parametrize("flags, must_name", [
    ({"ratio": "sequence", "policy_loss": "cispo"}, "--ratio sequence"),
    ({"overlong_buffer": 5}, "--overlong-buffer"),  # more than --max-new-tokens 4
    ({"overlong_buffer": 1, "reward": "process"}, "--overlong-buffer"),
    ({"overlong_penalty": -1.0}, "--overlong-penalty"),
    ({"max_sample_rounds": 0}, "--max-sample-rounds"),
    ({"gspo_epsilon": 0.0}, "--gspo-epsilon"),
    ({"cispo_epsilon_high": 0.0}, "--cispo-epsilon-high"),
])
def test_bad_variant_flags_are_one_clear_error(flags, must_name):
    with pytest.raises(common.UsageError, match=must_name):
        grpo.validate(grpo.Args(**flags))


def test_short_run_with_dynamic_sampling_and_overlong_shaping(tiny_path, tmp_path, capsys):
    """A short run with DAPO's two sampling-side changes and GSPO off-policy: it logs how many
    completions each step generated, and with a bound of one round per step it trains on the
    mixed groups it has and says so."""
    args = grpo.Args(steps=3, prompts_per_step=4, group_size=4, eval_size=10, eval_every=3, pass_at_k=False,
                     dynamic_sampling=True, max_sample_rounds=1, max_new_tokens=6, overlong_buffer=2,
                     mu=2, ratio="sequence", save_model=False, out_dir=str(tmp_path / "run"))
    summary = grpo.train(args)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["sampling/generations"] for r in rows] == [16, 16, 16]  # one round of 4 prompts × G = 4
    assert summary["completions"] == 48 and summary["completions_per_step"] == 16
    capped = [r["sampling/capped"] for r in rows]
    # a step is capped when its one round had a group of all-equal (shaped) rewards
    assert summary["sample_rounds_capped_steps"] == sum(capped)
    for r in rows:
        assert r["reward/overlong_penalty"] <= 0 and 1 <= r["completions/mean_length"] <= 6
        assert 0 <= r["policy/clip_frac"] <= 1 and math.isfinite(r["loss/policy"])
    if sum(capped):
        assert "--max-sample-rounds 1 reached" in capsys.readouterr().out
