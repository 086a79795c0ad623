"""Tests of ppo.py: the maths by hand, the value model, then the script end to end.

Notes `004_e77bb721393eb42b.txt`, "Generalized Advantage Estimator", "PPO - CLIP", "PPO - Penalty"
and "PPO's Advantage Estimator"; `000_e75205f5b80b652d.txt`, "GAE" (the λ = 0 and λ = 1 cases) and
"RLHF + PPO"; for --policy-loss kl-penalty and trpo, `004` "TRPO" and "PPO - Penalty", `000` "TRPO". Every expected number is derived in a comment next to it, so that it can be checked
on paper. Throughout,

    δ_t = r_t + γ V(s_{t+1}) − V(s_t),   Â_t = Σ_l (γλ)^l δ_{t+l},   R_t = Â_t + V(s_t),
    V = 0 after a row's last real token (terminal),   ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t).

The end-to-end runs share one small reward model (5 steps of reward_model.py), trained once per
session; the no `--reward-model` path uses the shipped `models/tiny-pref-rm`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import harness
import tasks
from models.build import build_char_tokenizer, build_word_tokenizer
import ppo
import reward_model as rm_lib
from ppo import (ValueModel, adaptive_beta, clipped_value_loss, conjugate_gradient, explained_variance,
                 fisher_vector_product, gae, kl_shaped_rewards, policy_kl, ppo_clip_loss, ppo_penalty_loss,
                 proportional_beta, trpo_step, value_model_from_reward_model)

NAN, INF = float("nan"), float("inf")


def random_llama(seed: int = 0, vocab: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
COMPLETIONS = [[10, 11, 12, 1], [13, 1], [14, 15, 1], [1]]  # lengths 4, 2, 3, 1 (EOS = 1)


def batch_with_different_lengths():
    """[left-padded prompt | right-padded completion], B = 4, completion lengths 4, 2, 3 and 1.
    Returns ids, mask [B, P+T], completion mask [B, T], T."""
    p_ids, p_mask = common.left_pad(PROMPTS, 0)  # [4, 3]
    c_ids = torch.tensor([c + [0] * (4 - len(c)) for c in COMPLETIONS])  # [4, 4]
    c_mask = common.completion_mask(c_ids, 1)  # lengths 4, 2, 3, 1
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [4, 7]
    return ids, mask, c_mask, c_ids.shape[1]


def row(*xs) -> torch.Tensor:
    return torch.tensor([[float(x) for x in xs]])  # [1, T]


#####################################################################################################
#####  GAE
#####################################################################################################


def test_gae_sparse_terminal_reward():
    # γ = 1, λ = 0.95, V = 0, r = [0, 0, 1]: with V = 0, δ_t = r_t, so backwards
    #   Â_2 = δ_2 = 1
    #   Â_1 = δ_1 + γλ Â_2 = 0 + 0.95 · 1 = 0.95
    #   Â_0 = δ_0 + γλ Â_1 = 0 + 0.95 · 0.95 = 0.9025
    # and R_t = Â_t + V(s_t) = Â_t.
    adv, ret = gae(row(0, 0, 1), row(0, 0, 0), torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert adv[0].tolist() == pytest.approx([0.9025, 0.95, 1.0], abs=1e-7)
    assert torch.equal(ret, adv)


# the hand example of the next three tests: V = [0.5, −0.2, 0.3], r = [0.1, 0, 1], V(s_3) = 0 (terminal)
V_HAND, R_HAND = row(0.5, -0.2, 0.3), row(0.1, 0.0, 1.0)


def test_gae_lambda_0_is_the_td_residual():
    # λ = 0: Â_t = δ_t (γ = 1):
    #   δ_0 = 0.1 + (−0.2) − 0.5 = −0.6
    #   δ_1 = 0   + 0.3 − (−0.2) = 0.5
    #   δ_2 = 1   + 0 (terminal) − 0.3 = 0.7
    #   R = Â + V = [−0.6 + 0.5, 0.5 − 0.2, 0.7 + 0.3] = [−0.1, 0.3, 1.0]  (the one-step TD target r + V')
    adv, ret = gae(R_HAND, V_HAND, torch.ones(1, 3), gamma=1.0, lam=0.0)
    assert adv[0].tolist() == pytest.approx([-0.6, 0.5, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([-0.1, 0.3, 1.0], abs=1e-6)
    # γ = 0.9, λ = 0: δ_0 = 0.1 + 0.9 · (−0.2) − 0.5 = −0.58
    #                 δ_1 = 0.9 · 0.3 + 0.2 = 0.47;  δ_2 = 0.7
    adv, _ = gae(R_HAND, V_HAND, torch.ones(1, 3), gamma=0.9, lam=0.0)
    assert adv[0].tolist() == pytest.approx([-0.58, 0.47, 0.7], abs=1e-6)


def test_gae_lambda_1_is_the_monte_carlo_return_minus_v():
    # λ = 1, γ = 1: Â_t = Σ_{l≥0} r_{t+l} − V(s_t) (the V terms telescope, V after the end is 0):
    #   G = [0.1 + 0 + 1, 0 + 1, 1] = [1.1, 1.0, 1.0]
    #   Â = G − V = [1.1 − 0.5, 1.0 + 0.2, 1.0 − 0.3] = [0.6, 1.2, 0.7]
    #   (check with the δ of λ = 0: −0.6 + 0.5 + 0.7 = 0.6, 0.5 + 0.7 = 1.2, 0.7)
    #   R = Â + V = G, the Monte Carlo return
    adv, ret = gae(R_HAND, V_HAND, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.6, 1.2, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([1.1, 1.0, 1.0], abs=1e-6)
    # λ = 1, γ = 0.9: G_t = Σ_l 0.9^l r_{t+l}: G_2 = 1, G_1 = 0 + 0.9 · 1 = 0.9, G_0 = 0.1 + 0.9 · 0.9 = 0.91
    #   Â = G − V = [0.91 − 0.5, 0.9 + 0.2, 1 − 0.3] = [0.41, 1.1, 0.7]
    adv, ret = gae(R_HAND, V_HAND, torch.ones(1, 3), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.41, 1.1, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.91, 0.9, 1.0], abs=1e-6)


def test_gae_discounted_gamma_0_9_lambda_0_5():
    # γ = 0.9, λ = 0.5, so γλ = 0.45; the δ are those of γ = 0.9 above: [−0.58, 0.47, 0.7]
    #   Â_2 = 0.7
    #   Â_1 = 0.47 + 0.45 · 0.7 = 0.47 + 0.315 = 0.785
    #   Â_0 = −0.58 + 0.45 · 0.785 = −0.58 + 0.35325 = −0.22675
    #   R = Â + V = [−0.22675 + 0.5, 0.785 − 0.2, 0.7 + 0.3] = [0.27325, 0.585, 1.0]
    adv, ret = gae(R_HAND, V_HAND, torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.22675, 0.785, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.27325, 0.585, 1.0], abs=1e-6)


def test_gae_returns_at_the_default_lambda_are_the_lambda_return_not_the_monte_carlo_return():
    # The critic's target R_t = Â_t + V_old(s_t) at the default λ = 0.95 (γ = 1) is the λ-return
    #   R_t = r_t + γ((1 − λ) V(s_{t+1}) + λ R_{t+1}),  R after the last token = 0,
    # which equals the notes' return r_t + ... + r_T (004, "PPO's Advantage Estimator") only at λ = 1.
    # With the δ of λ = 0 above, [−0.6, 0.5, 0.7]:
    #   Â_2 = 0.7;  Â_1 = 0.5 + 0.95 · 0.7 = 1.165;  Â_0 = −0.6 + 0.95 · 1.165 = 0.50675
    #   R = Â + V = [0.50675 + 0.5, 1.165 − 0.2, 0.7 + 0.3] = [1.00675, 0.965, 1.0]
    # and by the λ-return recursion: R_2 = 1;  R_1 = 0 + 0.05 · 0.3 + 0.95 · 1 = 0.965;
    #   R_0 = 0.1 + 0.05 · (−0.2) + 0.95 · 0.965 = 0.1 − 0.01 + 0.91675 = 1.00675.
    # The Monte Carlo return is G = [1.1, 1.0, 1.0]: R_0 and R_1 differ from it.
    adv, ret = gae(R_HAND, V_HAND, torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert adv[0].tolist() == pytest.approx([0.50675, 1.165, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([1.00675, 0.965, 1.0], abs=1e-6)
    assert ppo.Args().lam == 0.95  # the default this test is about
    assert abs(ret[0, 0].item() - 1.1) > 0.09 and abs(ret[0, 1].item() - 1.0) > 0.03


def test_gae_padded_batch_equals_each_row_alone():
    """Right-padded rows of lengths 3, 2, 5 and 0. The padding holds huge numbers, inf and NaN
    (gae selects them away with `where`, it never multiplies them by 0), and must neither reach a
    real position nor come back as anything but 0."""
    rewards = torch.tensor([[0.1, 0.0, 1.0, 1e30, NAN],
                            [0.2, -1.0, NAN, INF, -INF],
                            [0.0, 0.5, 0.0, -0.3, 1.0],
                            [NAN, INF, 1e30, 5.0, 5.0]])
    values = torch.tensor([[0.5, -0.2, 0.3, INF, -1e30],
                           [1.0, 2.0, 1e30, NAN, NAN],
                           [0.1, 0.2, 0.3, 0.4, 0.5],
                           [INF, NAN, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    lengths = mask.sum(1).tolist()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()  # exactly 0 at padding
        for k, n in enumerate(lengths):
            if n == 0:
                continue
            alone_adv, alone_ret = gae(rewards[k:k + 1, :n], values[k:k + 1, :n], torch.ones(1, n), gamma, lam)
            torch.testing.assert_close(adv[k:k + 1, :n], alone_adv, rtol=0, atol=1e-7)
            torch.testing.assert_close(ret[k:k + 1, :n], alone_ret, rtol=0, atol=1e-7)
    # row 0 at γ = 1, λ = 0.95 by hand (its r and V are the hand example): δ = [−0.6, 0.5, 0.7]
    #   Â_2 = 0.7;  Â_1 = 0.5 + 0.95 · 0.7 = 1.165;  Â_0 = −0.6 + 0.95 · 1.165 = 0.50675
    adv, _ = gae(rewards, values, mask, 1.0, 0.95)
    assert adv[0, :3].tolist() == pytest.approx([0.50675, 1.165, 0.7], abs=1e-6)


#####################################################################################################
#####  the KL-shaped per-token reward
#####################################################################################################


def kl_example():
    # row 0 finished (EOS at t = 2), row 1 hit the token limit without EOS (mask all ones),
    # row 2 has an empty mask. The padding holds NaN, inf and nonsense.
    logp = torch.tensor([[-1.0, -2.0, -0.5, NAN], [-1.0, -1.0, -1.0, -1.0], [NAN, INF, -INF, 3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -INF], [-1.0, -2.0, -0.5, -1.0], [0.0, NAN, 1.0, -INF]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    scores = torch.tensor([2.0, -0.5, 5.0])
    return scores, logp, ref, mask


def test_kl_shaped_rewards_k1_by_hand():
    # β = 0.1, k1: KL_t = log π_old − log π_ref, r_t = −β KL_t + s · 1[t = last masked token]
    #   row 0: KL = [−1 + 1.5, −2 + 1, −0.5 + 0.5, pad] = [0.5, −1, 0, 0]
    #          r  = [−0.05, +0.1, 0 + 2.0 (score at the EOS, t = 2), 0]
    #   row 1: KL = [0, −1 + 2, −1 + 0.5, 0] = [0, 1, −0.5, 0]
    #          r  = [0, −0.1, +0.05, 0 − 0.5 (score at the last sampled token, t = 3)]
    #   row 2: empty mask: all zeros, and its score 5.0 lands nowhere
    scores, logp, ref, mask = kl_example()
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, beta=0.1, kl_estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.0, 1.0, -0.5, 0.0], [0.0] * 4]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0],
                                                      [0.0, -0.1, 0.05, -0.5],
                                                      [0.0, 0.0, 0.0, 0.0]]))
    # Σ_t r_t = s − β Σ_t KL_t, the notes' R(x, y) = r_φ − β log π/π_ref:
    #   row 0: 2 − 0.1 · (0.5 − 1 + 0) = 2.05;  row 1: −0.5 − 0.1 · (0 + 1 − 0.5) = −0.55;  row 2: 0
    assert rewards.sum(1).tolist() == pytest.approx([2.05, -0.55, 0.0], abs=1e-6)
    # and so, with V = 0 and γ = λ = 1, the first token's advantage is that whole R(x, y)
    adv, _ = gae(rewards, torch.zeros(3, 4), mask, 1.0, 1.0)
    assert adv[:, 0].tolist() == pytest.approx([2.05, -0.55, 0.0], abs=1e-6)
    # β = 0: the score alone, at the last token
    rewards0, _ = kl_shaped_rewards(scores, logp, ref, mask, beta=0.0)
    assert rewards0.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -0.5], [0.0] * 4]


def test_kl_shaped_rewards_k3_by_hand():
    # k3: x = log π_ref − log π_old, KL_t = e^x − 1 − x (never negative)
    #   row 0: x = [−0.5, 1, 0]: e^{−0.5} − 1 + 0.5 = 0.6065307 − 0.5 = 0.1065307
    #                            e^1 − 1 − 1 = 2.7182818 − 2 = 0.7182818;   e^0 − 1 − 0 = 0
    #   row 1: x = [0, −1, 0.5, 0]: 0;  e^{−1} − 1 + 1 = 0.3678794;
    #                               e^{0.5} − 1.5 = 1.6487213 − 1.5 = 0.1487213;  0
    #   r = −0.1 · KL, plus the scores as in k1
    scores, logp, ref, mask = kl_example()
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, beta=0.1, kl_estimator="k3")
    torch.testing.assert_close(kl, torch.tensor([[0.1065307, 0.7182818, 0.0, 0.0],
                                                 [0.0, 0.3678794, 0.1487213, 0.0], [0.0] * 4]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.01065307, -0.07182818, 2.0, 0.0],
                                                      [0.0, -0.03678794, -0.01487213, -0.5],
                                                      [0.0] * 4]))
    assert (kl >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_shaped_rewards(scores, logp, ref, mask, 0.1, kl_estimator="k2")


#####################################################################################################
#####  PPO-clip
#####################################################################################################

# (Â, ρ, loss, d loss / d log π_θ, clip binds), ε = 0.2, so the range is [0.8, 1.2]. One token,
# so the mean is that token: loss = −min(ρÂ, clip(ρ, 0.8, 1.2) Â). Where the unclipped term is
# taken, d(−ρÂ)/d log π_θ = −ρÂ (dρ/d log π_θ = ρ); where the clipped one is, it is a constant: 0.
CLIP_CASES = [
    # Â > 0, ρ inside:     min(1.1·2, 1.1·2) = 2.2                 -> loss −2.2, grad −1.1·2 = −2.2
    (2.0, 1.1, -2.2, -2.2, False),
    # Â > 0, ρ > 1 + ε:    min(1.5·2 = 3.0, 1.2·2 = 2.4) = 2.4     -> loss −2.4, clipped: grad 0
    (2.0, 1.5, -2.4, 0.0, True),
    # Â > 0, ρ < 1 − ε:    min(0.5·2 = 1.0, 0.8·2 = 1.6) = 1.0     -> loss −1.0, grad −0.5·2 = −1.0
    (2.0, 0.5, -1.0, -1.0, False),
    # Â < 0, ρ inside:     min(−0.9, −0.9) = −0.9                   -> loss 0.9, grad −0.9·(−1) = 0.9
    (-1.0, 0.9, 0.9, 0.9, False),
    # Â < 0, ρ < 1 − ε:    min(ρÂ = −0.5, 0.8·(−1) = −0.8) = −0.8  -> loss 0.8, clipped: grad 0
    (-1.0, 0.5, 0.8, 0.0, True),
    # Â < 0, ρ > 1 + ε:    min(ρÂ = −1.5, 1.2·(−1) = −1.2) = −1.5  -> loss 1.5, grad −1.5·(−1) = 1.5
    (-1.0, 1.5, 1.5, 1.5, False),
]
# approx_kl = ρ − 1 − ln ρ:  1.1: 0.1 − 0.0953102 = 0.0046898;  1.5: 0.5 − 0.4054651 = 0.0945349;
#                            0.5: −0.5 + 0.6931472 = 0.1931472;  0.9: −0.1 + 0.1053605 = 0.0053605
APPROX_KL = {1.1: 0.0046898, 1.5: 0.0945349, 0.5: 0.1931472, 0.9: 0.0053605}


@pytest.mark.parametrize("adv, ratio, loss_value, grad, clipped", CLIP_CASES)
def test_ppo_clip_loss_one_token(adv, ratio, loss_value, grad, clipped):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)  # log π_old = 0, so ρ = e^{log π_θ}
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(loss_value, abs=1e-6)
    if clipped:
        assert logp.grad.item() == 0.0  # exactly: the clipped term does not depend on θ
    else:
        assert logp.grad.item() == pytest.approx(grad, abs=1e-6)
    assert m["clipfrac"].item() == (1.0 if clipped else 0.0)
    assert m["approx_kl"].item() == pytest.approx(APPROX_KL[ratio], abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(ratio, abs=1e-6)


def test_ppo_clip_loss_masked_mean_over_a_batch():
    # The six tokens above in one row, then two padded positions with absurd values (ρ = e^30,
    # Â = 1e6) that the mask must drop.
    #   loss = mean of the six = (−2.2 − 2.4 − 1.0 + 0.9 + 0.8 + 1.5) / 6 = −2.4 / 6 = −0.4
    #   grad = each token's own grad / 6; 0 on the two clipped tokens and on the padding
    #   clipfrac = 2 / 6 (the ρ = 1.5, Â > 0 and ρ = 0.5, Â < 0 tokens)
    #   approx_kl = (0.0046898 + 0.0945349 + 0.1931472 + 0.0053605 + 0.1931472 + 0.0945349) / 6
    #             = 0.5854145 / 6 = 0.0975691
    #   ratio_mean = (1.1 + 1.5 + 0.5 + 0.9 + 0.5 + 1.5) / 6 = 1.0
    advs = [c[0] for c in CLIP_CASES] + [1e6, -1e6]
    logps = [math.log(c[1]) for c in CLIP_CASES] + [30.0, 30.0]
    logp = torch.tensor([logps], requires_grad=True)  # [1, 8]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 8), torch.tensor([advs]), mask, epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-0.4, abs=1e-6)
    expected = [c[3] / 6 for c in CLIP_CASES] + [0.0, 0.0]
    assert logp.grad[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert logp.grad[0, [1, 4, 6, 7]].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly
    assert m["clipfrac"].item() == pytest.approx(2 / 6)
    assert m["approx_kl"].item() == pytest.approx(0.0975691, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    # ρ = 1 everywhere (the first mini-batch of a rollout): the loss is −mean Â, nothing clipped,
    # and the gradient is −Â/n per token, the plain policy gradient
    logp = torch.zeros(1, 8, requires_grad=True)
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 8), torch.tensor([advs]), mask)
    loss.backward()
    # mean Â = (2 + 2 + 2 − 1 − 1 − 1) / 6 = 0.5
    assert loss.item() == pytest.approx(-0.5) and m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0
    assert logp.grad[0].tolist() == pytest.approx([-a / 6 for a in advs[:6]] + [0.0, 0.0])


#####################################################################################################
#####  the clipped value loss
#####################################################################################################

# (V_old, R, V, loss, dL/dV, clipped term taken), ε_v = 0.2. L = ½ max((V − R)², (V_clip − R)²) with
# V_clip = V_old + clip(V − V_old, −0.2, 0.2); d½(V − R)²/dV = V − R; V_clip is constant in V outside
# the range, so its branch gives grad 0.
VALUE_CASES = [
    # moved past V_old + ε towards R: (0.5 − 1)² = 0.25 < (0.2 − 1)² = 0.64 -> ½ · 0.64 = 0.32, grad 0
    (0.0, 1.0, 0.5, 0.32, 0.0, True),
    # moved past V_old − ε away from R: (−0.5 − 1)² = 2.25 > (−0.2 − 1)² = 1.44 -> 1.125, grad −1.5
    (0.0, 1.0, -0.5, 1.125, -1.5, False),
    # inside the range: V_clip = V, (0.1 − 1)² = 0.81 both -> 0.405, grad −0.9, not counted as clipped
    (0.0, 1.0, 0.1, 0.405, -0.9, False),
    # moved past V_old + ε and past R: (0.7 − 0.3)² = 0.16 > (0.2 − 0.3)² = 0.01 -> 0.08, grad 0.4
    (0.0, 0.3, 0.7, 0.08, 0.4, False),
    # moved down past V_old − ε towards R: (0 + 1)² = 1 < (0.8 + 1)² = 3.24 -> 1.62, grad 0
    (1.0, -1.0, 0.0, 1.62, 0.0, True),
]


@pytest.mark.parametrize("v_old, ret, v, loss_value, grad, clipped", VALUE_CASES)
def test_clipped_value_loss_one_token(v_old, ret, v, loss_value, grad, clipped):
    values = torch.tensor([[v]], requires_grad=True)
    loss, m = clipped_value_loss(values, torch.tensor([[v_old]]), torch.tensor([[ret]]), torch.ones(1, 1),
                                 clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(loss_value, abs=1e-6)
    if clipped:
        assert values.grad.item() == 0.0  # exactly
    else:
        assert values.grad.item() == pytest.approx(grad, abs=1e-6)
    assert m["vf_clipfrac"].item() == (1.0 if clipped else 0.0)


def test_clipped_value_loss_batch_and_no_clip():
    # The five tokens above in one row and a padded position (V = 1e6, R = −1e6) that must not count.
    #   ε_v = 0.2: loss = (0.32 + 1.125 + 0.405 + 0.08 + 1.62) / 5 = 3.55 / 5 = 0.71
    #              grad = [0, −1.5, −0.9, 0.4, 0] / 5 = [0, −0.3, −0.18, 0.08, 0], 0 at the padding
    #              vf_clipfrac = 2 / 5 = 0.4
    old = torch.tensor([[c[0] for c in VALUE_CASES] + [0.0]])
    ret = torch.tensor([[c[1] for c in VALUE_CASES] + [-1e6]])
    vals = [c[2] for c in VALUE_CASES] + [1e6]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    values = torch.tensor([vals], requires_grad=True)
    loss, m = clipped_value_loss(values, old, ret, mask, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.71, abs=1e-6)
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.3, -0.18, 0.08, 0.0, 0.0], abs=1e-6)
    assert values.grad[0, [0, 4, 5]].tolist() == [0.0, 0.0, 0.0]  # exactly
    assert m["vf_clipfrac"].item() == pytest.approx(0.4)
    # clip ≤ 0: the plain ½ MSE, the notes' critic loss, whatever V_old says
    #   (V − R)² = [0.25, 2.25, 0.81, 0.16, 1.0]; ½ · 4.47 / 5 = 0.447
    #   grad = (V − R) / 5 = [−0.5, −1.5, −0.9, 0.4, 1.0] / 5 = [−0.1, −0.3, −0.18, 0.08, 0.2]
    for clip in (0.0, -1.0):
        values = torch.tensor([vals], requires_grad=True)
        loss, m = clipped_value_loss(values, old, ret, mask, clip=clip)
        loss.backward()
        assert loss.item() == pytest.approx(0.447, abs=1e-6)
        assert values.grad[0].tolist() == pytest.approx([-0.1, -0.3, -0.18, 0.08, 0.2, 0.0], abs=1e-6)
        assert m["vf_clipfrac"].item() == 0.0
    # V = V_old (the first mini-batch of a rollout): both terms are equal, the loss is ½ MSE to R
    loss, m = clipped_value_loss(old, old, ret, mask, clip=0.2)
    # (V_old − R)² = [1, 1, 1, 0.09, 4] -> ½ · 7.09 / 5 = 0.709
    assert loss.item() == pytest.approx(0.709, abs=1e-6) and m["vf_clipfrac"].item() == 0.0


#####################################################################################################
#####  KL control
#####################################################################################################


def test_adaptive_beta_the_notes_rule():
    # d_targ = 3: the band is [d_targ / 1.5, 1.5 d_targ] = [2, 4.5] (both exact in binary)
    #   d < 2 -> β / 2;  2 ≤ d ≤ 4.5 -> β;  d > 4.5 -> 2β
    #   (the edges keep β: the notes' inequalities are strict)
    assert adaptive_beta(0.1, 0.0, 3.0) == 0.05
    assert adaptive_beta(0.1, 1.9, 3.0) == 0.05
    assert adaptive_beta(0.1, 2.0, 3.0) == 0.1  # lower edge
    assert adaptive_beta(0.1, 3.0, 3.0) == 0.1
    assert adaptive_beta(0.1, 4.5, 3.0) == 0.1  # upper edge
    assert adaptive_beta(0.1, 4.6, 3.0) == 0.2
    assert adaptive_beta(0.1, 100.0, 3.0) == 0.2  # one step doubles once, however far d is
    # repeated: 0.1 -> 0.05 -> 0.025 while d stays small
    assert adaptive_beta(adaptive_beta(0.1, 0.0, 2.0), 0.0, 2.0) == 0.025


def test_proportional_beta_ziegler_controller():
    # β ← β (1 + e n / horizon), e = clip(d / d_targ − 1, −0.2, 0.2); β = 0.1, d_targ = 2, n = 64,
    # horizon = 10,000, so n / horizon = 0.0064:
    #   d = 2:   e = 0                      -> 0.1
    #   d = 2.2: e = 0.1                    -> 0.1 · (1 + 0.00064) = 0.100064
    #   d = 1.8: e = −0.1                   -> 0.1 · (1 − 0.00064) = 0.099936
    #   d = 10:  e = 4, clipped to 0.2      -> 0.1 · (1 + 0.00128) = 0.100128
    #   d = 0:   e = −1, clipped to −0.2    -> 0.1 · (1 − 0.00128) = 0.099872
    assert proportional_beta(0.1, 2.0, 2.0, 64) == pytest.approx(0.1, abs=1e-12)
    assert proportional_beta(0.1, 2.2, 2.0, 64) == pytest.approx(0.100064, abs=1e-12)
    assert proportional_beta(0.1, 1.8, 2.0, 64) == pytest.approx(0.099936, abs=1e-12)
    assert proportional_beta(0.1, 10.0, 2.0, 64) == pytest.approx(0.100128, abs=1e-12)
    assert proportional_beta(0.1, 0.0, 2.0, 64) == pytest.approx(0.099872, abs=1e-12)
    # n = horizon: one step moves β by at most ±20%: 0.1 · 1.2 = 0.12 and 0.1 · 0.8 = 0.08
    assert proportional_beta(0.1, 10.0, 2.0, 100, horizon=100) == pytest.approx(0.12, abs=1e-12)
    assert proportional_beta(0.1, 0.0, 2.0, 100, horizon=100) == pytest.approx(0.08, abs=1e-12)


#####################################################################################################
#####  PPO-penalty and TRPO: the exact KL to π_old, the penalised loss, CG, F·v, the TRPO step
#####################################################################################################


def test_policy_kl_exact_on_a_hand_pair():
    # p = π_old = (1/2, 1/2), q = π_θ = (1/4, 3/4), given as logits log p, log q:
    #   KL(p ‖ q) = ½ ln(½ / ¼) + ½ ln(½ / ¾) = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3) = 0.1438410
    #   KL(q ‖ p) = ¼ ln(¼ / ½) + ¾ ln(¾ / ½) = −0.1732868 + 0.3040988 = 0.1308120  (not the same:
    #   the argument order matters, and policy_kl(old, new) is KL(π_old ‖ π_θ))
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 0.75]).log()
    assert policy_kl(p.view(1, 1, 2), q.view(1, 1, 2)).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert policy_kl(q.view(1, 1, 2), p.view(1, 1, 2)).item() == pytest.approx(0.1308120, abs=1e-6)
    # [B, T, V] -> [B, T]: row 0 = (p, q) and (p, p) -> [0.1438410, 0]; logits shifted by a constant
    # are the same distribution (softmax(z + c) = softmax(z)), so row 1 = (p + 5, q − 3) gives the same
    old = torch.stack([torch.stack([p, p]), torch.stack([p + 5, p])])  # [2, 2, 2]
    new = torch.stack([torch.stack([q, p]), torch.stack([q - 3, p])])  # [2, 2, 2]
    kl = policy_kl(old, new)
    assert kl.shape == (2, 2)
    torch.testing.assert_close(kl, torch.tensor([[0.1438410, 0.0], [0.1438410, 0.0]]), atol=1e-6, rtol=0)
    # a word π_old never picks (logit −inf) adds 0, not 0 · (−inf) = NaN:
    #   π_old = (1, 0), π_θ = (½, ½): KL = 1 · ln(1 / ½) = ln 2 = 0.6931472
    kl0 = policy_kl(torch.tensor([[[0.0, -math.inf]]]), torch.zeros(1, 1, 2))
    assert kl0.item() == pytest.approx(math.log(2), abs=1e-6)


def test_ppo_penalty_loss_one_token_by_hand():
    # Three actions. π_old = (0.5, 0.3, 0.2); π_θ's logits are π_old's plus (ln 2, 0, 0), so its
    # unnormalised weights are (1.0, 0.3, 0.2), sum 1.5: π_θ = q = (2/3, 1/5, 2/15). Token a = 0,
    # Â = 1, β = 0.5.
    #   ρ  = q_0 / p_0 = (2/3) / (1/2) = 4/3
    #   KL = 0.5 ln(0.5 / (2/3)) + 0.3 ln(0.3 / 0.2) + 0.2 ln(0.2 / (2/15))
    #      = 0.5 ln 0.75 + 0.3 ln 1.5 + 0.2 ln 1.5 = 0.5 ln(0.75 · 1.5) = 0.5 ln 1.125 = 0.0588915
    #   L  = −(ρ Â − β KL) = −(4/3 − 0.5 · 0.0588915) = −(1.3333333 − 0.0294458) = −1.3038876
    # The gradient with respect to π_θ's logits z (softmax: ∂ log q_a/∂z = e_a − q; ∂KL/∂z = q − p):
    #   ∂ρ/∂z  = ρ (e_0 − q) = 4/3 · (1/3, −1/5, −2/15) = (4/9, −4/15, −8/45)
    #   ∂KL/∂z = q − p = (2/3 − 1/2, 1/5 − 3/10, 2/15 − 1/5) = (1/6, −1/10, −1/15)
    #   ∂L/∂z  = −Â ∂ρ/∂z + β ∂KL/∂z = (−4/9 + 1/12, 4/15 − 1/20, 8/45 − 1/30) = (−13/36, 13/60, 13/90)
    #   (it sums to 0, as every softmax gradient must)
    z_old = torch.tensor([0.5, 0.3, 0.2]).log()
    z = (z_old + torch.tensor([math.log(2), 0.0, 0.0])).requires_grad_(True)
    logp = torch.log_softmax(z, -1)[0].view(1, 1)  # log π_θ(a = 0)   [1, 1]
    old_logp = torch.log_softmax(z_old, -1)[0].view(1, 1)  # log π_old(a = 0) = ln 0.5
    kl = policy_kl(z_old.view(1, 1, 3), z.view(1, 1, 3))  # [1, 1]
    loss, m = ppo_penalty_loss(logp, old_logp, torch.ones(1, 1), kl, torch.ones(1, 1), beta=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(-(4 / 3 - 0.5 * 0.5 * math.log(1.125)), abs=1e-6)
    assert loss.item() == pytest.approx(-1.3038876, abs=1e-6)
    torch.testing.assert_close(z.grad, torch.tensor([-13 / 36, 13 / 60, 13 / 90]), atol=1e-6, rtol=0)
    assert m["kl"].item() == pytest.approx(0.0588915, abs=1e-6)
    assert m["surrogate"].item() == pytest.approx(4 / 3, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(4 / 3, abs=1e-6)
    # at θ = θ_old (ρ = 1, KL = 0) the KL term has zero gradient: the loss is −Â and its gradient is
    # the plain policy gradient −Â (e_0 − p) = −(0.5, −0.3, −0.2)
    z0 = z_old.clone().requires_grad_(True)
    loss0, _ = ppo_penalty_loss(torch.log_softmax(z0, -1)[0].view(1, 1), old_logp, torch.ones(1, 1),
                                policy_kl(z_old.view(1, 1, 3), z0.view(1, 1, 3)), torch.ones(1, 1), beta=0.5)
    loss0.backward()
    assert loss0.item() == pytest.approx(-1.0, abs=1e-6)
    torch.testing.assert_close(z0.grad, torch.tensor([-0.5, 0.3, 0.2]), atol=1e-6, rtol=0)


def test_ppo_penalty_loss_masks_padding():
    # Two real tokens and one padded one holding absurd values: the mask must drop it.
    #   token 0: ρ = e^0 = 1, Â = 2, KL = 0.1:   ρÂ − β KL = 2 − 0.5 · 0.1 = 1.95
    #   token 1: ρ = e^{ln 0.5} = 0.5, Â = −1, KL = 0.3:   −0.5 − 0.5 · 0.3 = −0.65
    #   L = −(1.95 − 0.65) / 2 = −0.65
    logp = torch.tensor([[0.0, math.log(0.5), 30.0]])
    loss, m = ppo_penalty_loss(logp, torch.zeros(1, 3), torch.tensor([[2.0, -1.0, 1e6]]),
                               torch.tensor([[0.1, 0.3, 1e9]]), torch.tensor([[1, 1, 0]]), beta=0.5)
    assert loss.item() == pytest.approx(-0.65, abs=1e-6)
    assert m["kl"].item() == pytest.approx(0.2, abs=1e-6)


def test_adaptive_beta_on_the_penalty_d():
    # --policy-loss kl-penalty runs the notes' rule on d = mean_t KL(π_old ‖ π_θ), nats per token,
    # with the default d_targ = 0.01: the band is [0.01 / 1.5, 0.01 · 1.5] = [0.006667, 0.015].
    #   d = 0.005 < 0.006667  -> β_pen / 2:  1 -> 0.5
    #   d = 0.01 (inside)     -> β_pen:      1 -> 1
    #   d = 0.02 > 0.015      -> 2 β_pen:    1 -> 2
    d_targ = ppo.Args().penalty_target_kl
    assert d_targ == 0.01 and ppo.Args().penalty_beta == 1.0
    assert adaptive_beta(1.0, 0.005, d_targ) == 0.5
    assert adaptive_beta(1.0, 0.0066, d_targ) == 0.5  # just below the band
    assert adaptive_beta(1.0, 0.007, d_targ) == 1.0  # just inside it
    assert adaptive_beta(1.0, 0.01, d_targ) == 1.0
    assert adaptive_beta(1.0, 0.0149, d_targ) == 1.0
    assert adaptive_beta(1.0, 0.0151, d_targ) == 2.0  # just above
    assert adaptive_beta(1.0, 0.02, d_targ) == 2.0


def test_penalty_kl_control_fixed_keeps_beta_pen_adaptive_is_the_notes_rule():
    # fixed: β_pen unchanged for any d (below, inside and above the band [0.00667, 0.015]);
    # adaptive: the ×2 / ÷2 rule of the test above
    for d in (0.0, 0.005, 0.01, 0.02, 5.0):
        assert ppo.penalty_kl_control("fixed", 0.7, d, 0.01) == 0.7
        assert ppo.penalty_kl_control("adaptive", 0.7, d, 0.01) == adaptive_beta(0.7, d, 0.01)
    assert ppo.penalty_kl_control("adaptive", 1.0, 0.005, 0.01) == 0.5
    assert ppo.penalty_kl_control("adaptive", 1.0, 0.02, 0.01) == 2.0
    assert ppo.Args().penalty_kl_control == "adaptive"  # the default: the notes' rule, as before
    with pytest.raises(ValueError, match="proportional"):
        ppo.penalty_kl_control("proportional", 1.0, 0.01, 0.01)


A_2X2 = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)  # symmetric, eigenvalues (7 ± √5)/2 > 0
B_2X2 = torch.tensor([1.0, 2.0], dtype=torch.float64)


def test_conjugate_gradient_solves_a_2x2_system_in_two_iterations():
    # A = [[4, 1], [1, 3]], b = [1, 2]. The solution: A⁻¹ = 1/11 [[3, −1], [−1, 4]] (det = 11), so
    # x = A⁻¹ b = 1/11 [3 − 2, −1 + 8] = [1/11, 7/11] = [0.0909091, 0.6363636].
    # CG by hand, from x_0 = 0, r_0 = p_0 = b = [1, 2], r_0ᵀr_0 = 5:
    #   A p_0 = [6, 7];  p_0ᵀ A p_0 = 6 + 14 = 20;  α_0 = 5 / 20 = 0.25
    #   x_1 = [0.25, 0.5];  r_1 = [1, 2] − 0.25 [6, 7] = [−0.5, 0.25];  r_1ᵀr_1 = 0.3125
    #   p_1 = r_1 + (0.3125 / 5) p_0 = [−0.5 + 0.0625, 0.25 + 0.125] = [−0.4375, 0.375]
    #   A p_1 = [−1.75 + 0.375, −0.4375 + 1.125] = [−1.375, 0.6875];  p_1ᵀ A p_1 = 0.6015625 + 0.2578125 = 0.859375
    #   α_1 = 0.3125 / 0.859375 = 4/11;  x_2 = [0.25 − 0.4375 · 4/11, 0.5 + 0.375 · 4/11] = [1/11, 7/11]
    calls = []

    def fvp(v):
        calls.append(v)
        return A_2X2 @ v
    x1 = conjugate_gradient(fvp, B_2X2, iters=1)
    torch.testing.assert_close(x1, torch.tensor([0.25, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)
    calls.clear()
    x2 = conjugate_gradient(fvp, B_2X2, iters=2)
    torch.testing.assert_close(x2, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64), atol=1e-12, rtol=0)
    assert len(calls) == 2  # one product per iteration
    # more iterations change nothing: r_2 = 0, so it stops (no third product)
    calls.clear()
    torch.testing.assert_close(conjugate_gradient(fvp, B_2X2, iters=10), x2, atol=1e-12, rtol=0)
    assert len(calls) == 2
    # damping λ = 1 solves (A + I) x = b: (A + I)⁻¹ = 1/19 [[4, −1], [−1, 5]] (det = 20 − 1 = 19),
    #   x = 1/19 [4 − 2, −1 + 10] = [2/19, 9/19]
    xd = conjugate_gradient(lambda v: A_2X2 @ v, B_2X2, iters=2, damping=1.0)
    torch.testing.assert_close(xd, torch.tensor([2 / 19, 9 / 19], dtype=torch.float64), atol=1e-12, rtol=0)
    # b = 0: x = 0, without a single product; F = 0 (no curvature): it stops with x_0 = 0
    calls.clear()
    assert torch.equal(conjugate_gradient(fvp, torch.zeros(2, dtype=torch.float64), iters=5), torch.zeros(2, dtype=torch.float64))
    assert calls == []
    assert torch.equal(conjugate_gradient(lambda v: 0 * v, B_2X2, iters=5), torch.zeros(2, dtype=torch.float64))


def test_fisher_vector_product_equals_the_softmax_fisher_times_v():
    # One state, three actions, θ = the logits z, π_old = softmax(z_old) = p = (0.5, 0.3, 0.2).
    # The Fisher matrix F = Σ_a p_a ∇_z log p_a ∇_z log p_aᵀ with ∇_z log p_a = e_a − p, which is
    #   F = diag(p) − p pᵀ = [[0.25, −0.15, −0.10], [−0.15, 0.21, −0.06], [−0.10, −0.06, 0.16]]
    # (0.5 − 0.25, 0.3 − 0.09, 0.2 − 0.04 on the diagonal; −p_i p_j off it), the Hessian of
    # KL(p ‖ softmax(z)) at z = z_old. For v = (1, 0, −1):
    #   F v = (0.25 + 0.10, −0.15 + 0.06, −0.10 − 0.16) = (0.35, −0.09, −0.26)
    #   (the same as p ⊙ v − p (pᵀv) = (0.5, 0, −0.2) − 0.3 (0.5, 0.3, 0.2))
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    z_old = p.log()
    z = z_old.clone().requires_grad_(True)
    v = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    kl = policy_kl(z_old.view(1, 1, 3), z.view(1, 1, 3)).mean()  # D̄_KL at θ_old: 0, with a graph
    assert kl.item() == pytest.approx(0.0, abs=1e-15)
    fv = fisher_vector_product(kl, [z], v)
    torch.testing.assert_close(fv, torch.tensor([0.35, -0.09, -0.26], dtype=torch.float64), atol=1e-12, rtol=0)
    # against the explicit matrix, built from its definition Σ_a p_a (e_a − p)(e_a − p)ᵀ, for every e_i
    eye = torch.eye(3, dtype=torch.float64)
    F = sum(p[a] * torch.outer(eye[a] - p, eye[a] - p) for a in range(3))
    torch.testing.assert_close(F, torch.diag(p) - torch.outer(p, p), atol=1e-15, rtol=0)
    for i in range(3):
        torch.testing.assert_close(fisher_vector_product(kl, [z], eye[i]), F[i], atol=1e-12, rtol=0)
    # the other direction, KL(π_θ ‖ π_old), has the same Hessian at θ_old (both are F there): the
    # quadratic model of TRPO does not depend on the direction, only the line search's check does
    # (written out here: policy_kl treats its first argument as the constant π_old and detaches it)
    lq = torch.log_softmax(z, -1)  # log π_θ
    kl_rev = (lq.exp() * (lq - z_old)).sum()  # KL(π_θ ‖ π_old), z_old = log p is normalised
    torch.testing.assert_close(fisher_vector_product(kl_rev, [z], v), fv, atol=1e-12, rtol=0)


def test_fisher_vector_product_on_an_lm_is_the_expected_squared_score():
    # On a real (small, random, float64) LM the Fisher matrix is E_t Σ_a π_old(a|s_t) ∇log π(a|s_t) ∇log π(a|s_t)ᵀ,
    # so for a direction v:   vᵀ F v = mean_t Σ_a π_old(a|s_t) (d/dε log π_{θ+εv}(a|s_t))²,
    # the π_old-weighted mean of the squared directional derivative, here by central differences
    # (ε = 1e-5, error O(ε²)). F is also symmetric: uᵀ(F v) = vᵀ(F u). (Agreement to ~1e-6, not 1e-12:
    # parts of the Llama forward, e.g. its rotary embedding, run in float32 even in a float64 model.)
    model = random_llama(seed=3).double()
    ids, mask, c_mask, T = batch_with_different_lengths()
    params = [q for q in model.parameters() if q.requires_grad]
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    old = common.vocab_logprobs(model, ids, mask, T).detach()  # log π_old(·|s_t)   [4, T, V]
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        kl = common.masked_mean(policy_kl(old, common.vocab_logprobs(model, ids, mask, T)), c_mask)
    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(theta.numel(), generator=gen, dtype=torch.float64) for _ in range(2))
    fu, fv = fisher_vector_product(kl, params, u), fisher_vector_product(kl, params, v)
    assert torch.dot(u, fv).item() == pytest.approx(torch.dot(v, fu).item(), rel=1e-6)
    eps = 1e-5
    with torch.no_grad():
        ppo.set_flat(params, theta + eps * v)
        plus = common.vocab_logprobs(model, ids, mask, T)
        ppo.set_flat(params, theta - eps * v)
        minus = common.vocab_logprobs(model, ids, mask, T)
        ppo.set_flat(params, theta)
    dlogp = (plus - minus) / (2 * eps)  # d/dε log π_{θ+εv}(a|s_t)   [4, T, V]
    vfv = common.masked_mean((old.exp() * dlogp ** 2).sum(-1), c_mask)
    assert torch.dot(v, fv).item() == pytest.approx(vfv.item(), rel=1e-5)
    assert torch.dot(v, fv).item() > 0


def quadratic_problem(kl_scale: float = 1.0, surrogate=None):
    """The TRPO tests' hand problem: θ ∈ R², θ_old = (0.5, −0.5), F = A_2X2, g = B_2X2, and the true
    surrogate and KL are exactly TRPO's model, L(θ) = gᵀΔ and D̄_KL = ½ ΔᵀFΔ with Δ = θ − θ_old
    (the KL times kl_scale, to break the model on purpose). -> (theta_old, evaluate, calls)."""
    theta_old = torch.tensor([0.5, -0.5], dtype=torch.float64)
    calls = []

    def evaluate(theta):
        calls.append(theta.clone())
        d = theta - theta_old
        surr = float(B_2X2 @ d) if surrogate is None else surrogate(d)
        return surr, kl_scale * float(0.5 * d @ A_2X2 @ d)
    return theta_old, evaluate, calls


# x = F⁻¹g = (1/11, 7/11) (the CG test); xᵀFx = gᵀx = (1 + 14)/11 = 15/11; with δ = 0.01 the full step is
#   s = √(2δ / xᵀFx) x = √(0.02 · 11/15) x = 0.1211060 · (0.0909091, 0.6363636) = (0.0110096, 0.0770675)
# and its gain under the model gᵀs = √(2δ xᵀFx) = √(0.02 · 15/11) = √0.0272727 = 0.1651446
X_HAND = torch.tensor([1 / 11, 7 / 11], dtype=torch.float64)
S_HAND = math.sqrt(0.02 * 11 / 15) * X_HAND


def test_trpo_full_step_on_a_quadratic_model_has_kl_delta():
    # The KL of the full step under the quadratic model: ½ sᵀFs = ½ (2δ / xᵀFx) xᵀFx = δ, exactly.
    # The true KL here is that model, so the full step's KL is δ = 0.01. It lies on the boundary
    # KL ≤ δ, so rounding decides whether the line search takes it (fraction 1) or shrinks it once (0.8).
    theta_old, evaluate, calls = quadratic_problem()
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2,
                            damping=0.0, backtrack=0.8, max_backtracks=10)
    assert info["full_step_kl"] == pytest.approx(0.01, rel=1e-9)
    torch.testing.assert_close(calls[1], theta_old + S_HAND, atol=1e-12, rtol=0)  # the first try: θ_old + s
    assert info["xFx"] == pytest.approx(15 / 11, rel=1e-12)
    assert info["expected_gain"] == pytest.approx(0.1651446, abs=1e-7)
    assert info["step_fraction"] in (1.0, 0.8) and info["line_search_failed"] == 0.0
    torch.testing.assert_close(theta, theta_old + info["step_fraction"] * S_HAND, atol=1e-12, rtol=0)
    # the model is the truth here: the gain is gᵀ(fraction · s) = fraction · 0.1651446
    assert info["surrogate_gain"] == pytest.approx(info["step_fraction"] * 0.1651446, abs=1e-7)
    # with damping λ = 0.1, the step solves (F + λI)x = g and is scaled so that ½ sᵀ(F + λI)s = δ; the
    # true KL ½ sᵀFs is then δ − ½ λ ‖s‖² < δ: damping only ever shortens the step
    theta_old, evaluate, _ = quadratic_problem()
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2, damping=0.1)
    s = theta - theta_old
    assert info["step_fraction"] == 1.0 and info["backtracks"] == 0.0  # strictly inside: the full step
    assert info["kl"] == pytest.approx(0.01 - 0.05 * float(s @ s), rel=1e-9) and info["kl"] < 0.01


def test_trpo_line_search_rejects_a_step_that_breaks_the_constraint():
    # The true KL is 3× the model's, so the full step's KL is 3δ. Trying θ_old + 0.8^j s, the KL
    # scales with (0.8^j)² = 0.64^j:
    #   j = 0: 3 · 1      · δ = 0.03     > δ   rejected
    #   j = 1: 3 · 0.64   · δ = 0.0192   > δ   rejected
    #   j = 2: 3 · 0.4096 · δ = 0.012288 > δ   rejected
    #   j = 3: 3 · 0.262144 · δ = 0.00786432 ≤ δ, and the surrogate gain 0.512 · 0.1651446 = 0.0845540 > 0
    # so it takes j = 3, the step fraction 0.8³ = 0.512.
    theta_old, evaluate, calls = quadratic_problem(kl_scale=3.0)
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2,
                            damping=0.0, backtrack=0.8, max_backtracks=10)
    assert info["backtracks"] == 3.0 and info["step_fraction"] == pytest.approx(0.512, abs=1e-12)
    assert info["line_search_failed"] == 0.0
    assert info["kl"] == pytest.approx(0.00786432, rel=1e-9)
    assert info["surrogate_gain"] == pytest.approx(0.512 * 0.1651446, abs=1e-7)
    torch.testing.assert_close(theta, theta_old + 0.512 * S_HAND, atol=1e-12, rtol=0)
    assert len(calls) == 1 + 4  # L(θ_old), then j = 0, 1, 2, 3
    # with only 3 tries (j = 0, 1, 2) none qualifies: θ stays θ_old
    theta_old, evaluate, _ = quadratic_problem(kl_scale=3.0)
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2,
                            damping=0.0, max_backtracks=3)
    assert torch.equal(theta, theta_old) and info["line_search_failed"] == 1.0 and info["step_fraction"] == 0.0


def test_trpo_leaves_theta_unchanged_when_every_step_fails():
    # 1. The true surrogate never improves: L(θ) = −‖Δ‖² < 0 = L(θ_old) for every Δ ≠ 0, though the
    #    model (gᵀΔ) promises a gain and every KL is within δ. All 10 tries are rejected.
    theta_old, evaluate, calls = quadratic_problem(surrogate=lambda d: -float(d @ d))
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2, damping=0.0)
    assert torch.equal(theta, theta_old)
    assert info["line_search_failed"] == 1.0 and info["step_fraction"] == 0.0 and info["backtracks"] == 10.0
    assert info["kl"] == 0.0 and info["surrogate_gain"] == 0.0
    assert len(calls) == 1 + 10
    # 2. Every KL is far above δ (the true KL is 1e6× the model's: even 0.8⁹ s has KL 1e6 · 0.8¹⁸ δ = 18014 δ)
    theta_old, evaluate, _ = quadratic_problem(kl_scale=1e6)
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2, damping=0.0)
    assert torch.equal(theta, theta_old) and info["line_search_failed"] == 1.0
    # 3. g = 0: CG gives x = 0, so xᵀFx = 0 and there is no step to scale: none is taken, and the
    #    surrogate is never evaluated
    theta_old, evaluate, calls = quadratic_problem()
    theta, info = trpo_step(theta_old, torch.zeros(2, dtype=torch.float64), lambda v: A_2X2 @ v, evaluate)
    assert torch.equal(theta, theta_old) and info["line_search_failed"] == 1.0 and info["xFx"] == 0.0
    assert calls == []
    # 4. a NaN surrogate (a broken forward pass) rejects the step rather than accepting it
    theta_old, evaluate, _ = quadratic_problem(surrogate=lambda d: float("nan") if float(d @ d) > 0 else 0.0)
    theta, info = trpo_step(theta_old, B_2X2, lambda v: A_2X2 @ v, evaluate, delta=0.01, cg_iters=2, damping=0.0)
    assert torch.equal(theta, theta_old) and info["line_search_failed"] == 1.0


def test_trpo_update_builds_the_surrogate_its_gradient_and_the_kl_from_the_model(monkeypatch):
    # trpo_update's closures, checked against the model run here by hand, on the batch of lengths
    # 4, 2, 3, 1 (N = 10 completion tokens) in micro-batches of 2 rows (shares 6/10 and 4/10).
    # Â (padding holds 99, which must count nowhere):
    #   row 0: 1, −1, 2, 0.5     row 1: −2, 1     row 2: 0.5, 0.5, −1     row 3: 3
    #   Σ_t Â_t = 2.5 − 1 + 0 + 3 = 4.5, so at θ_old (ρ = 1) L(θ_old) = (1/N) Σ_t ρ_t Â_t = 0.45
    #   and D̄_KL(θ_old, θ_old) = 0.
    policy = random_llama(seed=3)
    ids, mask, c_mask, T = batch_with_different_lengths()
    adv = torch.tensor([[1.0, -1.0, 2.0, 0.5], [-2.0, 1.0, 99, 99], [0.5, 0.5, -1.0, 99], [3.0, 99, 99, 99]])
    with torch.no_grad():
        old_lp_all = common.vocab_logprobs(policy, ids, mask, T)  # log π_old(·|s_t)   [4, T, V]
    old_logp = common.pick_token_logprobs(old_lp_all, ids, mask)  # [4, T]
    params = [p for p in policy.parameters() if p.requires_grad]

    def surrogate_and_kl():  # L(θ) = (1/N) Σ_t ρ_t Â_t and mean_t KL(π_old ‖ π_θ), the whole batch at once
        lp_all = common.vocab_logprobs(policy, ids, mask, T)  # [4, T, V]
        logp = common.pick_token_logprobs(lp_all, ids, mask)  # [4, T]
        return (common.masked_mean(torch.exp(logp - old_logp) * adv, c_mask),
                common.masked_mean(policy_kl(old_lp_all, lp_all), c_mask))

    # g = ∇_θ L at θ_old = ∇_θ (1/N) Σ_t log π_θ(y_t|s_t) Â_t, the policy gradient (∇ρ = ρ ∇log π, ρ = 1)
    logp = common.pick_token_logprobs(common.vocab_logprobs(policy, ids, mask, T), ids, mask)  # [4, T]
    g_hand = torch.cat([x.reshape(-1) for x in torch.autograd.grad(
        common.masked_mean(logp * adv, c_mask), params)])  # [n]
    seen, real_step = {}, ppo.trpo_step

    def spy(theta_old, g, fvp, evaluate, *args, **kwargs):
        seen["theta_old"], seen["g"], seen["at_old"] = theta_old.clone(), g.clone(), evaluate(theta_old)
        return real_step(theta_old, g, fvp, evaluate, *args, **kwargs)

    monkeypatch.setattr(ppo, "trpo_step", spy)
    old_policy = copy.deepcopy(policy).requires_grad_(False)  # the frozen snapshot of π_old
    info = ppo.trpo_update(policy, ids, mask, c_mask, T, old_policy, old_logp, adv, micro_batch=2, delta=0.01,
                           cg_iters=2)
    surr_old, kl_old = seen["at_old"]
    assert surr_old == pytest.approx(0.45, abs=1e-6) and kl_old == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(seen["g"], g_hand, atol=1e-6, rtol=1e-4)
    # the step written into the model is the one the line search accepted, within δ, and trpo_update
    # reports its true surrogate gain and KL, as computed here from the model afterwards
    assert info["line_search_failed"] == 0.0
    with torch.no_grad():
        surr_new, kl_new = surrogate_and_kl()
    assert 0 < float(kl_new) <= 0.01
    assert info["kl"] == pytest.approx(float(kl_new), rel=1e-4)
    assert info["surrogate_gain"] == pytest.approx(float(surr_new) - 0.45, rel=1e-3)
    theta = torch.nn.utils.parameters_to_vector(params)
    assert not torch.equal(theta, seen["theta_old"])


#####################################################################################################
#####  whitening of the advantages, explained variance
#####################################################################################################


def test_masked_whiten_of_the_advantages_by_hand():
    # ppo.py whitens Â with common.masked_whiten(adv, c_mask): over all completion tokens of the batch
    # together (not per row), with the Bessel-corrected std (÷ (n − 1), as TRL's masked_whiten and
    # torch.std do), plus eps = 1e-8 inside the square root.
    #   tokens 1, 2, 3 (row 0) and 4 (row 1): n = 4, mean 2.5, deviations −1.5, −0.5, 0.5, 1.5
    #   Σ dev² = 2.25 + 0.25 + 0.25 + 2.25 = 5;  Bessel var = 5 / 3;  std = √(5/3) = 1.2909944
    #   whitened = dev / 1.2909944 = [−1.1618950, −0.3872983, 0.3872983, 1.1618950]
    #   (the population std √(5/4) = 1.1180340 would give ±1.3416408, ±0.4472136)
    adv = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, NAN, -INF]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = common.masked_whiten(adv, mask)
    assert out[0, :3].tolist() == pytest.approx([-1.1618950, -0.3872983, 0.3872983], abs=1e-6)
    assert out[1, 0].item() == pytest.approx(1.1618950, abs=1e-6)
    assert out[mask == 0].tolist() == [0.0] * 4  # padding comes back 0, never NaN
    real = out[mask == 1]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-7)
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)  # torch.std is Bessel-corrected too


def test_explained_variance_by_hand():
    # R = [1, 2, 3, 4] over the mask (the padding holds nonsense); population variances:
    #   Var[R] = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -99.0, NAN, INF]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])

    def ev(*v):
        return explained_variance(torch.tensor([[v[0], v[1], v[2], 0.0], [v[3], 0.0, 0.0, 0.0]]), ret, mask)
    assert ev(1, 2, 3, 4) == 1.0  # perfect critic: R − V = 0, Var 0 -> 1 − 0 / 1.25 = 1
    assert ev(2.5, 2.5, 2.5, 2.5) == 0.0  # the mean return: Var[R − 2.5] = Var[R] -> 0
    assert ev(0, 0, 0, 0) == 0.0  # V = 0 (the value model at --value-init policy): also 0
    assert ev(-5, -5, -5, -5) == 0.0  # any constant: the variance ignores the shift
    # V = [1, 2, 3, 2]: R − V = [0, 0, 0, 2], mean 0.5, Var = (3 · 0.25 + 2.25) / 4 = 0.75
    #   -> 1 − 0.75 / 1.25 = 0.4
    assert ev(1, 2, 3, 2) == pytest.approx(0.4, abs=1e-6)
    # V = −R: R − V = 2R, Var = 4 · 1.25 = 5 -> 1 − 5 / 1.25 = −3 (worse than the mean)
    assert ev(-1, -2, -3, -4) == pytest.approx(-3.0, abs=1e-6)
    # constant returns: Var[R] = 0, undefined -> NaN
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)))


#####################################################################################################
#####  micro-batches: each one weighted by its share of the mini-batch's tokens
#####################################################################################################


def test_token_share_weighting_reproduces_the_mini_batch_loss():
    """ppo.py splits a mini-batch into micro-batches and backpropagates loss_micro · w with
    w = (tokens in the micro-batch) / (tokens in the mini-batch). Both losses are means over tokens,
    so Σ w · mean_micro = Σ_micro Σ_t / n = the mini-batch's mean: the same loss, the same gradient
    and the same metrics. Here the two micro-batches hold 4 + 2 = 6 and 3 + 1 = 4 of the 10 tokens."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])  # 10 tokens
    old = -torch.rand(4, 4, generator=g) * 3
    logp0 = old + 0.4 * torch.randn(4, 4, generator=g)  # ρ spread over both sides of the clip range
    adv = torch.randn(4, 4, generator=g)
    v_old, ret = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    v0 = v_old + 0.4 * torch.randn(4, 4, generator=g)
    micro = [[0, 1], [2, 3]]
    n_tok = mask.sum()
    weights = [mask[i].sum() / n_tok for i in micro]
    assert [w.item() for w in weights] == pytest.approx([0.6, 0.4])

    def full_and_micro(loss_fn, x0, *rest):
        x = x0.clone().requires_grad_()
        full, fm = loss_fn(x, *rest, mask)
        (gfull,) = torch.autograd.grad(full, x)
        x = x0.clone().requires_grad_()
        summed, sm, means = 0.0, {k: 0.0 for k in fm}, []
        for i, w in zip(micro, weights):
            part, pm = loss_fn(x[i], *(r[i] for r in rest), mask[i])
            summed = summed + part * w
            means.append(part)
            for k in pm:
                sm[k] += float(pm[k]) * float(w)
        (gmicro,) = torch.autograd.grad(summed, x)
        torch.testing.assert_close(summed, full)
        torch.testing.assert_close(gmicro, gfull)
        for k in fm:
            assert sm[k] == pytest.approx(float(fm[k]), abs=1e-6), k
        # not vacuous: the plain average of the two micro-batch means is another number
        assert abs(float(sum(means).detach()) / 2 - float(full.detach())) > 1e-3
        return fm

    pm = full_and_micro(lambda x, o, a, m: ppo_clip_loss(x, o, a, m, 0.2), logp0, old, adv)
    assert 0 < pm["clipfrac"] < 1  # some tokens clipped, some not
    vm = full_and_micro(lambda x, o, r, m: clipped_value_loss(x, o, r, m, 0.2), v0, v_old, ret)
    assert 0 < vm["vf_clipfrac"] < 1


#####################################################################################################
#####  the value model
#####################################################################################################


def test_value_model_reads_the_column_before_each_token():
    """V(s_t) is the head applied to the hidden state of the column that precedes y_t: the column
    whose logits give log π(y_t | x, y_<t) in common.token_logprobs. Checked against plain forward
    passes over each unpadded prompt + completion."""
    lm = random_llama(seed=1)
    w = torch.randn(16, generator=torch.Generator().manual_seed(2))
    value = ValueModel(lm, w, bias=0.3)
    ids, mask, c_mask, T = batch_with_different_lengths()
    with torch.no_grad():
        v = value(ids, mask, T)  # [4, T]
        logp, _ = common.token_logprobs(lm, ids, mask, T)  # [4, T]
        for k, (x, y) in enumerate(zip(PROMPTS, COMPLETIONS)):
            seq = torch.tensor([x + y])  # [1, |x| + |y|], no padding
            h = lm.base_model(input_ids=seq).last_hidden_state[0]  # [L, d]
            logprobs = torch.log_softmax(lm(input_ids=seq).logits[0], -1)  # [L, V]
            for t in range(len(y)):
                col = len(x) + t - 1  # the column that precedes y_t
                torch.testing.assert_close(v[k, t], h[col] @ w + 0.3, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(logp[k, t], logprobs[col, y[t]], atol=1e-5, rtol=1e-5)
    assert v.dtype == torch.float32 and v.shape == (4, T)
    # a head of zeros (--value-init policy) gives V = 0 everywhere
    zero = ValueModel(random_llama(seed=1))
    with torch.no_grad():
        assert torch.equal(zero(ids, mask, T), torch.zeros(4, T))


def test_value_model_is_invariant_to_padding():
    lm = random_llama(seed=3)
    value = ValueModel(lm, torch.randn(16, generator=torch.Generator().manual_seed(4)), bias=-0.1)
    ids, mask, c_mask, T = batch_with_different_lengths()
    real = c_mask.bool()
    pad = torch.zeros(4, 3, dtype=ids.dtype)
    with torch.no_grad():
        base = value(ids, mask, T)
        # 3 more columns of padding on the left of every prompt
        left = value(torch.cat([pad, ids], 1), torch.cat([pad, mask], 1), T)
        # 3 more columns of padding on the right of every completion (T grows to T + 3)
        right = value(torch.cat([ids, pad], 1), torch.cat([mask, pad], 1), T + 3)[:, :T]
        # each row alone, with only its own padding
        alone = [value(ids[k:k + 1], mask[k:k + 1], T)[0] for k in range(4)]
    torch.testing.assert_close(left[real], base[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(right[real], base[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(alone)[real], base[real], atol=1e-5, rtol=0)


def test_value_model_from_reward_model_folds_the_normalisation():
    """The reward model outputs (w · h + b − μ) / s at the last real token. The value model started
    from it has the head (w / s, (b − μ) / s) on every column, so V(s_t) is the reward model's score
    of the prefix x, y_<t, and the head on the final column is the reward model's score itself."""
    rm = tasks.RewardModel(random_llama(seed=5)).eval()
    with torch.no_grad():
        rm.head.bias.fill_(0.7)
        rm.reward_mean.fill_(0.3)
        rm.reward_std.fill_(2.0)
    rm.requires_grad_(False)  # as load_reward_model leaves it
    value = value_model_from_reward_model(rm)
    # head: w / 2 and (0.7 − 0.3) / 2 = 0.2
    torch.testing.assert_close(value.head.weight[0], rm.head.weight[0] / 2.0)
    assert value.head.bias.item() == pytest.approx(0.2, abs=1e-7)
    # a trainable copy: its own weights, with gradients, and the frozen reward model untouched
    assert value.lm is not rm.lm and all(p.requires_grad for p in value.lm.parameters())
    assert not any(p.requires_grad for p in rm.parameters())
    ids, mask, c_mask, T = batch_with_different_lengths()
    P = ids.shape[1] - T  # prompt columns
    with torch.no_grad():
        v = value(ids, mask, T)  # [4, T]
        h = rm.lm.base_model(input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        for k, y in enumerate(COMPLETIONS):
            for t in range(len(y)):
                # by hand: (w · h + b − μ) / s at the column before y_t
                by_hand = (h[k, P + t - 1] @ rm.head.weight[0] + 0.7 - 0.3) / 2.0
                torch.testing.assert_close(v[k, t], by_hand, atol=1e-5, rtol=1e-5)
                # = the reward model's score of the prefix x, y_<t
                prefix = rm(ids[k:k + 1, :P + t], mask[k:k + 1, :P + t])[0]
                torch.testing.assert_close(v[k, t], prefix, atol=1e-5, rtol=1e-5)
        # one more (padding) column: index |y| now reads the last real token, where the reward
        # model reads its score: V there is r_φ(x, y) exactly
        pad = torch.zeros(4, 1, dtype=ids.dtype)
        v_ext = value(torch.cat([ids, pad], 1), torch.cat([mask, pad], 1), T + 1)  # [4, T+1]
        scores = rm(ids, mask)  # [4]
        lengths = c_mask.sum(1)
        torch.testing.assert_close(v_ext[torch.arange(4), lengths], scores, atol=1e-5, rtol=1e-5)
    # training the value model leaves the reward model as it was
    with torch.no_grad():
        before = rm(ids, mask)
        for p in value.lm.parameters():
            p.add_(0.1)
        torch.testing.assert_close(rm(ids, mask), before, rtol=0, atol=0)


#####################################################################################################
#####  bad input
#####################################################################################################


@pytest.mark.parametrize("kw, must_name", [
    ({"lam": 1.5}, r"--lam must be in \[0, 1\] \(got 1.5\)"),
    ({"lam": -0.1}, "--lam"),
    ({"gamma": -0.1}, r"--gamma must be in \[0, 1\] \(got -0.1\)"),
    ({"gamma": 1.01}, "--gamma"),
    ({"reward_model": "/no/such/dir"}, "--reward-model /no/such/dir: no such folder"),
    ({"batch_size": 10, "mini_batches": 4}, "--batch-size 10 must be a multiple of --mini-batches 4"),
    ({"kl_control": "adaptive", "beta": 0.0}, r"--kl-control adaptive scales β, so it needs --beta > 0"),
    ({"kl_control": "proportional", "beta": 0.0}, "--kl-control proportional"),
    ({"kl_estimator": "k2"}, "--kl-estimator"),
    ({"value_init": "zero"}, "--value-init"),
    ({"micro_batch": 0}, "--micro-batch"),
    ({"beta": -0.1}, "--beta"),
    ({"epsilon": 0.0}, "--epsilon"),
    ({"vf_coef": 0.0}, "--vf-coef"),
    ({"cliprange_value": -0.2}, "--cliprange-value"),
    ({"target_kl": 0.0}, "--target-kl"),
    ({"policy_loss": "ppo"}, "--policy-loss 'ppo': expected clip, kl-penalty or trpo"),
    ({"penalty_kl_control": "proportional"}, "--penalty-kl-control 'proportional': expected fixed or adaptive"),
    ({"penalty_beta": 0.0}, r"--penalty-beta must be > 0 \(got 0.0\)"),
    ({"penalty_target_kl": -0.01}, "--penalty-target-kl must be > 0"),
    ({"trpo_delta": 0.0}, r"--trpo-delta must be > 0 \(got 0.0\)"),
    ({"trpo_cg_iters": 0}, "--trpo-cg-iters must be ≥ 1"),
    ({"trpo_damping": -0.1}, "--trpo-damping must be ≥ 0"),
    ({"trpo_backtrack": 1.0}, r"--trpo-backtrack must be in \(0, 1\) \(got 1.0\)"),
    ({"trpo_backtrack": 0.0}, "--trpo-backtrack"),
    ({"trpo_backtrack_steps": 0}, "--trpo-backtrack-steps"),
    ({"policy_loss": "trpo", "ptx_coef": 0.5}, "--ptx-coef 0.5 needs --policy-loss clip or kl-penalty"),
    ({"policy_loss": "trpo", "dtype": "float16"}, "--dtype float16 with --policy-loss trpo"),
    ({"ptx_data": "sft.jsonl"}, "--ptx-data sft.jsonl needs --ptx-coef > 0"),
])
def test_validate_names_the_flag(kw, must_name):
    with pytest.raises(common.UsageError, match=must_name):
        ppo.validate(ppo.Args(**kw))


def test_validate_accepts_the_edges_and_train_validates_first(tmp_path):
    # the ends of the allowed ranges pass: γ, λ ∈ {0, 1}; β = 0 with a fixed β; one mini-batch
    for ok in ({"gamma": 0.0, "lam": 0.0}, {"gamma": 1.0, "lam": 1.0}, {"beta": 0.0},
               {"batch_size": 3, "mini_batches": 1}, {"cliprange_value": 0.0},
               {"policy_loss": "kl-penalty", "ptx_coef": 0.5}, {"policy_loss": "trpo", "trpo_damping": 0.0}):
        ppo.validate(ppo.Args(**ok))
    # train() checks its flags before it loads anything or creates the run folder
    out = tmp_path / "never"
    with pytest.raises(common.UsageError, match="--lam"):
        ppo.train(ppo.Args(lam=1.5, steps=1, batch_size=2, mini_batches=1, eval_samples=2, out_dir=str(out)))
    assert not out.exists()


#####################################################################################################
#####  the script: subprocesses started together on a small pool, and short runs in-process
#####################################################################################################

SHORT = ["--steps", "2", "--batch-size", "8", "--mini-batches", "2", "--ppo-epochs", "1",
         "--eval-samples", "16", "--eval-every", "1", "--log-every", "1"]
BAD = {  # run as the user would: exit code 2 and one line
    "bad_lam": (["--lam", "1.5"], "--lam must be in [0, 1] (got 1.5)"),
    "bad_reward_model": (["--reward-model", "/no/such/dir"], "--reward-model /no/such/dir"),
    "bad_policy_loss": (["--policy-loss", "ppo"], "--policy-loss"),
    "bad_trpo_delta": (["--policy-loss", "trpo", "--trpo-delta", "-1"], "--trpo-delta must be > 0 (got -1.0)"),
}
# the other two policy updates, end to end (the shipped reward model, so they start at once)
POLICY_RUNS = {
    "kl_penalty": SHORT + ["--policy-loss", "kl-penalty", "--ppo-epochs", "2"],
    "kl_penalty_fixed": SHORT + ["--policy-loss", "kl-penalty", "--ppo-epochs", "2", "--penalty-kl-control",
                                 "fixed", "--penalty-beta", "0.5"],
    "trpo": SHORT + ["--policy-loss", "trpo"],
}


@pytest.fixture(scope="session")
def small_rm(tmp_path_factory) -> str:
    """One small reward model on `tiny-pref` for every run of this session (5 steps of
    reward_model.py, normalised over 50 samples): `<run>/model`. Built in-process with the same
    flags as `python reward_model.py --max-steps 5 --norm-samples 50 --eval-size 50`."""
    out = tmp_path_factory.mktemp("ppo_rm") / "run"
    rm_lib.train(rm_lib.Args(max_steps=5, norm_samples=50, eval_size=50, eval_every=5, log_every=5,
                             out_dir=str(out)))
    return str(out / "model")


@pytest.fixture(scope="session")
def char_rm(tmp_path_factory) -> str:
    """A reward model saved by save_reward_model over a random Llama with the character tokenizer
    (the `tiny` family), whose vocabulary differs from tiny-pref's word tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None))
    torch.random.set_rng_state(state)
    path = tmp_path_factory.mktemp("char_rm") / "model"
    tasks.save_reward_model(tasks.RewardModel(lm), tok, path)
    return str(path)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, run_script):
    """Start the subprocesses of this module on a small pool: {name: (out_dir, future)}. The
    bad-input runs need no model, so they start first and run while this process trains the small
    reward model; the short run starts after that."""
    base = tmp_path_factory.mktemp("ppo_runs")
    pool = ThreadPoolExecutor(max_workers=2)

    def submit(name, argv):
        return base / name, pool.submit(run_script, "ppo.py", *argv, "--out-dir", str(base / name))
    futures = {name: submit(name, argv) for name, (argv, _) in BAD.items()}
    futures.update({name: submit(name, argv) for name, argv in POLICY_RUNS.items()})
    rm = request.getfixturevalue("small_rm")
    # the main run: adaptive KL control and PPO-ptx together, value model from the reward model
    futures["short"] = submit("short", SHORT + ["--reward-model", rm, "--kl-control", "adaptive",
                                                "--beta", "0.1", "--target-kl", "2", "--ptx-coef", "0.5",
                                                "--ptx-batch", "4"])
    yield futures
    pool.shutdown(wait=True)


def one_line_error(result, must_name: str) -> str:
    """Exit code 2, no traceback, exactly one line on stderr: `error: ...` naming the flag."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gives_one_line(runs, name):
    out, fut = runs[name]
    one_line_error(fut.result(), BAD[name][1])
    assert not out.exists()  # rejected before the run folder is made


def test_reward_model_with_another_vocabulary_is_refused(small_rm, char_rm, tmp_path):
    # tiny-pref's word tokenizer (3 specials + 73 words = 76 tokens) against the char tokenizer
    # (3 specials + 95 printable characters + newline = 99 tokens)
    n_word, n_char = len(build_word_tokenizer()), len(build_char_tokenizer())
    assert n_word != n_char
    with pytest.raises(common.UsageError, match="vocabulary") as e:
        ppo.train(ppo.Args(reward_model=char_rm, steps=1, batch_size=2, mini_batches=1, eval_samples=2,
                           out_dir=str(tmp_path / "run")))
    msg = str(e.value)
    assert msg.startswith(f"--reward-model {char_rm}")
    assert f"({n_char} tokens)" in msg and f"({n_word} tokens)" in msg
    assert "\n" not in msg


def test_reward_model_folder_without_its_head_names_the_flag(small_rm, tmp_path):
    # A common slip: the reward_model.py run folder instead of its `model` subfolder. The folder
    # exists (so validate lets it through), but it holds no reward_head.safetensors. The message should
    # name the flag, like every other bad-input message of the script.
    run_folder = os.path.dirname(small_rm)
    with pytest.raises(common.UsageError) as e:
        ppo.train(ppo.Args(reward_model=run_folder, steps=1, batch_size=2, mini_batches=1, eval_samples=2,
                           out_dir=str(tmp_path / "run")))
    msg = str(e.value)
    assert "reward_head.safetensors" in msg and run_folder in msg
    assert "--reward-model" in msg, msg


def first_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_whiten_scores_with_one_completion_per_rollout(small_rm, tmp_path):
    # --whiten-scores computes (s − mean) / (std + 1e-8) with torch's Bessel std, ÷ (n − 1). With
    # --batch-size 1 that is 0 / 0: the std of one number is NaN, and the NaN reaches every reward,
    # advantage, loss and weight (the next sampling step then fails). Either the flags are refused
    # with one line that names them, or the step stays finite (e.g. a std that treats n = 1 the way
    # common.masked_whiten does, ÷ max(n − 1, 1), which makes the whitened score 0).
    out = tmp_path / "b1"
    args = ppo.Args(reward_model=small_rm, steps=1, batch_size=1, mini_batches=1, ppo_epochs=1, eval_samples=2,
                    whiten_scores=True, save_model=False, out_dir=str(out))
    try:
        ppo.train(args)
    except common.UsageError as e:
        assert "--whiten-scores" in str(e) and "--batch-size" in str(e)
        return
    except RuntimeError as e:
        pytest.fail(f"--batch-size 1 --whiten-scores: NaN reached the policy ({str(e).splitlines()[0]})")
    row = first_rows(out)[1]
    for key in ("objective/scores", "loss/policy", "loss/value", "policy/grad_norm"):
        assert math.isfinite(row[key]), key


@pytest.mark.parametrize("line, why", [
    ('{"prompt": "the hotel"}', "missing key(s) 'completion'"),
    ('{"prompt": "the hotel", "completion": ""}', "'completion' is empty"),
    ('{"prompt": "", "completion": "was great"}', "'prompt' is empty"),
    ('{"prompt": "the hotel", "completion": ["was", "great"]}', "'completion' must be a string, got list"),
    ('["the hotel", "was great"]', "expected a JSON object"),
])
def test_ptx_data_bad_row_names_the_file_and_line(tmp_path, line, why):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "the hotel", "completion": "was great"}\n' + line + "\n")
    out = tmp_path / "never"
    with pytest.raises(common.UsageError) as e:
        ppo.train(ppo.Args(ptx_coef=0.5, ptx_data=str(path), steps=1, batch_size=2, mini_batches=1,
                           eval_samples=2, out_dir=str(out)))
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and why in msg and "\n" not in msg, msg
    assert not out.exists()  # refused before the run folder is made
    with pytest.raises(common.UsageError, match="--ptx-data .*: no such file"):
        ppo.read_ptx_data(str(tmp_path / "missing.jsonl"))


def test_ptx_data_prompt_completion_rows_are_the_ptx_loss(tmp_path):
    # --ptx-data with {"prompt", "completion"} rows (TRL's prompt-completion format). One step, one
    # mini-batch, one epoch: the PPO-ptx loss is computed before the only optimiser step, so at
    # θ = θ_ref, and it is the token mean −(1/N) Σ_t log π_ref(y_t | x, y_<t) over the completions'
    # tokens and their EOS (N = 3: "was", "great", EOS). Every draw of --ptx-batch is the one row.
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "the hotel", "completion": "was great", "extra": 1}) + "\n")
    assert ppo.read_ptx_data(str(path)) == [{"prompt": "the hotel", "completion": "was great"}]
    out = tmp_path / "run"
    ppo.train(ppo.Args(ptx_coef=0.5, ptx_data=str(path), ptx_batch=2, steps=1, batch_size=2, mini_batches=1,
                       ppo_epochs=1, eval_samples=2, save_model=False, out_dir=str(out)))
    row = first_rows(out)[1]
    model, tok = common.load_model("tiny-pref", torch.device("cpu"), trainable=False)
    ids, mask, c_mask, T = common.encode_prompt_completion(tok, ["the hotel"], ["was great"])
    assert int(c_mask.sum()) == 3
    with torch.no_grad():
        lp = common.token_logprobs(model, ids, mask, T)[0]  # [1, 3]
    expected = -float(common.masked_mean(lp, c_mask))  # −mean_t log π_ref(y_t | x, y_<t)
    assert row["loss/ptx"] == pytest.approx(expected, rel=1e-5)
    # and the stream draws only from those rows, not from the built-in grammar
    assert ppo.sft_batches(ppo.Args(ptx_batch=2), [], 0, ppo.read_ptx_data(str(path))).__next__() == (
        ["the hotel"] * 2, ["was great"] * 2)


def test_ptx_loss_is_the_token_mean_of_the_nll_and_its_gradient_is_scaled_by_the_coefficient():
    # PPO-ptx on two rows of different lengths: "the hotel" -> "was great" + EOS (3 tokens) and
    # "the movie" -> "was dirty and the music was poor" + EOS (8 tokens). The token mean divides the
    # summed NLL by all N = 11 tokens, so the long row weighs 8/11 (a mean of the two rows' means
    # would weigh each ½). Each row is scored alone here, unpadded, by the chain rule of π_θ.
    model, tok = common.load_model("tiny-pref", torch.device("cpu"))
    texts = (["the hotel", "the movie"], ["was great", "was dirty and the music was poor"])
    nll, n = 0.0, 0
    for prompt, completion in zip(*texts):
        ids, mask, c_mask, T = common.encode_prompt_completion(tok, [prompt], [completion])
        lp = common.token_logprobs(model, ids, mask, T)[0]  # [1, T], no padding in a row alone
        nll, n = nll - lp.sum(), n + int(c_mask.sum())
    assert n == 11
    expected = nll / n  # −(1/N) Σ_t log π_θ(y_t | x, y_<t)
    g_hand = torch.autograd.grad(0.5 * expected, model.lm_head.weight)[0]  # λ_ptx ∇L_ptx, λ_ptx = 0.5
    model.zero_grad()
    value = ppo.ptx_backward(model, tok, texts, 0.5, harness.MixedPrecision(torch.device("cpu"), "float32"),
                             torch.device("cpu"))
    assert value == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad, g_hand, atol=1e-7, rtol=1e-4)


def test_value_init_policy_and_micro_batches(small_rm, tmp_path):
    """In-process, one step each, --value-init policy and the proportional controller: the value
    model starts at V = 0, and --micro-batch 2 (two micro-batches per mini-batch of 4) gives the
    same first step as whole mini-batches: the same samples and, up to float rounding, the same
    losses, gradient norms and statistics."""
    rows = {}
    for mb in (None, 2):
        summary = ppo.train(ppo.Args(reward_model=small_rm, steps=1, batch_size=8, mini_batches=2, ppo_epochs=1,
                                     eval_samples=16, eval_every=1, value_init="policy", micro_batch=mb,
                                     kl_control="proportional", beta=0.05, target_kl=2.0, kl_horizon=100,
                                     save_model=False, out_dir=str(tmp_path / f"mb{mb}")))
        rows[mb] = first_rows(tmp_path / f"mb{mb}")[1]
        # π_θ = π_ref at the first rollout, so d = 0 and e = clip(0 / 2 − 1, ±0.2) = −0.2:
        #   β ← 0.05 · (1 − 0.2 · 8 / 100) = 0.05 · 0.984 = 0.0492
        assert rows[mb]["objective/kl"] == 0.0
        assert summary["final_beta"] == pytest.approx(0.0492, abs=1e-12)
    full, micro = rows[None], rows[2]
    for r in (full, micro):
        # a zero head: V(s_t) = 0 at every token, so R = Â and the critic explains nothing yet
        assert r["value/mean"] == 0.0
        assert r["value/explained_variance"] == 0.0
    # the same rollout: the same texts (gold reward) and lengths, ragged ones
    assert micro["objective/gold_reward"] == full["objective/gold_reward"]
    assert micro["completions/mean_length"] == full["completions/mean_length"]
    assert full["completions/mean_length"] != int(full["completions/mean_length"])
    # not vacuous: the policy and the value model both get a gradient, and the second mini-batch
    # sees a moved policy (ρ ≠ 1)
    assert full["policy/grad_norm"] > 0 and full["value/grad_norm"] > 0 and full["policy/approx_kl"] > 0
    for key in ("objective/scores", "loss/policy", "loss/value", "policy/grad_norm", "value/grad_norm",
                "policy/approx_kl", "policy/clipfrac", "policy/ratio_mean", "value/clipfrac",
                "value/returns_mean", "policy/entropy", "eval/score", "eval/kl_to_ref"):
        assert micro[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key


def test_short_run_writes_its_outputs_and_the_model_reloads(runs):
    from transformers import AutoModelForCausalLM

    out, fut = runs["short"]
    result = fut.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "PPO summary" in result.stdout
    rows = first_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert all("/" in k for k in r if k not in ("step", "time")), r  # namespaced metrics
    for r in rows[1:]:
        for key in ("objective/scores", "objective/kl", "objective/beta", "objective/non_score_reward",
                    "objective/rlhf_reward", "objective/gold_reward", "policy/approx_kl", "policy/clipfrac",
                    "policy/entropy", "loss/policy", "loss/value", "loss/ptx", "value/explained_variance",
                    "value/mean", "value/clipfrac", "completions/mean_length", "eval/gold_reward",
                    "eval/score", "eval/kl_to_ref"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert 0 <= r["policy/clipfrac"] <= 1 and r["policy/approx_kl"] >= 0
        assert 1 <= r["completions/mean_length"] <= 20
        # −β Σ_t KL_t per completion, averaged: −β · objective/kl
        assert r["objective/non_score_reward"] == pytest.approx(-r["objective/beta"] * r["objective/kl"], abs=1e-6)
        assert r["loss/ptx"] > 0  # a negative log-likelihood (PPO-ptx, --ptx-coef 0.5)
    # the first rollout comes from π_θ = π_ref: KL 0, and 0 at the evaluation before training
    assert rows[1]["objective/kl"] == 0.0 and rows[0]["eval/kl_to_ref"] == 0.0
    # adaptive β (the notes' rule, d_targ = 2, band [1.333, 3]):
    #   step 1 uses β = 0.1; its d = 0 < 2/1.5, so step 2 uses 0.1 / 2 = 0.05;
    #   after step 2, β = adaptive_beta(0.05, d_2, 2): 0.025 if d_2 < 1.333 (a tiny step moves little)
    assert rows[1]["objective/beta"] == 0.1 and rows[2]["objective/beta"] == 0.05
    assert rows[2]["objective/kl"] < 2 / 1.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_beta"] == 0.025 == adaptive_beta(0.05, rows[2]["objective/kl"], 2.0)

    assert summary["start_gold_reward"] == rows[0]["eval/gold_reward"]
    assert summary["final_gold_reward"] == rows[2]["eval/gold_reward"]
    assert summary["final_score"] == rows[2]["eval/score"] and summary["kl_to_ref"] == rows[2]["eval/kl_to_ref"]
    assert summary["wall_seconds"] > 0 and summary["script"] == "ppo" and summary["steps"] == 2
    assert set(summary["config"]) == set(ppo.Args.__dataclass_fields__)
    assert summary["config"]["kl_control"] == "adaptive" and summary["config"]["ptx_coef"] == 0.5

    # the saved policy reloads with from_pretrained, and it has moved off the SFT policy
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    sft = AutoModelForCausalLM.from_pretrained(common.MODELS_DIR / "tiny-pref")
    assert policy.config.model_type == "llama"
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), sft.parameters()))
    # the value model too: its LM folder and its head
    AutoModelForCausalLM.from_pretrained(out / "value_model")
    head = torch.load(out / "value_model" / "value_head.pt", weights_only=True)
    assert head["weight"].shape == (policy.config.hidden_size,) and head["bias"].shape == ()


def test_other_architecture_and_data_file_train_their_own_reward_model(tiny_random_other_arch, tmp_path):
    # The real-model path, offline: a GPT-2 (not Llama) with the character tokenizer, a user's
    # --data file, and no --reward-model. With a model other than tiny-pref, ppo.py must first
    # train a reward model on that model and data (reward_model.py's defaults), into
    # <out-dir>/reward_model, then start the value model from it. PPO-ptx draws its SFT text from
    # the chosen completions of --data. There is no gold reward for a user's data: None, not NaN.
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"review {i}:", "chosen": " good", "rejected": " bad"}) + "\n"
                            for i in range(20)))
    out = tmp_path / "run"
    s = ppo.train(ppo.Args(model=str(tiny_random_other_arch), data=str(data), out_dir=str(out), steps=2,
                           batch_size=4, mini_batches=2, ppo_epochs=1, eval_samples=8, eval_every=1,
                           max_new_tokens=6, ptx_coef=0.5, ptx_batch=4, log_every=1))
    assert (out / "reward_model" / "model" / "reward_head.safetensors").is_file()
    assert s["reward_model"] == str(out / "reward_model" / "model")
    assert s["start_gold_reward"] is None and s["final_gold_reward"] is None
    assert math.isfinite(s["final_score"]) and math.isfinite(s["kl_to_ref"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("objective/gold_reward" not in r for r in rows)
    assert all(math.isfinite(r["loss/ptx"]) for r in rows if r["step"] > 0)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "gpt2"


def check_policy_run(out, result) -> tuple[list[dict], dict]:
    """A short run finished, logged namespaced metrics for steps 0, 1, 2, summarised and saved a
    policy that from_pretrained reloads. -> (rows, summary)."""
    from transformers import AutoModelForCausalLM

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "PPO summary" in result.stdout
    rows = first_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert all("/" in k for k in r if k not in ("step", "time")), r
    for r in rows[1:]:
        for key in ("objective/scores", "objective/kl", "objective/gold_reward", "policy/kl_old", "policy/entropy",
                    "loss/value", "value/grad_norm", "eval/gold_reward", "eval/score", "eval/kl_to_ref"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["policy/kl_old"] >= 0  # an exact KL
        assert "policy/clipfrac" not in r  # nothing is clipped in either update
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_gold_reward"] == rows[2]["eval/gold_reward"]
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "llama"
    return rows, summary


def test_kl_penalty_short_run_logs_adapts_beta_and_saves(runs):
    out, fut = runs["kl_penalty"]
    rows, summary = check_policy_run(out, fut.result())
    assert summary["policy_loss"] == "kl-penalty"
    for r in rows[1:]:
        for key in ("loss/policy", "penalty/kl", "penalty/beta_pen", "policy/surrogate", "policy/approx_kl",
                    "policy/grad_norm"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["penalty/kl"] >= 0
    # β_pen starts at --penalty-beta's default 1, and each rollout's d moves it by the notes' rule
    # with d_targ = 0.01: step 2 uses adaptive_beta(1, d_1, 0.01), the summary holds the one after step 2
    assert rows[1]["penalty/beta_pen"] == 1.0
    assert rows[2]["penalty/beta_pen"] == adaptive_beta(1.0, rows[1]["policy/kl_old"], 0.01)
    assert summary["final_penalty_beta"] == adaptive_beta(rows[2]["penalty/beta_pen"], rows[2]["policy/kl_old"], 0.01)
    # the policy moved: two epochs of two mini-batches give a non-zero d
    assert rows[1]["policy/kl_old"] > 0


def test_kl_penalty_fixed_keeps_beta_pen_at_every_update(runs):
    # --penalty-kl-control fixed: the notes' plain L^KLPEN, β_pen = --penalty-beta 0.5 at every update
    # and after the last, whatever d was (the policy moved: d > 0, which the rule would have acted on)
    out, fut = runs["kl_penalty_fixed"]
    rows, summary = check_policy_run(out, fut.result())
    assert [r["penalty/beta_pen"] for r in rows[1:]] == [0.5, 0.5]
    assert summary["final_penalty_beta"] == 0.5
    assert rows[1]["policy/kl_old"] > 0


def test_trpo_short_run_logs_its_line_search_and_saves(runs):
    out, fut = runs["trpo"]
    rows, summary = check_policy_run(out, fut.result())
    assert summary["policy_loss"] == "trpo"
    failed = 0
    for r in rows[1:]:
        for key in ("trpo/step_fraction", "trpo/line_search_failed", "trpo/backtracks", "trpo/kl",
                    "trpo/full_step_kl", "trpo/surrogate_gain", "trpo/expected_gain", "trpo/xFx",
                    "trpo/grad_norm", "trpo/step_norm"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert "loss/policy" not in r and "policy/grad_norm" not in r  # no optimiser step of the policy
        if r["trpo/line_search_failed"]:
            failed += 1
            assert r["trpo/step_fraction"] == 0.0 and r["policy/kl_old"] == pytest.approx(0.0, abs=1e-6)
        else:
            # the accepted step is θ_old + 0.8^j s, inside the trust region δ = 0.01, and improves L
            j = r["trpo/backtracks"]
            assert r["trpo/step_fraction"] == pytest.approx(0.8 ** j, rel=1e-12)
            assert r["trpo/kl"] <= 0.01 and r["trpo/surrogate_gain"] > 0
            # the KL measured after the update (in --micro-batch chunks) is the line search's KL
            assert r["policy/kl_old"] == pytest.approx(r["trpo/kl"], rel=1e-3, abs=1e-7)
        assert r["trpo/xFx"] > 0 and r["trpo/grad_norm"] > 0
    assert summary["trpo_line_search_failures"] == failed


def test_trpo_micro_batches_give_the_same_step(tmp_path):
    """In-process, one step each: TRPO over the whole batch at once and over micro-batches of 2
    sequences (g, F v, L and D̄_KL summed by token share) take the same step, up to float rounding.
    One CG iteration, x = (gᵀg / gᵀ(F + λI)g) g, so that x rests on a single F·v: each further
    iteration amplifies float32 rounding (F is badly conditioned; at k = 10 the two xᵀFx differ by
    ~0.1%, though one F·v of the two agrees to ~2e-7: rounding, not a different F)."""
    rows = {}
    for mb in (None, 2):
        ppo.train(ppo.Args(policy_loss="trpo", trpo_cg_iters=1, steps=1, batch_size=8, mini_batches=2, ppo_epochs=1,
                           eval_samples=8, eval_every=1, micro_batch=mb, save_model=False,
                           out_dir=str(tmp_path / f"mb{mb}")))
        rows[mb] = first_rows(tmp_path / f"mb{mb}")[1]
    for key in ("trpo/grad_norm", "trpo/xFx", "trpo/step_norm", "trpo/expected_gain", "trpo/full_step_kl",
                "trpo/kl", "trpo/step_fraction", "policy/kl_old", "eval/kl_to_ref"):
        assert rows[2][key] == pytest.approx(rows[None][key], rel=1e-4, abs=1e-7), key
