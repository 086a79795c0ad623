"""Tests of reinforce.py: the maths by hand and by exact enumeration, then the script end to end.

Notes `000_e75205f5b80b652d.txt` / `001_f61164bbf1e6de76.txt` ("Policy gradient"),
`002_53ad65790e79eb4c.txt` §4.4 (the Ψ_t variants) and `004_e77bb721393eb42b.txt` (reward-to-go,
"Why is the Baseline Unbiased?"). Every expected number is derived in a comment next to it.
"""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
import tasks
import reinforce
from reinforce import (per_token_rewards, psi_values, reinforce_loss, reward_to_go, rloo_baseline,
                       split_half_variance, state_features, value_head, value_loss)

LOG_P = torch.log(torch.tensor([1.0, 2.0, 3.0]))  # softmax logits z with π = (1/6, 2/6, 3/6)


#####################################################################################################
#####  reward_to_go
#####################################################################################################


def padded_rewards():
    # three completions of lengths 4, 2 and 1; 99 sits on the padding and must be ignored
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, 99.0], [7.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return rewards, mask


def test_reward_to_go_gamma_one():
    # G_t = Σ_{k ≥ t} r_k:
    #   row 0: [1+2+3+4, 2+3+4, 3+4, 4] = [10, 9, 7, 4]
    #   row 1: [5+6, 6, 0, 0]           = [11, 6, 0, 0]     (the 99s are padding)
    #   row 2: [7, 0, 0, 0]
    rewards, mask = padded_rewards()
    G = reward_to_go(rewards, mask, 1.0)
    assert G.tolist() == [[10, 9, 7, 4], [11, 6, 0, 0], [7, 0, 0, 0]]


def test_reward_to_go_gamma_0_9():
    # G_t = r_t + γ G_{t+1}, from the last real token back, γ = 0.9:
    #   row 0: G_3 = 4;  G_2 = 3 + 0.9·4 = 6.6;  G_1 = 2 + 0.9·6.6 = 7.94;  G_0 = 1 + 0.9·7.94 = 8.146
    #          (check G_0 directly: 1 + 0.9·2 + 0.81·3 + 0.729·4 = 1 + 1.8 + 2.43 + 2.916 = 8.146)
    #   row 1: G_1 = 6;  G_0 = 5 + 0.9·6 = 10.4
    #   row 2: G_0 = 7
    rewards, mask = padded_rewards()
    G = reward_to_go(rewards, mask, 0.9)
    torch.testing.assert_close(G, torch.tensor([[8.146, 7.94, 6.6, 4.0], [10.4, 6.0, 0, 0], [7.0, 0, 0, 0]]))


def test_reward_to_go_gamma_zero_is_the_reward_and_docstring_example():
    rewards, mask = padded_rewards()
    # γ = 0: G_t = r_t (0^0 = 1 for k = t, 0 for k > t), padding 0
    torch.testing.assert_close(reward_to_go(rewards, mask, 0.0), rewards * mask)
    # the docstring: r = [1, 2, 3], mask [1, 1, 0]: γ = 1 -> [3, 2, 0]; γ = 0.5 -> [1 + 0.5·2, 2, 0]
    r, m = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0]])
    assert reward_to_go(r, m, 1.0).tolist() == [[3, 2, 0]]
    assert reward_to_go(r, m, 0.5).tolist() == [[2, 2, 0]]


#####################################################################################################
#####  per-token rewards: the KL terms everywhere, the score at the last completion token
#####################################################################################################


def test_per_token_rewards_score_lands_on_the_last_token():
    # completion 0: "85<eos>", length 3, score 1 -> the score on token 2 (the EOS)
    # completion 1: "<eos>", length 1, score 0
    # completion 2: cut at the limit (no EOS), length 4, score 0 (unfinished)
    # log(π/π_ref) per token = 0.1·(t+1) on every position; β = 0.5 -> r_t = −0.05·(t+1) on real tokens
    scores = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    log_ratio = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(3, 4)
    r = per_token_rewards(scores, mask, log_ratio, beta=0.5)
    expected = torch.tensor([[-0.05, -0.10, -0.15 + 1.0, 0.0],  # −β·0.3 + 1 at the EOS
                             [-0.05, 0.0, 0.0, 0.0],
                             [-0.05, -0.10, -0.15, -0.20]])
    torch.testing.assert_close(r, expected)
    # β = 0 (or no reference): only the score, at the last completion token
    r0 = per_token_rewards(scores, mask)
    assert r0.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert per_token_rewards(scores, mask, log_ratio, beta=0.0).tolist() == r0.tolist()


#####################################################################################################
#####  Ψ_t: return, reward-to-go, baselines
#####################################################################################################


def test_rloo_one_correct_of_four():
    # R = [1, 0, 0, 0], K = 4: b_i = (Σ_j R_j − R_i)/3
    #   b = [(1 − 1)/3, (1 − 0)/3, (1 − 0)/3, (1 − 0)/3] = [0, 1/3, 1/3, 1/3]
    #   Ψ = R − b = [1, −1/3, −1/3, −1/3]
    R = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rloo_baseline(R, 4), torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))
    # the same through psi_values, one token per completion (score on that token, β = 0)
    psi = psi_values(R[:, None], torch.ones(4, 1), 1.0, "reward-to-go", "rloo", 4)
    torch.testing.assert_close(psi[:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_rloo_groups_are_independent():
    # group 1 [1, 0, 0, 0] as above; group 2 [1, 1, 0, 0]: Σ = 2, b = [1/3, 1/3, 2/3, 2/3]
    R = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    torch.testing.assert_close(rloo_baseline(R, 4),
                               torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3]))
    # K = 2: b_i is simply the other sample's return
    assert rloo_baseline(torch.tensor([3.0, 5.0, -1.0, 2.0]), 2).tolist() == [5, 3, 2, -1]
    with pytest.raises(ValueError, match="K ≥ 2"):
        rloo_baseline(R, 1)
    with pytest.raises(ValueError, match="groups of K = 3"):
        rloo_baseline(R, 3)


def test_psi_variants_by_hand():
    # two completions of one prompt (K = 2), γ = 1, rewards with KL-like terms:
    #   τ_0: r = [−0.1, −0.2, 1.0]  -> G = [−0.1 − 0.2 + 1, −0.2 + 1, 1] = [0.7, 0.8, 1.0], R = 0.7
    #   τ_1: r = [−0.3, 0.5, 9]     (length 2) -> G = [0.2, 0.5, 0], R = 0.2
    r = torch.tensor([[-0.1, -0.2, 1.0], [-0.3, 0.5, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # return: Ψ_t = R on every real token
    torch.testing.assert_close(psi_values(r, m, 1.0, "return"), torch.tensor([[0.7, 0.7, 0.7], [0.2, 0.2, 0.0]]))
    # reward-to-go: Ψ_t = G_t
    torch.testing.assert_close(psi_values(r, m, 1.0, "reward-to-go"), torch.tensor([[0.7, 0.8, 1.0], [0.2, 0.5, 0.0]]))
    # batch mean of R: b = (0.7 + 0.2)/2 = 0.45 -> G − 0.45
    torch.testing.assert_close(psi_values(r, m, 1.0, "reward-to-go", "mean"),
                               torch.tensor([[0.25, 0.35, 0.55], [-0.25, 0.05, 0.0]]))
    # RLOO, K = 2: b_0 = R_1 = 0.2, b_1 = R_0 = 0.7
    torch.testing.assert_close(psi_values(r, m, 1.0, "reward-to-go", "rloo", 2),
                               torch.tensor([[0.5, 0.6, 0.8], [-0.5, -0.2, 0.0]]))
    # return − RLOO: [0.7 − 0.2] and [0.2 − 0.7] on every real token
    torch.testing.assert_close(psi_values(r, m, 1.0, "return", "rloo", 2),
                               torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]]))
    with pytest.raises(ValueError, match="unknown psi"):
        psi_values(r, m, 1.0, "advantage")
    with pytest.raises(ValueError, match="unknown baseline"):
        psi_values(r, m, 1.0, "return", "median")


#####################################################################################################
#####  the learned baseline V_ψ(s_t) (--baseline value)
#####################################################################################################


def test_value_loss_by_hand():
    # V = [[0.5, 1.0, 9], [0.0, 9, 9]], G = [[1, 0, 7], [2, 7, 7]], mask [[1, 1, 0], [1, 0, 0]]:
    #   the three real tokens' errors (V − G)²: (0.5 − 1)² = 0.25, (1 − 0)² = 1, (0 − 2)² = 4
    #   L_V = (0.25 + 1 + 4)/3 = 1.75 (a mean over tokens, no ½)
    #   ∂L_V/∂V = 2 (V − G)/3 on real tokens: [−1/3, 2/3, 0], [−4/3, 0, 0]; none reaches G
    V = torch.tensor([[0.5, 1.0, 9.0], [0.0, 9.0, 9.0]], requires_grad=True)
    G = torch.tensor([[1.0, 0.0, 7.0], [2.0, 7.0, 7.0]], requires_grad=True)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = value_loss(V, G, m)
    assert loss.item() == pytest.approx(1.75)
    gV, gG = torch.autograd.grad(loss, (V, G), allow_unused=True)
    torch.testing.assert_close(gV, torch.tensor([[-1 / 3, 2 / 3, 0.0], [-4 / 3, 0.0, 0.0]]))
    assert gG is None  # the target G_t is a constant


def test_psi_with_the_value_baseline_is_g_minus_v_detached():
    # the rewards of test_psi_variants_by_hand: G = [[0.7, 0.8, 1.0], [0.2, 0.5, 0]];
    # V(s_t) = [[0.5, 1.0, 0.3], [0.4, −0.5, 8]] -> Ψ = G − V = [[0.2, −0.2, 0.7], [−0.2, 1.0, 0]]
    # (one number per TOKEN, unlike the other baselines; padding 0 whatever V holds there)
    r = torch.tensor([[-0.1, -0.2, 1.0], [-0.3, 0.5, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    V = torch.tensor([[0.5, 1.0, 0.3], [0.4, -0.5, 8.0]], requires_grad=True)
    psi = psi_values(r, m, 1.0, "reward-to-go", "value", values=V)
    torch.testing.assert_close(psi, torch.tensor([[0.2, -0.2, 0.7], [-0.2, 1.0, 0.0]]))
    assert not psi.requires_grad  # V enters Ψ as a number: the policy loss sends nothing to ψ
    z = LOG_P.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)[torch.tensor([[0, 1, 2], [2, 1, 0]])]  # [2, 3]
    loss, _ = reinforce_loss(logp, psi, m)
    gz, gV = torch.autograd.grad(loss, (z, V), allow_unused=True)
    assert gV is None and gz.abs().sum() > 0
    with pytest.raises(ValueError, match="psi='reward-to-go' only"):
        psi_values(r, m, 1.0, "return", "value", values=V)
    with pytest.raises(ValueError, match="needs values"):
        psi_values(r, m, 1.0, "reward-to-go", "value")
    with pytest.raises(ValueError, match="needs values"):
        psi_values(r, m, 1.0, "reward-to-go", "value", values=V[:, :2])


def test_state_features_line_up_with_the_logits_of_y_t(tiny_path):
    # tiny ties its embeddings, so logits = h_t · E^T: the features of the column that chooses y_t,
    # times the output matrix, must give the very log-probs that common.token_logprobs returns
    model, tok = common.load_model(str(tiny_path), torch.device("cpu"), trainable=False)
    p_ids, p_mask = common.left_pad([tok.encode("12+7="), tok.encode("3+4=")], tok.pad_token_id)
    c_ids = torch.tensor([[tok.encode("1")[0], tok.encode("9")[0], tok.eos_token_id],
                          [tok.encode("7")[0], tok.eos_token_id, tok.pad_token_id]])
    c_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
    h = state_features(model, ids, mask, 3)  # [2, 3, d]
    assert h.shape == (2, 3, model.config.hidden_size) and not h.requires_grad
    logp_from_h = torch.log_softmax(model.lm_head(h), -1).gather(-1, c_ids[..., None]).squeeze(-1)
    logp, _ = common.token_logprobs(model, ids, mask, 3)
    torch.testing.assert_close(logp_from_h * c_mask, logp, atol=1e-5, rtol=1e-5)
    head = value_head(model.config.hidden_size, torch.device("cpu"))
    assert head.weight.dtype == torch.float32 and head(h).abs().sum() == 0  # V = 0 at the start


def test_a_state_value_baseline_keeps_the_expected_gradient_by_exact_enumeration():
    # The two-step MDP of test_reward_to_go_has_the_same_expected_gradient_as_the_return (γ = 1):
    # any V(s_t) that depends on the state only (here V(s_0) = 0.7, V(s_1 = a_0) = (−2, 5), far
    # from the true values) leaves E[ĝ] = ∇J exactly (notes 004, "Why is the Baseline Unbiased?").
    theta = torch.tensor([[0.2, -0.3], [0.5, 0.1], [-0.4, 0.7]], requires_grad=True)
    u, v = torch.tensor([1.0, -1.0]), torch.tensor([[0.0, 2.0], [3.0, -1.0]])
    V1 = torch.tensor([-2.0, 5.0])
    trajectories = list(itertools.product(range(2), repeat=2))

    def logps(a0, a1):
        return torch.stack([torch.log_softmax(theta[0], -1)[a0],
                            torch.log_softmax(theta[1 + a0], -1)[a1]])[None]  # [1, 2]
    J = sum(logps(a0, a1).sum().exp() * (u[a0] + v[a0, a1]) for a0, a1 in trajectories)
    true = torch.autograd.grad(J, theta)[0]
    total = torch.zeros_like(theta)
    for a0, a1 in trajectories:
        lp = logps(a0, a1)
        rewards = torch.stack([u[a0], v[a0, a1]])[None]  # [1, 2]
        values = torch.stack([torch.tensor(0.7), V1[a0]])[None]  # V(s_0), V(s_1)   [1, 2]
        psi = psi_values(rewards, torch.ones(1, 2), 1.0, "reward-to-go", "value", values=values)
        loss, _ = reinforce_loss(lp, psi, torch.ones(1, 2))
        total += lp.sum().exp().detach() * -torch.autograd.grad(loss, theta)[0]
    torch.testing.assert_close(total, true)


#####################################################################################################
#####  the estimator ĝ and the pseudo-loss, on a 3-action softmax
#####################################################################################################


def grad_of(scalar, z):
    (g,) = torch.autograd.grad(scalar, z, retain_graph=True)
    return g


def test_pseudo_loss_gradient_is_the_hand_computed_g_hat():
    # One state, 3 actions, logits z = log(1, 2, 3): π = (1/6, 2/6, 3/6).
    # ∇_z log π(a) = e_a − π  (the softmax's log-derivative).
    # D = two trajectories of a repeated bandit (the same state at every step):
    #   τ_1: actions (0, 2), Ψ = (1, 2)
    #   τ_2: action  (1),    Ψ = (−1), then padding (action 0, Ψ 7: masked, must be ignored)
    # ĝ = 1/|D| Σ_τ Σ_t (e_{a_t} − π) Ψ_t:
    #   τ_1: 1·(5/6, −2/6, −3/6) + 2·(−1/6, −2/6, 3/6) = (3/6, −6/6, 3/6)
    #   τ_2: −1·(−1/6, 4/6, −3/6)                         = (1/6, −4/6, 3/6)
    #   ĝ = 1/2 (4/6, −10/6, 6/6) = (1/3, −5/6, 1/2)        (sums to 0, as softmax gradients do)
    # and ∇_z L = −ĝ.
    z = LOG_P.clone().requires_grad_(True)
    logp_all = torch.log_softmax(z, -1)  # [3]
    actions = torch.tensor([[0, 2], [1, 0]])
    logp = logp_all[actions]  # [2, 2]
    psi = torch.tensor([[1.0, 2.0], [-1.0, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = reinforce_loss(logp, psi, mask)
    g_hat = -grad_of(loss, z)
    torch.testing.assert_close(g_hat, torch.tensor([1 / 3, -5 / 6, 1 / 2]))
    # Its value: L = −1/2 [1·log(1/6) + 2·log(1/2) − 1·log(1/3)] = 1/2 (log 6 + 2 log 2 − log 3)
    #              = 1/2 log 8 = 1.5 log 2 — a number with no meaning (the notes' warning).
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    # metrics over the three real tokens: E[Ψ] = (1 + 2 − 1)/3 = 2/3, E[Ψ²] = (1 + 4 + 1)/3 = 2
    assert m["psi_mean"].item() == pytest.approx(2 / 3) and m["psi_second_moment"].item() == pytest.approx(2.0)


def test_pseudo_loss_does_not_differentiate_through_psi():
    # Ψ computed from θ (as the KL-shaped rewards are) is still a constant for the loss
    z = LOG_P.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)[torch.tensor([[2]])]  # [1, 1]
    loss, _ = reinforce_loss(logp, 3 * logp, torch.ones(1, 1))
    # ∇_z [−log π(2) · Ψ] with Ψ = 3 log(1/2) held fixed: −Ψ (e_2 − π) = −3 log(1/2) (−1/6, −2/6, 3/6)
    expected = -3 * math.log(0.5) * torch.tensor([-1 / 6, -2 / 6, 3 / 6])
    torch.testing.assert_close(grad_of(loss, z), expected)


#####################################################################################################
#####  the baseline adds no bias: exact enumeration on a 3-action softmax
#####################################################################################################

Q = torch.tensor([1.0, 0.0, 3.0])  # the return of each action (a bandit: Q(a) = R)
# the true gradient ∇_z J, J = Σ_a π(a) Q(a) = 1/6 + 0 + 3/2 = 5/3:
#   ∇_z J = π ⊙ (Q − J) = (1/6·(−2/3), 2/6·(−5/3), 3/6·(4/3)) = (−1/9, −5/9, 2/3)
TRUE_GRAD = torch.tensor([-1 / 9, -5 / 9, 2 / 3])


def test_expected_score_times_a_baseline_is_zero():
    # notes 004: E_a[∇ log π(a) · b] = Σ_a π(a) (e_a − π) b = b (π − π) = 0
    z = LOG_P.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    pi = logp.exp().detach()
    for b in (1.0, -2.5, 10.0):
        expectation = sum(pi[a] * grad_of(logp[a] * b, z) for a in range(3))
        torch.testing.assert_close(expectation, torch.zeros(3), atol=1e-6, rtol=0)
        # not because each term is 0: the individual terms are large
        assert max(grad_of(logp[a] * b, z).abs().max() for a in range(3)) > 0.4 * abs(b)


def test_q_minus_b_has_the_same_expected_gradient_as_q():
    # E_a[∇log π(a) Q(a)] = ∇J (the log-derivative trick), and E_a[∇log π(a)(Q(a) − b)] is the same
    z = LOG_P.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    pi = logp.exp().detach()
    with_q = sum(pi[a] * grad_of(logp[a] * Q[a], z) for a in range(3))
    torch.testing.assert_close(with_q, TRUE_GRAD)
    for b in (0.5, 5 / 3, -4.0):
        with_q_minus_b = sum(pi[a] * grad_of(logp[a] * (Q[a] - b), z) for a in range(3))
        torch.testing.assert_close(with_q_minus_b, TRUE_GRAD)


def expected_g_hat(baseline: str, k: int):
    """E[ĝ] over every one of the 3^K joint samples (a_1..a_K) of one prompt, weighted by its
    probability, with ĝ = −∇ reinforce_loss(log π(a_i), Ψ from psi_values, one token each)."""
    z = LOG_P.clone().requires_grad_(True)
    logp_all = torch.log_softmax(z, -1)
    pi = logp_all.exp().detach()
    total = torch.zeros(3)
    for actions in itertools.product(range(3), repeat=k):
        a = torch.tensor(actions)
        rewards = Q[a][:, None]  # [K, 1], the score on the only token
        psi = psi_values(rewards, torch.ones(k, 1), 1.0, "reward-to-go", baseline, k)  # [K, 1]
        loss, _ = reinforce_loss(logp_all[a][:, None], psi, torch.ones(k, 1))
        total += pi[a].prod() * -grad_of(loss, z)
    return total


def test_rloo_and_the_batch_mean_by_exact_enumeration():
    # no baseline and RLOO (b_i from the other samples only): exactly the true gradient
    torch.testing.assert_close(expected_g_hat("none", 2), TRUE_GRAD)
    torch.testing.assert_close(expected_g_hat("rloo", 2), TRUE_GRAD)
    torch.testing.assert_close(expected_g_hat("rloo", 3), TRUE_GRAD)
    # the batch mean includes the sample's own return: b = R_i/K + (others)/K, and
    # E[∇log π(a_i) R_i/K] = ∇J/K, so E[ĝ] = (1 − 1/K) ∇J — the right direction, shrunk:
    #   K = 2: ∇J/2;  K = 3: 2∇J/3
    torch.testing.assert_close(expected_g_hat("mean", 2), TRUE_GRAD / 2)
    torch.testing.assert_close(expected_g_hat("mean", 3), TRUE_GRAD * 2 / 3)


#####################################################################################################
#####  reward-to-go: causality, by exact enumeration of a two-step MDP
#####################################################################################################


def test_reward_to_go_has_the_same_expected_gradient_as_the_return():
    # A two-step MDP: π(a_0) = softmax(θ[0]); then s_1 = a_0 and π(a_1|s_1) = softmax(θ[1 + a_0]).
    # Rewards r_0 = u[a_0], r_1 = v[a_0, a_1]. The 4 trajectories are enumerated exactly, and
    # E[ĝ] = Σ_τ P(τ) ĝ(τ) is compared with the true gradient of J_γ = Σ_τ P(τ) Σ_t γ^t r_t.
    # γ = 1: Ψ = R(τ) and Ψ = G_t both give ∇J (the dropped terms ∇log π(a_1|s_1)·r_0 average to 0,
    # notes 004 "because of the causality").
    # γ = 0.5: Ψ = R(τ) still gives ∇J_γ, but G_t without the γ^t factor does not (reinforce.py's
    # docstring): its step-1 term is ∇log π(a_1|s_1)·r_1 where ∇J_γ has γ·∇log π(a_1|s_1)·r_1.
    theta = torch.tensor([[0.2, -0.3], [0.5, 0.1], [-0.4, 0.7]], requires_grad=True)
    u = torch.tensor([1.0, -1.0])
    v = torch.tensor([[0.0, 2.0], [3.0, -1.0]])
    trajectories = list(itertools.product(range(2), repeat=2))

    def step_logps(a0, a1):
        lp0 = torch.log_softmax(theta[0], -1)[a0]
        lp1 = torch.log_softmax(theta[1 + a0], -1)[a1]
        return torch.stack([lp0, lp1])[None]  # [1, 2]

    for gamma in (1.0, 0.5):
        J = sum(step_logps(a0, a1).sum().exp() * (u[a0] + gamma * v[a0, a1]) for a0, a1 in trajectories)
        true = torch.autograd.grad(J, theta)[0]
        expected = {}
        for psi in ("return", "reward-to-go"):
            total = torch.zeros_like(theta)
            for a0, a1 in trajectories:
                logp = step_logps(a0, a1)  # [1, 2]
                rewards = torch.stack([u[a0], v[a0, a1]])[None]  # [1, 2]
                Psi = psi_values(rewards, torch.ones(1, 2), gamma, psi)
                loss, _ = reinforce_loss(logp, Psi, torch.ones(1, 2))
                total += logp.sum().exp().detach() * -torch.autograd.grad(loss, theta)[0]
            expected[psi] = total
        torch.testing.assert_close(expected["return"], true)
        if gamma == 1.0:
            torch.testing.assert_close(expected["reward-to-go"], true)
        else:
            assert (expected["reward-to-go"] - true).abs().max() > 0.05


#####################################################################################################
#####  the split-half estimate of tr Cov(ĝ)
#####################################################################################################


def test_split_half_variance_by_hand_and_by_simulation():
    # by hand: ĝ_1 = (1, 0), ĝ_2 = (0, 1), n1 = n2 = 2: ‖ĝ_1 − ĝ_2‖² = 2, × n1 n2/n² = 4/16 -> 0.5
    assert split_half_variance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 2, 2) == 0.5
    # by simulation: per-prompt gradients x_k ~ N(0, σ² I_d), ĝ = mean of n of them:
    #   tr Cov(ĝ) = d σ² / n = 50 · 4 / 8 = 25; the estimate averaged over many draws agrees,
    #   for equal halves (4 + 4) and unequal ones (1 + 7)
    gen = torch.Generator().manual_seed(0)
    for n1 in (4, 1):
        x = torch.randn(2000, 8, 50, generator=gen) * 2.0  # [draws, n, d], σ = 2, d = 50
        g1, g2 = x[:, :n1].mean(1), x[:, n1:].mean(1)
        est = sum(split_half_variance(a, b, n1, 8 - n1) for a, b in zip(g1, g2)) / len(x)
        assert est == pytest.approx(25.0, rel=0.03)


#####################################################################################################
#####  the training loop in-process
#####################################################################################################


def small_args(tmp_path, name, **kw):
    return reinforce.Args(steps=1, prompts_per_step=4, samples_per_prompt=3, eval_size=4,
                          temperature=1.5, save_model=False, out_dir=str(tmp_path / name), **kw)


def first_step(tmp_path, name):
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[1])


def test_micro_batches_and_the_split_do_not_change_the_gradient(tiny_path, tmp_path):
    """One step with the whole batch, with micro-batches of 5 (which straddle prompt groups), and
    without the split into halves: the same samples, pseudo-loss, Ψ statistics and gradient norm."""
    for name, kw in {"full": {}, "micro": {"micro_batch": 5}, "nosplit": {"grad_var": False}}.items():
        reinforce.train(small_args(tmp_path, name, **kw))
    full, micro, nosplit = (first_step(tmp_path, n) for n in ("full", "micro", "nosplit"))
    assert full["policy/grad_norm"] > 0 and full["kl/ref"] == 0.0  # π_θ = π_ref at the first step
    assert full["completions/mean_length"] != int(full["completions/mean_length"])  # ragged lengths
    for other in (micro, nosplit):
        assert other["reward/mean"] == full["reward/mean"]  # the same samples
        for key in ("loss/pseudo", "psi/mean", "psi/second_moment", "policy/grad_norm", "policy/entropy"):
            assert other[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    assert micro["policy/grad_var"] == pytest.approx(full["policy/grad_var"], rel=1e-4)
    assert full["policy/grad_var"] > 0 and "policy/grad_var" not in nosplit


def test_value_baseline_short_run_first_step_is_plain_reward_to_go(tiny_path, tmp_path):
    """--baseline value for 2 steps: V = 0 at step 1, so that step's samples, Ψ and gradient are
    those of --baseline none (same seed); the critic's metrics are logged, and its head is saved
    trained (no longer 0) beside the policy."""
    reinforce.train(small_args(tmp_path, "none1", baseline="none"))
    a = small_args(tmp_path, "value", baseline="value")
    a.steps, a.save_model = 2, True
    reinforce.train(a)
    none, value = first_step(tmp_path, "none1"), first_step(tmp_path, "value")
    assert value["reward/mean"] == none["reward/mean"]  # the same samples
    for key in ("loss/pseudo", "psi/second_moment", "policy/grad_norm"):
        assert value[key] == pytest.approx(none[key], rel=1e-5, abs=1e-7), key
    assert value["value/mean"] == 0.0 and value["value/loss"] == pytest.approx(value["psi/second_moment"], rel=1e-5)
    assert value["value/grad_norm"] > 0
    head = torch.load(tmp_path / "value" / "value_head.pt")
    assert head["weight"].shape == (1, 64) and head["weight"].dtype == torch.float32
    assert head["weight"].abs().sum() > 0  # ψ moved
    second = json.loads((tmp_path / "value" / "metrics.jsonl").read_text().splitlines()[2])
    assert second["value/mean"] != 0.0 and math.isfinite(second["value/loss"])


def test_beta_zero_never_loads_the_reference(tiny_path, tmp_path, monkeypatch):
    calls = []
    real = common.load_model

    def counting(*a, **kw):
        calls.append(kw.get("trainable", True))
        return real(*a, **kw)
    monkeypatch.setattr(common, "load_model", counting)
    reinforce.train(small_args(tmp_path, "beta0", beta=0.0))
    assert calls == [True]  # the policy only
    row = first_step(tmp_path, "beta0")
    assert "kl/ref" not in row and "reward/mean" in row
    # β = 0, γ = 1: r_t is the score alone, so R(τ) is the score
    assert row["reward/return_mean"] == pytest.approx(row["reward/mean"])
    calls.clear()
    reinforce.train(small_args(tmp_path, "beta1", beta=0.1))
    assert calls == [True, False]  # the policy, then the frozen reference


#####################################################################################################
#####  the script: bad input and a short run, as subprocesses started together
#####################################################################################################

SHORT = ["--steps", "3", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-every", "2",
         "--eval-size", "20"]
BAD = {  # the three, run as the user would; more cases in-process below
    "rloo_k1": (["--baseline", "rloo", "--samples-per-prompt", "1"], "--samples-per-prompt"),
    "gamma_high": (["--gamma", "1.5"], "--gamma"),
    "psi_unknown": (["--psi", "advantage"], "--psi"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path, run_script):
    """All the subprocesses of this module, started at once: {name: (out_dir, future)}."""
    base = tmp_path_factory.mktemp("reinforce_runs")
    jobs = {name: argv for name, (argv, _) in BAD.items()}
    jobs["short"] = SHORT

    def run(name, argv):
        result = run_script("reinforce.py", *argv, "--out-dir", str(base / name))
        if name != "short":
            return result
        return result, run_script("reinforce.py", *argv, "--out-dir", str(base / name))  # again
    pool = ThreadPoolExecutor(max_workers=4)
    futures = {name: (base / name, pool.submit(run, name, argv)) for name, argv in jobs.items()}
    yield futures
    pool.shutdown(wait=True)


def one_line_error(result, must_name: str):
    """Exit code 2, no traceback, exactly one line on stderr: `error: ...` naming the flag."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gives_one_line(runs, name):
    one_line_error(runs[name][1].result(), BAD[name][1])
    assert not (runs[name][0] / "metrics.jsonl").exists()  # rejected before any work


@pytest.mark.parametrize("kw, must_name", [
    ({"gamma": -0.1}, "--gamma"), ({"gamma": 1.0001}, "--gamma"), ({"baseline": "median"}, "--baseline"),
    ({"psi": "Q"}, "--psi"), ({"samples_per_prompt": 0, "baseline": "none"}, "--samples-per-prompt"),
    ({"beta": -0.1}, "--beta"), ({"lr_schedule": "cosine"}, "--lr-schedule"),
    ({"baseline": "value", "psi": "return"}, "--baseline value needs --psi reward-to-go"),
    ({"baseline": "value", "value_lr": 0.0}, "--value-lr"),
])
def test_validate_names_the_flag(kw, must_name):
    with pytest.raises(common.UsageError, match=must_name):
        reinforce.validate(reinforce.Args(**kw))
    # the edges of the allowed ranges pass: γ = 0 and γ = 1; K = 1 without rloo
    for ok in ({"gamma": 0.0}, {"gamma": 1.0}, {"samples_per_prompt": 1, "baseline": "mean"}):
        reinforce.validate(reinforce.Args(**ok))


def test_short_run_writes_its_outputs_and_the_model_reloads(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, fut = runs["short"]
    result, again = fut.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REINFORCE summary" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert all("/" in k for k in r if k not in ("step", "time")), r  # namespaced metrics
    for r in rows[1:]:
        for key in ("reward/mean", "reward/return_mean", "kl/ref", "psi/second_moment", "policy/grad_var",
                    "policy/grad_norm", "policy/entropy", "completions/mean_length"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert 0 <= r["reward/mean"] <= 1 and 1 <= r["completions/mean_length"] <= 4
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, 2, 3]  # before training, every 2 steps, and after the last step

    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_accuracy"] == evals[0] and summary["final_accuracy"] == evals[3]
    # what sampling reaches, before and after: k = K, and the same numbers as the logged rows
    k = summary["config"]["samples_per_prompt"]
    for key, row in (("start_pass_at_k", rows[0]), ("final_pass_at_k", rows[-1])):
        p = summary[key]
        assert p["k"] == k and 0 <= p["pass_at_1"] <= p["pass_at_k"] <= 1, p
        assert (row["eval/pass@1"], row[f"eval/pass@{k}"]) == (p["pass_at_1"], p["pass_at_k"])
    assert summary["wall_seconds"] > 0 and summary["script"] == "reinforce"
    assert set(summary["config"]) == set(reinforce.Args.__dataclass_fields__)
    assert summary["config"]["psi"] == "reward-to-go" and summary["config"]["baseline"] == "rloo"

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert 0 <= tasks.greedy_accuracy(model, tok, tasks.arithmetic_task()[1][:8], 4) <= 1

    # the same command again into the same folder refuses, and leaves the run intact
    line = one_line_error(again, "--out-dir")
    assert "--overwrite" in line
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 3
