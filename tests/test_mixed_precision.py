"""Mixed precision, checked on the CPU: what a GPU run does, with the same arithmetic.

On a GPU, `--dtype auto` is bfloat16. Every script keeps float32 weights for the trained models,
stores the frozen ones' matmul weights as autocast rounds them (`harness.freeze`), and runs its
forward passes under autocast (`harness.MixedPrecision`). The CPU has bf16 autocast too,
so each script runs here for 3 steps with `--dtype bfloat16` at the learning rate that the README
gives for a 0.5B model on a GPU, and the tests check what would go wrong otherwise:

- the trained weights change (bf16 weights would swallow nearly every update at these rates);
- the first step's KL to the reference is exactly 0 (a reference cast to bf16 whole would differ
  from the autocast policy by ~1e-2 per token before any update);
- float16 (with its gradient scaler) gives finite numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import common
import tasks
import harness
import dpo
import grpo
import ppo
import reinforce
import reward_model

CPU = torch.device("cpu")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def changed_share(before: dict, after: dict) -> float:
    """Share of the scalar weights that differ between two state dicts (same keys)."""
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def weights(folder) -> dict:
    from transformers import AutoModelForCausalLM
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def all_finite(rs: list[dict]) -> bool:
    return all(math.isfinite(v) for r in rs for k, v in r.items() if isinstance(v, float))


#####################################################################################################
#####  the helper, by hand
#####################################################################################################


def test_bf16_weights_swallow_small_updates_and_float32_keeps_them():
    # Why the weights stay float32. bf16 keeps 8 significant bits: the gap between neighbours at
    # |w| ∈ [2⁻³, 2⁻²) is 2⁻³·2⁻⁷ = 2⁻¹⁰ ≈ 9.8e-4, so w + 1e-6 rounds back to w. AdamW's first step
    # moves each weight by lr (sign-like), so at lr 1e-6 every update of such a weight is lost.
    torch.manual_seed(0)
    w32 = (torch.rand(1000) * 0.125 + 0.125)  # |w| in [0.125, 0.25)
    w16 = w32.to(torch.bfloat16)
    assert ((w16 + torch.tensor(1e-6, dtype=torch.bfloat16)) == w16).all()  # bf16: all lost
    assert ((w32 + 1e-6) != w32).all()  # float32: the gap there is 2⁻³·2⁻²³ ≈ 1.5e-8, all kept
    # and the same through a real AdamW step on a bf16 parameter, against a float32 one
    for dtype, expect in ((torch.bfloat16, 0.0), (torch.float32, 1.0)):
        p = torch.nn.Parameter(w32.clone().to(dtype))
        opt = torch.optim.AdamW([p], lr=1e-6, weight_decay=0.0)
        p.grad = torch.ones_like(p)
        before = p.detach().clone()
        opt.step()
        assert float((p.detach() != before).float().mean()) == expect, dtype


def test_mixed_precision_autocast_and_float16_scaler():
    prec = harness.MixedPrecision(CPU, "bfloat16")
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with prec.autocast():
        assert lin(x).dtype == torch.bfloat16  # matmuls in the compute dtype
    assert lin.weight.dtype == torch.float32 and prec.scaler is None
    assert harness.MixedPrecision(CPU, "float32").autocast().__class__.__name__ == "nullcontext"
    with pytest.raises(common.UsageError, match="--dtype"):
        harness.MixedPrecision(CPU, "float8")
    # float16: the loss is scaled for backward and the gradient unscaled before clipping, so the
    # returned norm is the true one: L = Σ w·x with x = 1 → ∂L/∂w = 1 for 4 weights → ‖g‖ = 2
    prec = harness.MixedPrecision(CPU, "float16")
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=0.1)
    prec.backward((w * torch.ones(4)).sum())
    assert prec.grad_scale() > 1 and float(w.grad[0]) == prec.grad_scale()
    prec.unscale_(opt)
    assert common.clip_grad_norm([w], max_norm=0) == pytest.approx(2.0)
    prec.step(opt)
    assert torch.allclose(w.detach(), torch.full((4,), -0.1))  # SGD on the unscaled gradient
    # an overflowing gradient: the step is skipped (no NaN in the weights) and the scale drops
    scale = prec.grad_scale()
    opt.zero_grad()
    prec.backward((w * torch.full((4,), float("inf"))).sum())
    prec.unscale_(opt)
    assert math.isinf(common.clip_grad_norm([w], max_norm=1.0))
    prec.step(opt)
    assert torch.allclose(w.detach(), torch.full((4,), -0.1)) and prec.grad_scale() < scale


def test_heads_run_in_float32_under_autocast():
    # The reward head and the value head: w · h + b on the float32 h, with autocast off. A head run
    # in bf16 would round w and h to 8 bits (relative error ~4e-3); float32 agrees with float64 to ~1e-6.
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)).eval()
    rm = tasks.RewardModel(lm).eval()
    vm = ppo.ValueModel(lm, weight=torch.randn(32), bias=0.3).eval()
    ids = torch.randint(3, 20, (3, 7))
    mask = torch.ones_like(ids)
    prec = harness.MixedPrecision(CPU, "bfloat16")
    with torch.no_grad(), prec.autocast():
        r = rm(ids, mask)  # [3]
        v = vm(ids, mask, 4)  # [3, 4]
        h = lm.base_model(input_ids=ids, attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1)).last_hidden_state.double()  # [3, 7, 64]
    assert r.dtype == torch.float32 and v.dtype == torch.float32
    r64 = h[:, -1] @ rm.head.weight.double().reshape(-1) + rm.head.bias.double()  # [3]
    v64 = h[:, -5:-1] @ vm.head.weight.double().reshape(-1) + vm.head.bias.double()  # [3, 4]
    assert torch.allclose(r.double(), r64, atol=1e-5, rtol=0)
    assert torch.allclose(v.double(), v64, atol=1e-5, rtol=0)


#####################################################################################################
#####  each script, 3 steps with --dtype bfloat16 at its GPU learning rate
#####################################################################################################


def test_grpo_bf16(tmp_path):
    out = tmp_path / "grpo"
    grpo.train(grpo.Args(dtype="bfloat16", lr=1e-6, beta=0.04, steps=3, prompts_per_step=4, group_size=4,
                         eval_every=3, eval_size=20, out_dir=str(out)))
    rs = rows(out)
    assert rs[1]["kl/ref"] == 0.0  # π_θ = π_ref exactly before the first update
    assert rs[2]["kl/ref"] > 0  # and not after it
    assert changed_share(weights(common.MODELS_DIR / "tiny"), weights(out / "model")) >= 0.99


def test_reinforce_bf16(tmp_path):
    out = tmp_path / "reinforce"
    reinforce.train(reinforce.Args(dtype="bfloat16", lr=1e-6, beta=0.05, steps=3, prompts_per_step=4,
                                   samples_per_prompt=4, eval_every=3, eval_size=20, out_dir=str(out)))
    rs = rows(out)
    assert rs[1]["kl/ref"] == 0.0 and rs[1]["kl/ref_seq"] == 0.0
    assert changed_share(weights(common.MODELS_DIR / "tiny"), weights(out / "model")) >= 0.99


def test_dpo_bf16(tmp_path):
    out = tmp_path / "dpo"
    dpo.train(dpo.Args(dtype="bfloat16", lr=5e-7, max_steps=3, batch_size=8, eval_every=3, eval_size=40,
                       eval_samples=16, out_dir=str(out)))
    rs = rows(out)
    assert rs[0]["eval/kl_to_ref"] == 0.0  # the sampled KL of π_θ to π_ref, before training
    assert changed_share(weights(common.MODELS_DIR / "tiny-pref"), weights(out / "model")) >= 0.99


def test_reward_model_bf16(tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "rm"
    reward_model.train(reward_model.Args(dtype="bfloat16", lr=1e-5, max_steps=3, batch_size=8, eval_every=3,
                                         eval_size=40, norm_samples=16, out_dir=str(out)))
    # the LM's embeddings of words that none of the 3 batches held get no gradient (the reward
    # model reads hidden states, not the tied LM head), so count the other weights
    before, after = weights(common.MODELS_DIR / "tiny-pref"), weights(out / "model")
    emb = "model.embed_tokens.weight"
    used = (after[emb] != before[emb]).any(1)  # [V] rows that moved
    assert used.float().mean() > 0.5
    rest = {k: v for k, v in before.items() if k not in (emb, "lm_head.weight")}
    assert changed_share(rest, after) >= 0.99
    assert (after[emb][used] != before[emb][used]).float().mean() >= 0.99
    head = load_file(str(out / "model" / tasks.HEAD_FILE))
    assert head["weight"].dtype == torch.float32 and torch.isfinite(head["weight"]).all()


def test_ppo_bf16(tmp_path):
    out = tmp_path / "ppo"
    ppo.train(ppo.Args(dtype="bfloat16", lr=1e-6, steps=3, batch_size=8, mini_batches=2, ppo_epochs=1,
                       eval_every=3, eval_samples=16, out_dir=str(out)))
    rs = rows(out)
    assert rs[0]["eval/kl_to_ref"] == 0.0
    assert rs[1]["objective/kl"] == 0.0 and rs[1]["objective/non_score_reward"] == 0.0  # −β·KL = 0
    assert changed_share(weights(common.MODELS_DIR / "tiny-pref"), weights(out / "model")) >= 0.99


@pytest.mark.parametrize("script", ["grpo", "reinforce", "dpo", "reward_model", "ppo"])
def test_float16_gives_finite_numbers(tmp_path, script):
    out = tmp_path / script
    small = {
        "grpo": lambda: grpo.train(grpo.Args(dtype="float16", lr=1e-6, beta=0.04, steps=3, prompts_per_step=2,
                                             group_size=2, eval_every=3, eval_size=10, out_dir=str(out))),
        "reinforce": lambda: reinforce.train(reinforce.Args(dtype="float16", lr=1e-6, steps=3, prompts_per_step=2,
                                                            samples_per_prompt=2, eval_every=3, eval_size=10,
                                                            out_dir=str(out))),
        "dpo": lambda: dpo.train(dpo.Args(dtype="float16", lr=5e-7, max_steps=3, batch_size=4, eval_every=3,
                                          eval_size=20, eval_samples=8, out_dir=str(out))),
        "reward_model": lambda: reward_model.train(reward_model.Args(dtype="float16", lr=1e-5, max_steps=3,
                                                                     batch_size=4, eval_every=3, eval_size=20,
                                                                     norm_samples=8, out_dir=str(out))),
        "ppo": lambda: ppo.train(ppo.Args(dtype="float16", lr=1e-6, steps=3, batch_size=4, mini_batches=1,
                                          ppo_epochs=1, eval_every=3, eval_samples=8, out_dir=str(out))),
    }
    small[script]()
    rs = rows(out)
    finite = [{k: v for k, v in r.items() if "grad_norm" not in k} for r in rs]  # inf = a skipped step
    assert all_finite(finite), rs
    assert not any(isinstance(v, float) and math.isnan(v) for r in rs for v in r.values())
    w = weights(out / "model")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_a_seeds_run_equals_its_rerun(tmp_path):
    """Same seed, same machine: the same metrics, step by step (timings aside)."""
    logs = []
    for name in ("a", "b"):
        out = tmp_path / name
        grpo.train(grpo.Args(steps=3, prompts_per_step=2, group_size=2, eval_every=3, eval_size=10, seed=5,
                             out_dir=str(out), save_model=False))
        logs.append([{k: v for k, v in r.items() if not k.startswith("time") and "per_second" not in k}
                     for r in rows(out)])
    assert logs[0] == logs[1]
