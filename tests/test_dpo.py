"""Tests of dpo.py: the losses by hand, sequence log-probs, then the script end to end.

Notes `003_0bc5d2784dac14e1.txt`, "DPO", the gradient weight and "Variants of DPO". Every expected
number is derived in a comment next to it, so that it can be checked on paper. Throughout,

    Δ = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)],   σ(z) = 1/(1 + e^{−z}).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
from models.build import build_word_tokenizer
import dpo
from dpo import dpo_loss, sequence_logps


def t(*xs, grad: bool = False) -> torch.Tensor:
    return torch.tensor([float(x) for x in xs], requires_grad=grad)


#####################################################################################################
#####  dpo_loss by hand
#####################################################################################################


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_at_zero_log_ratios_is_ln2_with_slope_minus_half_beta(beta):
    # π_θ = π_ref on both completions: Δ = (−3 − (−3)) − (−5 − (−5)) = 0, for any log-probs.
    #   L = −log σ(β·0) = −log ½ = ln 2
    #   dL/dΔ = −β σ(−βΔ) = −β σ(0) = −β/2. Δ is +log π_θ(y_w) − log π_θ(y_l) + const, so
    #   dL/dlog π_θ(y_w) = dL/dΔ = −β/2 and dL/dlog π_θ(y_l) = −dL/dΔ = +β/2.
    pc, pr = t(-3.0, grad=True), t(-5.0, grad=True)
    losses, r_c, r_r = dpo_loss(pc, pr, t(-3.0), t(-5.0), beta)
    assert losses.item() == pytest.approx(math.log(2), rel=1e-6)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-beta / 2, rel=1e-6)
    assert pr.grad.item() == pytest.approx(beta / 2, rel=1e-6)
    assert r_c.item() == 0.0 and r_r.item() == 0.0  # implicit rewards β·(log π_θ − log π_ref) = 0


def test_beta_0_1_delta_6_by_hand():
    # One token per completion, so a sum and a per-token average are the same number.
    #   log-ratio of y_w: −1 − (−4) = +3;  log-ratio of y_l: −5 − (−2) = −3;  Δ = 3 − (−3) = 6
    #   β = 0.1: βΔ = 0.6
    #   sigmoid: −log σ(0.6) = log(1 + e^{−0.6}) = log(1 + 0.5488116) = log 1.5488116 = 0.4374879
    #   hinge:   max(0, 1 − 0.6) = 0.4
    #   ipo:     (Δ − 1/(2β))² = (6 − 5)² = 1.0
    #   length_norm: sigmoid on the (here identical) per-token averages = 0.4374879
    #   reference_free: −log σ(β (−1 − (−5))) = −log σ(0.4) = log(1 + e^{−0.4}) = 0.5130153
    #   label smoothing ε = 0.1: −0.9 log σ(0.6) − 0.1 log σ(−0.6); since −log σ(−z) = z − log σ(z),
    #     = −log σ(0.6) + 0.1·0.6 = 0.4374879 + 0.06 = 0.4974879
    #   implicit rewards: β·3 = 0.3 and β·(−3) = −0.3
    args = (t(-1.0), t(-5.0), t(-4.0), t(-2.0), 0.1)
    expected = {"sigmoid": 0.4374879, "hinge": 0.4, "ipo": 1.0, "length_norm": 0.4374879,
                "reference_free": 0.5130153}
    for loss_type, value in expected.items():
        losses, r_c, r_r = dpo_loss(*args, loss_type=loss_type)
        assert losses.item() == pytest.approx(value, abs=1e-6), loss_type
    assert math.log(1 + math.exp(-0.6)) == pytest.approx(0.4374879, abs=1e-7)  # the hand value above
    losses, r_c, r_r = dpo_loss(*args, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.4974879, abs=1e-6)
    assert r_c.item() == pytest.approx(0.3) and r_r.item() == pytest.approx(-0.3)
    assert not r_c.requires_grad and not r_r.requires_grad


def test_gradient_weight_is_beta_sigma_minus_beta_delta():
    # The notes' weight: ∂L/∂log π_θ(y_w) = −β σ(−βΔ), ∂L/∂log π_θ(y_l) = +β σ(−βΔ).
    # Derivation: L = −log σ(βΔ); d/dz[−log σ(z)] = −(1 − σ(z)) = −σ(−z); dΔ/dlog π_θ(y_w) = +1,
    # dΔ/dlog π_θ(y_l) = −1; chain rule with dz/dΔ = β. Checked by autograd on random pairs, where
    # the weight ranges from near 0 (pair already ordered right) to near β (ordered wrong).
    g = torch.Generator().manual_seed(0)
    beta = 0.3
    pc = (torch.randn(8, generator=g) * 10).requires_grad_()
    pr = (torch.randn(8, generator=g) * 10).requires_grad_()
    rc, rr = torch.randn(8, generator=g) * 10, torch.randn(8, generator=g) * 10
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    delta = (pc - rc - (pr - rr)).detach()  # Δ   [8]
    weight = beta * torch.sigmoid(-beta * delta)  # β σ(−βΔ)   [8]
    torch.testing.assert_close(pc.grad, -weight)
    torch.testing.assert_close(pr.grad, weight)
    assert weight.min() < 0.05 * beta and weight.max() > 0.95 * beta  # both ends are exercised


def test_hinge_and_ipo_gradients():
    # hinge: L = max(0, 1 − βΔ): dL/dΔ = −β while βΔ < 1, and 0 once βΔ > 1.
    # ipo:   L = (Δ − 1/(2β))²:  dL/dΔ = 2 (Δ − 1/(2β)); β = 0.1, Δ = 6 -> 2·(6 − 5) = 2.
    pc = t(0.0, 0.0, grad=True)
    losses, _, _ = dpo_loss(pc, t(-6.0, -20.0), t(0.0, 0.0), t(0.0, 0.0), 0.1, loss_type="hinge")
    losses.sum().backward()  # Δ = 6 (βΔ = 0.6 < 1) and Δ = 20 (βΔ = 2 > 1)
    assert pc.grad.tolist() == pytest.approx([-0.1, 0.0])
    pc = t(0.0, grad=True)
    losses, _, _ = dpo_loss(pc, t(-6.0), t(0.0), t(0.0), 0.1, loss_type="ipo")
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(2.0)


def test_label_smoothing_zero_is_sigmoid_and_reference_free_is_zero_reference():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    plain = dpo_loss(pc, pr, rc, rr, 0.2)
    smoothed = dpo_loss(pc, pr, rc, rr, 0.2, label_smoothing=0.0)
    for a, b in zip(plain, smoothed):
        assert torch.equal(a, b)
    # reference_free ignores the reference: the same as sigmoid with log π_ref = 0 (or None)
    zero = torch.zeros(16)
    free = dpo_loss(pc, pr, rc, rr, 0.2, loss_type="reference_free")
    sig0 = dpo_loss(pc, pr, zero, zero, 0.2, loss_type="sigmoid")
    free_none = dpo_loss(pc, pr, None, None, 0.2, loss_type="reference_free")
    for a, b, c in zip(free, sig0, free_none):
        assert torch.equal(a, b) and torch.equal(a, c)
    # by hand, β = 0.2, log π_θ(y_w) = −1, log π_θ(y_l) = −3, log π_ref(y_w) = −2, log π_ref(y_l) = −4:
    #   Δ = (−1 + 2) − (−3 + 4) = 0, so sigmoid gives −log σ(0) = ln 2;
    #   reference_free drops π_ref: Δ = −1 − (−3) = 2, βΔ = 0.4, −log σ(0.4) = log(1 + e^{−0.4}) = 0.5130153
    #   conservative (ε = 0.1) at the same reference-free Δ: −0.9 log σ(0.4) − 0.1 log σ(−0.4), and
    #   −log σ(−x) = x − log σ(x), so it is 0.5130153 + 0.1 · 0.4 = 0.5530153
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-4.0)
    assert dpo_loss(pc, pr, rc, rr, 0.2)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert dpo_loss(pc, pr, rc, rr, 0.2, loss_type="reference_free")[0].item() == pytest.approx(0.5130153, abs=1e-6)
    assert dpo_loss(pc, pr, None, None, 0.2, loss_type="reference_free",
                    label_smoothing=0.1)[0].item() == pytest.approx(0.5530153, abs=1e-6)


def test_unknown_loss_type_and_misplaced_label_smoothing_raise():
    with pytest.raises(ValueError, match="bogus"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="bogus")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="ipo", label_smoothing=0.1)


#####################################################################################################
#####  sequence log-probs: summed over the completion only, invariant to padding
#####################################################################################################


def test_sequence_logps_sum_and_average_by_hand():
    # row 0: 3 completion tokens, log-probs −1, −2, −3 -> sum −6, average −2
    # row 1: 2 tokens, −0.5, −0.5 -> sum −1, average −0.5. A masked position may hold anything
    # (NaN included): it is selected away, never multiplied by 0.
    logp = torch.tensor([[-1.0, -2.0, -3.0, float("nan")], [-0.5, -0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sequence_logps(logp, mask).tolist() == [-6.0, -1.0]
    assert sequence_logps(logp, mask, average=True).tolist() == [-2.0, -0.5]


def random_word_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_word_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval(), tok


PAIRS = [  # prompts and completions of different lengths, so a batch pads on both sides
    {"prompt": "the hotel", "chosen": "was great", "rejected": "was bad and the view was nice"},
    {"prompt": "the car the bus the park", "chosen": "felt very good but the menu was slow",
     "rejected": "seemed ok"},
    {"prompt": "the pizza", "chosen": "looked lovely", "rejected": "was rude"},
]


def test_pair_logps_are_invariant_to_padding_and_count_only_completion_tokens():
    model, tok = random_word_llama()
    batch_c, batch_r = dpo.pair_logps(model, tok, PAIRS, "cpu")  # padded together   [3], [3]
    for k, p in enumerate(PAIRS):
        # alone: no padding at all
        alone_c, alone_r = dpo.pair_logps(model, tok, [p], "cpu")
        torch.testing.assert_close(batch_c[k], alone_c[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_r[k], alone_r[0], atol=1e-5, rtol=1e-5)
        # by hand: one plain forward pass over prompt + completion + EOS, and the sum of
        # log π(token_j | tokens_<j) over the completion positions j only (the prompt's own tokens
        # are never targets)
        for text, got in ((p["chosen"], alone_c[0]), (p["rejected"], alone_r[0])):
            x = tok.encode(p["prompt"], add_special_tokens=False)
            y = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            ids = torch.tensor([x + y])  # [1, |x| + |y|]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # [L, V]
            expected = sum(logprobs[len(x) + j - 1, y[j]] for j in range(len(y)))  # Σ over y only
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # per-token averages divide by |y| + 1 (the EOS is a completion token)
    avg_c, _ = dpo.pair_logps(model, tok, PAIRS, "cpu", average=True)
    n = torch.tensor([len(p["chosen"].split()) + 1 for p in PAIRS], dtype=torch.float)
    torch.testing.assert_close(avg_c, batch_c / n)


def test_grad_weight_by_hand():
    # grad_weight = (1 − ε) σ(−βΔ) − ε σ(βΔ), and ∂L/∂Δ = −β · grad_weight for the logistic losses.
    #   Δ = 0: σ(0) = ½, so ½ (ε = 0) and (1 − 0.1)·½ − 0.1·½ = 0.4 (ε = 0.1)
    #   β = 0.5, Δ = 4: σ(−2) = 0.1192029 = σ(r̂_l − r̂_w) with r̂_w − r̂_l = βΔ = 2
    zero = t(0.0)
    assert dpo.grad_weight(zero, 0.1).item() == pytest.approx(0.5)
    assert dpo.grad_weight(zero, 0.1, 0.1).item() == pytest.approx(0.4)
    assert dpo.grad_weight(t(4.0), 0.5).item() == pytest.approx(0.1192029, abs=1e-6)
    for eps in (0.0, 0.2):
        delta = torch.linspace(-6, 6, 7, requires_grad=True)
        dpo.sigmoid_loss(delta, 0.3, eps).sum().backward()
        torch.testing.assert_close(delta.grad, -0.3 * dpo.grad_weight(delta.detach(), 0.3, eps))


def test_max_length_keeps_the_start_and_drops_prompts_that_fill_it():
    # Word tokens: "the hotel" 2 | "was great" 2 + EOS, "was bad and the view was nice" 7 + EOS.
    # --max-length 5 (TRL's keep_start): chosen 2 + 3 = 5 fits; rejected 2 + 8 = 10 keeps its first
    # 5 tokens, i.e. the prompt and "was bad and" (no EOS); the pair counts as cut. A prompt of 6
    # words ("the car the bus the park") has ≥ 5 tokens: that pair is dropped.
    tok = build_word_tokenizer()
    kept, cut, dropped = dpo.fit_max_length(tok, PAIRS, 5)
    assert kept == [PAIRS[0], PAIRS[2]] and cut == 1 and dropped == 1  # PAIRS[2]: 2 + 2 + 1 = 5 each
    assert dpo.fit_max_length(tok, PAIRS, None) == (PAIRS, 0, 0)
    ids, mask, c_mask, T = common.encode_prompt_completion(
        tok, [PAIRS[0]["prompt"]] * 2, [PAIRS[0]["chosen"], PAIRS[0]["rejected"]], max_length=5)
    assert T == 3 and c_mask.tolist() == [[1, 1, 1], [1, 1, 1]]  # 5 − 2 prompt tokens each
    assert tok.decode(ids[1][mask[1].bool()]) == "the hotel was bad and"
    assert ids[0, -1].item() == tok.eos_token_id and ids[1, -1].item() != tok.eos_token_id


def test_untrained_policy_scores_half_and_zero_kl():
    # π_θ = π_ref: every implicit reward is exactly 0, every pair a tie (½), and the sampled
    # KL estimate Σ_t (log π_θ − log π_ref) is exactly 0.
    model, tok = random_word_llama(seed=3)
    ref, _ = random_word_llama(seed=3)
    c, r = dpo.all_pair_logps(model, tok, PAIRS, "cpu", average=False)
    assert dpo.implicit_reward_accuracy(c, r, c.clone(), r.clone(), 0.1, "sigmoid") == 0.5
    s = dpo.sample_and_score(model, ref, tok, [p["prompt"] for p in PAIRS], 6, seed=0, gold=True)
    assert s["kl_to_ref"] == 0.0 and len(s["texts"]) == 3
    # a fixed seed: the same samples every time
    assert dpo.sample_and_score(model, ref, tok, [p["prompt"] for p in PAIRS], 6, seed=0,
                                gold=True)["texts"] == s["texts"]


#####################################################################################################
#####  the script: bad input and short runs, as subprocesses (started together on a small pool)
#####################################################################################################

SHORT = ["--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-size", "40",
         "--eval-samples", "16", "--log-every", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_script):
    """Start every subprocess of this module on a small pool: {name: (out_dir, future)}. The bad-input
    runs come first."""
    base = tmp_path_factory.mktemp("dpo_runs")
    good = [json.dumps(p) for p in PAIRS] * 4  # 12 pairs: 10 train, 2 held out
    files = {
        "data": good,
        "missing_key": [good[0], json.dumps({"prompt": "the hotel", "chosen": "was great"})],
        "empty": [good[0], good[1], json.dumps({"prompt": "the bus", "chosen": "", "rejected": "was ok"})],
        "equal": [good[0], json.dumps({"prompt": "the bus", "chosen": "was ok", "rejected": "was ok"})],
    }
    for name, lines in files.items():
        (base / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    bad_jobs = {
        "missing_key": ["--data", str(base / "missing_key.jsonl")],
        "empty": ["--data", str(base / "empty.jsonl")],
        "equal": ["--data", str(base / "equal.jsonl")],
        "bad_loss_type": ["--loss-type", "bogus"],
        "bad_smoothing": ["--loss-type", "hinge", "--label-smoothing", "0.1"],
    }
    jobs = {
        "default": SHORT,
        "data_ipo": SHORT + ["--data", str(base / "data.jsonl"), "--loss-type", "ipo", "--beta", "0.5"],
    }

    def run(name, argv):
        result = run_script("dpo.py", *argv, "--out-dir", str(base / name))
        if name != "default":
            return result
        # then the same command again into the same folder, without --overwrite
        return result, run_script("dpo.py", *argv, "--out-dir", str(base / name))

    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    futures = {name: (base / name, pool.submit(run, name, argv)) for name, argv in bad_jobs.items()}
    futures.update({name: (base / name, pool.submit(run, name, argv)) for name, argv in jobs.items()})
    yield futures, base
    pool.shutdown(wait=True)


def one_line_error(result, must_name: str):
    """A clear failure: exit code 2, no traceback, one line on stderr that names the problem."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("name, must_name", [
    ("missing_key", "missing_key.jsonl:2: missing key(s) 'rejected'"),
    ("empty", "empty.jsonl:3: 'chosen' is empty"),
    ("equal", "equal.jsonl:2: 'chosen' and 'rejected' are the same text"),
    ("bad_loss_type", "--loss-type"),
    ("bad_smoothing", "--label-smoothing"),
])
def test_bad_input_gives_one_line(runs, name, must_name):
    jobs, _ = runs
    line = one_line_error(jobs[name][1].result(), must_name)
    if name == "bad_loss_type":
        assert "bogus" in line and "sigmoid" in line  # names the bad value and the choices


def test_short_run_writes_outputs_and_the_model_reloads(runs):
    jobs, _ = runs
    out, future = jobs["default"]
    result, again = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(math.isfinite(r[key]) for r in rows[1:]), key
    # at step 1 the policy is still the reference: implicit rewards 0, loss ln 2, weight ½
    assert rows[1]["rewards/chosen"] == 0.0 and rows[1]["rewards/margins"] == 0.0
    assert rows[1]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[1]["dpo/grad_weight"] == pytest.approx(0.5)
    assert rows[0]["eval/kl_to_ref"] == 0.0 and rows[0]["eval/heldout_pair_accuracy"] == 0.5
    s = json.loads((out / "summary.json").read_text())
    for key in ("start_gold_reward", "final_gold_reward", "kl_to_ref", "heldout_pair_accuracy"):
        assert isinstance(s[key], float), key
    assert s["steps"] == 4 and s["ceiling_accuracy"] is not None
    # the saved policy reloads, and it is not the reference any more
    policy, tok = common.load_model(str(out / "model"), torch.device("cpu"), trainable=False)
    ref, _ = common.load_model("tiny-pref", torch.device("cpu"), trainable=False)
    c, r = dpo.all_pair_logps(policy, tok, PAIRS, "cpu", average=False)
    c0, r0 = dpo.all_pair_logps(ref, tok, PAIRS, "cpu", average=False)
    assert not torch.allclose(c, c0)
    # the same command into the same folder, without --overwrite, is refused
    one_line_error(again, "--overwrite")


def test_short_run_on_a_users_file_with_ipo(runs):
    jobs, _ = runs
    out, future = jobs["data_ipo"]
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    # a user's file has no gold reward: those numbers are null, the rest is measured
    assert s["start_gold_reward"] is None and s["final_gold_reward"] is None and s["ceiling_accuracy"] is None
    assert s["loss_type"] == "ipo" and math.isfinite(s["kl_to_ref"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # IPO at Δ = 0: (0 − 1/(2β))² = (1/(2·0.5))² = 1
    assert rows[1]["loss"] == pytest.approx(1.0, rel=1e-6)
    assert not any("dpo/grad_weight" in r for r in rows)  # σ(−βΔ) is not IPO's gradient weight
    assert s["max_length"]["cut_pairs"] == {"train": 0, "heldout": 0}
    assert (out / "model" / "config.json").exists()
