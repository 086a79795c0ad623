"""The DPO derivation of note 003, checked step by step on a small categorical completion space.

Notes `003_0bc5d2784dac14e1.txt`, "DPO", "Derivation": the KL-regularised objective
    F(π) = Σ_y π(y) r(y) − β KL(π ‖ π_ref)
is maximised by π*(y) = π_ref(y) exp(r(y)/β) / Z, Z = Σ_y π_ref(y) exp(r(y)/β); inverted,
r(y) = β log π*(y)/π_ref(y) + β log Z; and with the Bradley–Terry model P(y_w ≻ y_l) = σ(r_w − r_l)
the DPO loss, a logistic loss on β log π_θ/π_ref, is minimised at π_θ = π*.

One prompt x, a completion space of N = 5 whole completions y (a categorical distribution, so
every expectation is a finite sum), a known reward r, and β = 0.5. Each claim is found by direct
optimisation (L-BFGS on the logits) and compared with the closed form, or checked as an identity.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpo import dpo_loss

F64 = torch.float64
BETA = 0.5
R = torch.tensor([1.0, 0.0, 2.0, -1.0, 1.5], dtype=F64)  # r(y) of the N = 5 completions
PI_REF = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.3], dtype=F64)  # π_ref(y), sums to 1
N = len(R)
# the closed form: π* = π_ref e^{r/β} / Z
Z = (PI_REF * torch.exp(R / BETA)).sum()
PI_STAR = PI_REF * torch.exp(R / BETA) / Z


def objective(pi: torch.Tensor) -> torch.Tensor:
    """F(π) = Σ_y π(y) r(y) − β Σ_y π(y) log(π(y)/π_ref(y)), the notes' KL-regularised objective."""
    return (pi * R).sum() - BETA * (pi * (pi.log() - PI_REF.log())).sum()


def maximise(f, z0: torch.Tensor) -> torch.Tensor:
    """argmax over logits z of f(softmax(z)), by L-BFGS; -> the maximising distribution [N]."""
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -f(torch.softmax(z, -1))
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    return torch.softmax(z.detach(), -1)


def test_the_maximiser_of_the_kl_regularised_objective_is_pi_ref_exp_r_over_beta():
    # direct optimisation from two starts (uniform, and the reference itself) finds the closed form
    for z0 in (torch.zeros(N, dtype=F64), PI_REF.log()):
        pi_opt = maximise(objective, z0)
        torch.testing.assert_close(pi_opt, PI_STAR, atol=1e-7, rtol=0)
    # by hand: F(π*) = Σ π* (r − β (r/β − log Z)) = β log Z, the maximum
    assert objective(PI_STAR).item() == pytest.approx(BETA * math.log(Z.item()), abs=1e-12)
    # and for ANY π:  F(π) = β log Z − β KL(π ‖ π*)  (put log π_ref = log π* − r/β + log Z into F),
    # so F ≤ β log Z with equality only at π*: the maximiser is unique
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        pi = torch.softmax(torch.randn(N, generator=gen, dtype=F64) * 2, -1)
        kl = (pi * (pi.log() - PI_STAR.log())).sum()
        assert objective(pi).item() == pytest.approx(BETA * math.log(Z.item()) - BETA * kl.item(), abs=1e-12)
        assert kl > 0


def test_beta_log_ratio_recovers_r_up_to_beta_log_z():
    # r(y) = β log π*(y)/π_ref(y) + β log Z: the log-ratio gives r shifted by the constant β log Z,
    # which depends on the prompt only, so every difference r(y) − r(y') is recovered exactly
    implicit = BETA * (PI_STAR.log() - PI_REF.log())  # β log π*/π_ref   [N]
    torch.testing.assert_close(implicit, R - BETA * torch.log(Z), atol=1e-12, rtol=0)
    torch.testing.assert_close(implicit[:, None] - implicit[None, :], R[:, None] - R[None, :],
                               atol=1e-12, rtol=0)
    # ... and from the optimised π (not the closed form) too
    pi_opt = maximise(objective, torch.zeros(N, dtype=F64))
    shift = (R - BETA * (pi_opt.log() - PI_REF.log())).mean()
    assert shift.item() == pytest.approx(BETA * math.log(Z.item()), abs=1e-7)


def expected_dpo_loss(z: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The DPO loss (dpo.dpo_loss, sigmoid) in expectation over exact Bradley–Terry labels: each
    unordered pair {i, j} is labelled i ≻ j with probability σ(r_i − r_j), else j ≻ i.
        E[L] = mean over pairs of  σ(r_i − r_j) ℓ(w=i, l=j) + σ(r_j − r_i) ℓ(w=j, l=i)
    z: logits [N] of π_θ; pairs: (i, j) with i < j."""
    logp = torch.log_softmax(z, -1)  # log π_θ(y)   [N]
    ref = PI_REF.log()  # log π_ref(y)   [N]
    w = torch.tensor([i for i, j in pairs] + [j for i, j in pairs])  # chosen   [2P]
    l = torch.tensor([j for i, j in pairs] + [i for i, j in pairs])  # rejected   [2P]
    p_label = torch.sigmoid(R[w] - R[l])  # P(y_w ≻ y_l) = σ(r_w − r_l), Bradley–Terry   [2P]
    losses, _, _ = dpo_loss(logp[w], logp[l], ref[w], ref[l], BETA)  # −log σ(βΔ)   [2P]
    return (p_label * losses).sum() / len(pairs)


def minimise_dpo(pairs, z0: torch.Tensor) -> torch.Tensor:
    return maximise(lambda pi: -expected_dpo_loss(pi.log(), pairs), z0)  # log softmax(z) = z − logsumexp


ALL_PAIRS = [(i, j) for i in range(N) for j in range(i + 1, N)]


def test_minimising_the_dpo_loss_on_exact_preferences_recovers_pi_star():
    # E[L] is a cross-entropy between the labels' σ(r_w − r_l) and the model's σ(βΔ_wl), so it is
    # minimal exactly when βΔ_wl = r_w − r_l for every compared pair, i.e. when β log π_θ/π_ref
    # equals r up to one constant. Since π_θ sums to 1, that constant is −β log Z and π_θ = π*:
    # with every pair compared (a connected comparison graph), DPO identifies π* exactly.
    for z0 in (torch.zeros(N, dtype=F64), PI_REF.log()):
        pi_dpo = minimise_dpo(ALL_PAIRS, z0)
        torch.testing.assert_close(pi_dpo, PI_STAR, atol=1e-7, rtol=0)
    # at π*, the loss is the labels' own entropy: mean over pairs of H(σ(r_i − r_j))
    def h(p):
        return -(p * p.log() + (1 - p) * (1 - p).log())
    entropy = sum(h(torch.sigmoid(R[i] - R[j])) for i, j in ALL_PAIRS) / len(ALL_PAIRS)
    assert expected_dpo_loss(PI_STAR.log(), ALL_PAIRS).item() == pytest.approx(entropy.item(), abs=1e-12)
    # and the implicit rewards of dpo_loss at π* differ exactly as r does
    _, rw, rl = dpo_loss(PI_STAR.log()[[2]], PI_STAR.log()[[3]], PI_REF.log()[[2]], PI_REF.log()[[3]], BETA)
    assert (rw - rl).item() == pytest.approx((R[2] - R[3]).item(), abs=1e-12)


def test_what_the_dpo_loss_cannot_identify():
    # Δ is a difference of log-ratios, so the normaliser of π_θ cancels and the loss sees only the
    # differences z_w − z_l of the logits of compared completions. A completion that is never
    # compared (here y_4: every pair with 4 dropped) gets no gradient at all: its logit stays where
    # it started, and only the ratios among the compared completions are those of π*.
    pairs = [(i, j) for i, j in ALL_PAIRS if 4 not in (i, j)]
    z0 = PI_REF.log()
    z = z0.clone().requires_grad_(True)
    expected_dpo_loss(z, pairs).backward()
    assert abs(z.grad[4].item()) < 1e-15 and z.grad[:4].abs().sum() > 0.01  # 0 up to rounding
    pi_dpo = minimise_dpo(pairs, z0)
    ratios = (pi_dpo[:4] / pi_dpo[:4].sum(), PI_STAR[:4] / PI_STAR[:4].sum())
    torch.testing.assert_close(*ratios, atol=1e-7, rtol=0)
    # π_θ(y_4) is not π*(y_4). The gradients of the compared logits sum to 0, so from π_ref their
    # mean stays put: z_i = log π_ref(y_i) + r_i/β − mean_{j<4} r_j/β, while z_4 = log π_ref(y_4).
    # π* would need z_4 − z_i = log π_ref(y_4)/π_ref(y_i) + (r_4 − r_i)/β, which holds only if
    # r_4 = mean_{j<4} r_j = 0.5. With r_4 = 1.5: π_θ(y_4)/π*(y_4) = e^{(0.5 − 1.5)/β} / (normalisers)
    assert abs(pi_dpo[4].item() - PI_STAR[4].item()) > 0.05
    # yet the loss is at its floor, the labels' own entropy over the compared pairs, mean H(σ(r_i − r_j)):
    # the four compared completions are matched exactly, so nothing tells this π_θ from π*
    def h(p):
        return -(p * p.log() + (1 - p) * (1 - p).log())
    entropy = sum(h(torch.sigmoid(R[i] - R[j])) for i, j in pairs) / len(pairs)
    assert expected_dpo_loss(pi_dpo.log(), pairs).item() == pytest.approx(entropy.item(), abs=1e-10)
    # the loss is also blind to one more thing: a common shift of all logits (softmax's invariance)
    shifted = expected_dpo_loss(PI_STAR.log() + 3.0, ALL_PAIRS)
    assert shifted.item() == pytest.approx(expected_dpo_loss(PI_STAR.log(), ALL_PAIRS).item(), abs=1e-12)


def test_the_bradley_terry_labels_are_the_reward_models_probabilities():
    # σ(r_w − r_l) + σ(r_l − r_w) = 1 for every pair, and F.logsigmoid agrees with log σ
    for i, j in ALL_PAIRS:
        p = torch.sigmoid(R[i] - R[j])
        assert (p + torch.sigmoid(R[j] - R[i])).item() == pytest.approx(1.0)
        assert F.logsigmoid(R[i] - R[j]).item() == pytest.approx(math.log(p.item()))
