"""What lets a real model fit one GPU, checked on the CPU: frozen models at the compute precision
(`harness.freeze`), --gradient-checkpointing (`harness.gradient_checkpointing`) and PPO without a
[B, T, V] cache of π_old (`ppo.kl_to_old`, `ppo.old_vocab_logprobs`).

- a frozen copy under bf16 autocast gives the policy's log-probs bit for bit, at the bytes counted
  by hand, and a float32 run casts nothing;
- gradients with checkpointing equal those without (GRPO's loss, the reward model's loss, PPO's
  value model), and the layers really are recomputed;
- each script runs 2 steps with --gradient-checkpointing (and bf16, so the frozen models are the
  rounded ones), logs and saves;
- PPO-clip's policy/kl_old_k3 estimates the exact KL(π_old ‖ π_θ) without bias.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import common
import harness
import tasks
import dpo
import grpo
import ppo
import reinforce
import reward_model

CPU = torch.device("cpu")
BF16 = harness.MixedPrecision(CPU, "bfloat16")


def n_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def batch(vocab: int, seed: int = 0):
    """8 rows of 24 tokens, 3 of them left-padded by 5, the last 12 columns scored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (8, 24), generator=g)  # [8, 24]
    mask = torch.ones_like(ids)
    mask[:3, :5] = 0  # left padding
    return ids, mask, 12


def small_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=tie)).eval()


#####################################################################################################
#####  harness.freeze: the same numbers, fewer bytes
#####################################################################################################


@pytest.mark.parametrize("which", ["tiny", "untied-llama", "gpt2"])
def test_frozen_copy_gives_the_autocast_policys_logprobs_bit_for_bit(which, tiny_random_other_arch):
    if which == "tiny":
        policy = common.load_model("tiny", CPU)[0].eval()
    elif which == "gpt2":  # Conv1D (addmm) instead of nn.Linear, LayerNorm, learned positions
        policy = common.load_model(str(tiny_random_other_arch), CPU)[0].eval()
    else:
        policy = small_llama(tie=False)
    ref = harness.freeze(copy.deepcopy(policy), BF16)
    ids, mask, T = batch(policy.config.vocab_size)
    with torch.no_grad(), BF16.autocast():
        a = common.vocab_logprobs(policy, ids, mask, T)  # [8, 12, V]
        b = common.vocab_logprobs(ref, ids, mask, T)  # [8, 12, V]
    assert torch.equal(a, b)  # bit for bit, not approximately
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    # the bytes by hand: every matmul weight at 2 bytes, everything else (embeddings, norms, biases,
    # a weight tied to the embedding) at 4
    from transformers.pytorch_utils import Conv1D
    emb = policy.get_input_embeddings().weight
    matmul = sum(m.weight.numel() for m in policy.modules()
                 if isinstance(m, (torch.nn.Linear, Conv1D)) and m.weight is not emb)
    assert n_bytes(ref) == n_bytes(policy) - 2 * matmul
    if which == "tiny":  # tied LM head: 2 layers × (4·64·64 + 3·256·64) = 131,072 matmul weights
        assert matmul == 131_072 and n_bytes(policy) == 550_912 and n_bytes(ref) == 288_768
    if which == "untied-llama":  # the untied LM head (50·32) is rounded too; the embedding is not
        assert ref.lm_head.weight.dtype == torch.bfloat16
        assert ref.get_input_embeddings().weight.dtype == torch.float32
    assert n_bytes(ref) < 0.6 * n_bytes(policy)


def test_float32_runs_freeze_nothing_and_float16_rounds_to_float16():
    policy = common.load_model("tiny", CPU)[0].eval()
    ref = harness.freeze(copy.deepcopy(policy), harness.MixedPrecision(CPU, "float32"))
    assert all(p.dtype == torch.float32 for p in ref.parameters()) and n_bytes(ref) == n_bytes(policy)
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))
    ref16 = harness.freeze(copy.deepcopy(policy), harness.MixedPrecision(CPU, "float16"))
    assert ref16.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert ref16.model.norm.weight.dtype == torch.float32


def test_a_frozen_snapshot_follows_the_policy_after_an_update():
    # ppo.py's θ_old for kl-penalty and TRPO: one frozen copy, refreshed with load_state_dict at
    # every rollout; its log-probs must be the policy's, bit for bit, after the policy has moved
    policy = common.load_model("tiny-pref", CPU)[0].eval()
    snapshot = harness.freeze(copy.deepcopy(policy), BF16)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    ids, mask, T = batch(policy.config.vocab_size, seed=1)
    with torch.no_grad(), BF16.autocast():
        before = common.vocab_logprobs(snapshot, ids, mask, T)  # [8, 12, V]
        snapshot.load_state_dict(policy.state_dict())  # θ_old ← θ
        after = common.vocab_logprobs(snapshot, ids, mask, T)
        now = common.vocab_logprobs(policy, ids, mask, T)
    assert not torch.equal(before, now) and torch.equal(after, now)
    assert snapshot.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # still rounded


#####################################################################################################
#####  harness.gradient_checkpointing: the same gradients, the layers recomputed
#####################################################################################################


def grads_of(make_loss, model, checkpointing: bool, prec=None):
    """(gradients by parameter name, forward calls of layer 0's q_proj) of one backward of
    make_loss(model); a copy of the model, with or without checkpointing."""
    model = copy.deepcopy(model)
    lm = model.lm if hasattr(model, "lm") else model
    harness.gradient_checkpointing(lm, checkpointing)  # (a model checkpointed already stays so)
    calls = []
    layer0 = lm.base_model.layers[0]
    layer0.self_attn.q_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    with (prec.autocast() if prec else torch.autocast("cpu", enabled=False)):
        loss = make_loss(model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def assert_same_grads(g0: dict, g1: dict, exact: bool = False):
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        if exact:
            assert torch.equal(g0[k], g1[k]), k
        else:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_checkpointing_gives_grpos_gradients(dtype):
    policy = common.load_model("tiny", CPU)[0].eval()
    ids, mask, T = batch(policy.config.vocab_size, seed=2)
    c_mask = mask[:, -T:].float()  # [8, 12]
    c_mask[0, 8:] = 0  # a completion that ended early
    adv = torch.linspace(-1, 1, 8)  # [8]
    with torch.no_grad():
        old = common.token_logprobs(policy, ids, mask, T)[0] - 0.05  # ρ ≠ 1, some tokens clipped   [8, 12]
        ref = old + 0.1  # [8, 12]

    def loss(m):
        logp = common.token_logprobs(m, ids, mask, T)[0]  # [8, 12]
        return grpo.grpo_loss(logp, old, adv, c_mask, ref, beta=0.04)[0]

    prec = harness.MixedPrecision(CPU, dtype)
    g0, calls0 = grads_of(loss, policy, False, prec)
    g1, calls1 = grads_of(loss, policy, True, prec)
    assert (calls0, calls1) == (1, 2)  # the forward pass, then its recomputation in the backward
    assert_same_grads(g0, g1)


def test_gradient_checkpointing_gives_the_reward_models_gradients():
    lm = common.load_model("tiny-pref", CPU)[0]
    torch.manual_seed(0)
    rm = tasks.RewardModel(lm).eval()
    ids, mask, _ = batch(lm.config.vocab_size, seed=3)

    def loss(m):
        r = m(ids, mask)  # [8]
        return reward_model.bradley_terry_loss(r[:4], r[4:]).mean()

    g0, calls0 = grads_of(loss, rm, False)
    g1, calls1 = grads_of(loss, rm, True)
    assert (calls0, calls1) == (1, 2)
    assert "head.weight" in g0 and "lm.model.layers.0.mlp.up_proj.weight" in g0
    assert_same_grads(g0, g1)


def test_gradient_checkpointing_gives_ppos_value_gradients():
    lm = common.load_model("tiny-pref", CPU)[0]
    torch.manual_seed(0)
    vm = ppo.ValueModel(lm, weight=torch.randn(lm.config.hidden_size), bias=0.1).eval()
    ids, mask, T = batch(lm.config.vocab_size, seed=4)

    def loss(m):
        return (m(ids, mask, T) - 1.0).pow(2).mean()  # [8, 12] -> a scalar

    g0, calls0 = grads_of(loss, vm, False)
    g1, calls1 = grads_of(loss, vm, True)
    assert (calls0, calls1) == (1, 2)
    assert_same_grads(g0, g1)


def test_gradient_checkpointing_keeps_eval_mode_and_a_copy_recomputes_its_own_layers():
    # the scripts keep every model in eval mode (no dropout); checkpointing must not change that,
    # and a deepcopy of a checkpointed model (PPO's value model, θ_old) must run its own weights
    model = common.load_model("tiny-pref", CPU)[0].eval()
    harness.gradient_checkpointing(model)
    assert not any(m.training for m in model.modules())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05)
    ids, mask, T = batch(model.config.vocab_size, seed=5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a = common.token_logprobs(model, ids, mask, T)[0]  # [8, 12]
            b = common.token_logprobs(twin, ids, mask, T)[0]  # [8, 12]
        assert not torch.equal(a, b)
    g_twin, calls = grads_of(lambda m: common.token_logprobs(m, ids, mask, T)[0].sum(), twin, False)
    assert calls == 2  # the copy is checkpointed too


def test_generation_is_unchanged_by_gradient_checkpointing():
    # generation runs without gradients, so the layers keep their KV cache: the same tokens
    model, tok = common.load_model("tiny-pref", CPU)
    model.eval()
    texts = []
    for on in (False, True):
        m = harness.gradient_checkpointing(copy.deepcopy(model), on)
        torch.manual_seed(0)
        texts.append(common.generate_text(m, tok, ["the cat", "a"], 8)[4])
    assert texts[0] == texts[1]


#####################################################################################################
#####  each script with --gradient-checkpointing (and bf16: the frozen models rounded), 2 steps
#####################################################################################################


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script", ["grpo", "reinforce", "dpo", "reward_model", "ppo", "ppo-kl-penalty",
                                    "ppo-trpo"])
def test_each_script_runs_logs_and_saves_with_gradient_checkpointing(tmp_path, script):
    out = tmp_path / script
    kw = dict(dtype="bfloat16", gradient_checkpointing=True, out_dir=str(out))
    run = {
        "grpo": lambda: grpo.train(grpo.Args(beta=0.04, steps=2, prompts_per_step=2, group_size=2, eval_every=2,
                                             eval_size=8, **kw)),
        "reinforce": lambda: reinforce.train(reinforce.Args(beta=0.05, steps=2, prompts_per_step=2,
                                                            samples_per_prompt=2, eval_every=2, eval_size=8, **kw)),
        "dpo": lambda: dpo.train(dpo.Args(max_steps=2, batch_size=4, eval_every=2, eval_size=16, eval_samples=8,
                                          **kw)),
        "reward_model": lambda: reward_model.train(reward_model.Args(max_steps=2, batch_size=4, eval_every=2,
                                                                     eval_size=16, norm_samples=8, **kw)),
        "ppo": lambda: ppo.train(ppo.Args(steps=2, batch_size=4, mini_batches=1, ppo_epochs=1, eval_every=2,
                                          eval_samples=8, **kw)),
        "ppo-kl-penalty": lambda: ppo.train(ppo.Args(policy_loss="kl-penalty", steps=2, batch_size=4, mini_batches=2,
                                                     ppo_epochs=1, eval_every=2, eval_samples=8, **kw)),
        # TRPO's F·v differentiates twice through the checkpointed layers
        "ppo-trpo": lambda: ppo.train(ppo.Args(policy_loss="trpo", trpo_cg_iters=2, steps=2, batch_size=4,
                                               mini_batches=1, ppo_epochs=1, eval_every=2, eval_samples=8, **kw)),
    }
    run[script]()
    rs = rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["gradient_checkpointing"] is True
    assert (out / "model").is_dir() and len(rs) >= 2
    first = rs[1]
    if script in ("grpo", "reinforce"):
        assert first["kl/ref"] == 0.0  # the bf16-rounded π_ref = the autocast π_θ at step 0
    if script == "ppo":
        assert first["objective/kl"] == 0.0 and "policy/kl_old" not in first
        assert first["policy/kl_old_k3"] >= 0  # ρ − 1 − log ρ ≥ 0 per token
    if script in ("ppo-kl-penalty", "ppo-trpo"):
        assert first["objective/kl"] == 0.0 and first["policy/kl_old"] >= 0  # exact, from θ_old's snapshot
    if script == "ppo-trpo" and not first["trpo/line_search_failed"]:
        assert first["policy/kl_old"] == pytest.approx(first["trpo/kl"], rel=1e-3, abs=1e-7)
    if script == "dpo":
        assert rs[0]["eval/kl_to_ref"] == 0.0


#####################################################################################################
#####  PPO: d without the [B, T, V] cache
#####################################################################################################


def test_clips_kl_old_k3_estimates_the_exact_kl_without_bias():
    # One position, many samples: y ~ π_old(·|x) for 4000 rows of the same prompt. The exact d =
    # KL(π_old ‖ π_θ) at that position (`kl_to_old` with θ_old's snapshot) and the k3 estimate from
    # the sampled y (`kl_to_old` without it, PPO-clip's) agree within the sampling error, since
    # E_{y∼π_old}[ρ − 1 − log ρ] = (1 − 1) + KL(π_old ‖ π_θ).
    old = common.load_model("tiny-pref", CPU)[0].eval()
    new = copy.deepcopy(old)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompt = torch.tensor([[5, 9, 14]])  # [1, 3]
    with torch.no_grad():
        p_old = common.vocab_logprobs(old, torch.cat([prompt, prompt[:, :1]], 1), torch.ones(1, 4), 1)[0, 0].exp()
    n = 4000
    y = torch.multinomial(p_old, n, replacement=True)  # [n] draws from π_old(·|x)
    ids = torch.cat([prompt.expand(n, 3), y[:, None]], 1)  # [n, 4]
    mask, c_mask = torch.ones_like(ids), torch.ones(n, 1)
    chunks = [slice(i, i + 1000) for i in range(0, n, 1000)]
    with torch.no_grad():
        old_logp = common.token_logprobs(old, ids, mask, 1)[0]  # [n, 1]
    exact = ppo.kl_to_old(new, old, ids, mask, c_mask, 1, old_logp, chunks)
    k3 = ppo.kl_to_old(new, None, ids, mask, c_mask, 1, old_logp, chunks)
    # the k3 terms' standard error, from the same samples
    with torch.no_grad():
        lr = common.token_logprobs(new, ids, mask, 1)[0] - old_logp  # log ρ   [n, 1]
    se = float((torch.expm1(lr) - lr).std() / n ** 0.5)
    assert exact > 0 and abs(k3 - exact) < 4 * se, (k3, exact, se)
    # and the same π_θ = π_old: both exactly 0
    assert ppo.kl_to_old(old, old, ids[:8], mask[:8], c_mask[:8], 1, old_logp[:8], [slice(0, 8)]) == 0.0
    assert ppo.kl_to_old(old, None, ids[:8], mask[:8], c_mask[:8], 1, old_logp[:8], [slice(0, 8)]) == 0.0
