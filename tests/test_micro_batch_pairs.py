"""--micro-batch in reward_model.py and dpo.py: gradient accumulation changes no number but float rounding.

A batch of B rows goes through the model in micro-batches of n rows, each backpropagating its share
of the batch's loss, so that the summed gradient is the batch mean's:
- dpo.py: L = (1/B) Σ_i ℓ_i, so a micro-batch's mean is weighted n/B;
- reward_model.py: L = L_RM + c · center, where L_RM is a mean over the B rankings (weight n/B) but
  center is a mean over the batch's N pairs, Σ_b C(K_b, 2), so a micro-batch's centering term is
  weighted by its pairs / N. With rankings of K = 3 (3 pairs) beside pairs (1), a micro-batch's
  share of the rows and its share of the pairs differ, so a centering term weighted by rows would
  give another gradient.
One optimiser step with --micro-batch 1, a ragged split and none logs the same metrics, takes the same
gradient (captured as the optimiser steps) and saves the same weights, to float rounding. Then each
script with --micro-batch beside --gradient-checkpointing and --lora-r, 2 steps.

The tests swap AdamW for plain SGD (`sgd`): AdamW's first step, lr · g / (|g| + ε) per element, is
nearly lr · sign(g), which hides a wrong scale of the gradient and turns a rounding difference in an
element whose g is near ε = 1e-8 into a move of several percent of lr (seen: 4% at lr 1e-3); SGD's
step, lr · g, is linear in the gradient, so the weights and the next step's metrics check it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
import harness
import reward_model

RTOL, ATOL = 1e-5, 1e-7
# the implicit rewards are β times differences of sequence log-probs of order 10, whose float32
# rounding is ~1e-6 · 10 · β: a margin near 0 differs by ~1e-7 (seen: 1.4e-7), far above RTOL of it
METRIC_ATOL = 1e-6

# 15 rows, the last fifth held out: 12 training rows, eight K = 3 rankings (3 pairs each) and four
# pairs (1 each), so N = 8·3 + 4·1 = 28 pairs in a batch of all 12 rows
RANKINGS = [
    {"prompt": "the hotel", "completions": ["was great", "was ok", "was bad"]},
    {"prompt": "the car", "completions": ["felt very good", "seemed ok", "was slow"]},
    {"prompt": "the pizza", "chosen": "was nice", "rejected": "was slow"},
    {"prompt": "the bus", "chosen": "felt very good but the menu was slow", "rejected": "was bad"},
    {"prompt": "the menu", "completions": ["seemed ok and the view was nice", "was ok", "was bad"]},
]


@pytest.fixture
def sgd(monkeypatch):
    """torch.optim.AdamW -> SGD with the same learning rate (see the module's docstring)."""
    def make(params, lr, weight_decay=0.0, **_):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    monkeypatch.setattr(torch.optim, "AdamW", make)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor that a saved model folder holds (the LM's, and a reward model's head)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def capture_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """The gradient of every trained tensor at each optimiser step (after clipping, before AdamW)."""
    seen = []
    step = harness.MixedPrecision.step

    def recording(self, opt):
        seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])
        return step(self, opt)
    monkeypatch.setattr(harness.MixedPrecision, "step", recording)
    return seen


def run_each(monkeypatch, tmp_path, train, make_args, micro_batches) -> dict:
    """{micro_batch: (metrics rows, gradients per step, saved weights)}"""
    got = {}
    for mb in micro_batches:
        out = tmp_path / f"mb{mb}"
        with monkeypatch.context() as m:
            grads = capture_gradients(m)
            train(make_args(mb, out))
        got[mb] = (metrics(out), grads, weights(out / "model"))
    return got


def assert_same(got: dict, keys: list[str]) -> None:
    (rows, grads, w) = got[None]
    for mb, (rows_mb, grads_mb, w_mb) in got.items():
        assert len(rows_mb) == len(rows)
        for r, r_mb in zip(rows[1:], rows_mb[1:]):
            for k in keys:
                if k == "rewards/accuracies" and "dpo/grad_weight" in r and r["step"] == 1:
                    continue  # DPO's step 1: π_θ = π_ref, every pair a tie r̂ = 0, broken by rounding
                assert r_mb[k] == pytest.approx(r[k], rel=RTOL, abs=METRIC_ATOL), (mb, r["step"], k)
        assert len(grads_mb) == len(grads)
        for g_step, g_step_mb in zip(grads, grads_mb):
            assert len(g_step_mb) == len(g_step)
            for g, g_mb in zip(g_step, g_step_mb):
                torch.testing.assert_close(g_mb, g, rtol=RTOL, atol=ATOL)
        assert w_mb.keys() == w.keys()
        for k in w:
            torch.testing.assert_close(w_mb[k], w[k], rtol=RTOL, atol=ATOL,
                                       msg=lambda s: f"--micro-batch {mb} {k}: {s}")


RM_KEYS = ["loss/bt", "loss/center", "loss/total", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "rm/grad_norm"]
DPO_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "policy/grad_norm", "dpo/grad_weight"]


def test_reward_model_micro_batches_of_rankings_and_pairs_take_the_batch_step(sgd, monkeypatch, tmp_path):
    data = tmp_path / "rankings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RANKINGS * 3))  # 15 rows: 12 train, 3 held out

    def make_args(mb, out):
        # the whole training set is the batch, so --micro-batch 1 splits it into rows of 3 and 1 pairs
        return reward_model.Args(data=str(data), batch_size=12, micro_batch=mb, max_steps=1, warmup_steps=0, lr=0.5,
                                 margin=0.5, center_coef=0.1, normalize=False, eval_every=1, eval_size=8,
                                 out_dir=str(out))
    got = run_each(monkeypatch, tmp_path, reward_model.train, make_args, [None, 1, 5])  # 5: 5 + 5 + 2 rows
    first = got[None][0][1]
    assert first["loss/center"] > 0 and first["rm/grad_norm"] > 0  # not vacuous
    assert first["rewards/chosen"] != first["rewards/rejected"]
    assert_same(got, RM_KEYS)


def test_dpo_micro_batches_take_the_batch_step(sgd, monkeypatch, tmp_path):
    def make_args(mb, out):
        return dpo.Args(batch_size=5, micro_batch=mb, max_steps=2, warmup_steps=0, lr=0.5, eval_every=2,
                        eval_size=8, eval_samples=4, out_dir=str(out))
    got = run_each(monkeypatch, tmp_path, dpo.train, make_args, [None, 1, 2])  # 2: 2 + 2 + 1 pairs
    second = got[None][0][2]  # step 2: π_θ ≠ π_ref, so the implicit rewards are not 0
    assert second["rewards/margins"] != 0 and second["policy/grad_norm"] > 0  # not vacuous
    assert_same(got, DPO_KEYS)


#####################################################################################################
#####  beside --gradient-checkpointing and --lora-r: 2 steps, the same numbers as without micro-batches
#####################################################################################################


@pytest.mark.parametrize("script, option", [("reward_model", "gradient_checkpointing"), ("reward_model", "lora"),
                                            ("dpo", "gradient_checkpointing"), ("dpo", "lora")])
def test_micro_batch_with_gradient_checkpointing_and_lora(script, option, sgd, tmp_path):
    if option == "lora":
        pytest.importorskip("peft")
    module = {"reward_model": reward_model, "dpo": dpo}[script]
    extra = dict(gradient_checkpointing=True) if option == "gradient_checkpointing" else dict(lora_r=4)
    extra.update(normalize=False) if script == "reward_model" else extra.update(eval_samples=4)
    rows = {}
    for mb in (None, 2):
        out = tmp_path / f"mb{mb}"
        module.train(module.Args(batch_size=4, micro_batch=mb, max_steps=2, warmup_steps=0, lr=0.5,
                                 eval_every=2, eval_size=8, save_model=False, out_dir=str(out), **extra))
        rows[mb] = metrics(out)
        assert json.loads((out / "summary.json").read_text())["config"]["micro_batch"] == mb
    keys = RM_KEYS if script == "reward_model" else DPO_KEYS
    for r, r_mb in zip(rows[None][1:], rows[2][1:]):
        for k in keys:
            if k == "rewards/accuracies" and script == "dpo" and r["step"] == 1:
                continue  # π_θ = π_ref: every pair a tie, broken by float rounding (see above)
            assert r_mb[k] == pytest.approx(r[k], rel=RTOL, abs=METRIC_ATOL), (r["step"], k)


def test_passes_without_gradient_take_the_micro_batch():
    """π_ref's log-probs and the evaluation of dpo.py go --micro-batch pairs at a time (a GPU recipe's
    memory is set by it); without the flag, 256, as the CPU defaults' numbers were made."""
    assert dpo.per_pass(dpo.Args(batch_size=8, micro_batch=1)) == 1
    assert dpo.per_pass(dpo.Args(batch_size=8)) == 256
