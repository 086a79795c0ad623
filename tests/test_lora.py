"""--lora-r: LoRA adapters on a frozen base model (peft, an optional dependency), on the CPU.

Without peft, the flag is one line that says how to install it (tested here by hiding peft).
With peft (the tests below skip without it):
  - only the adapters change (the base weights are those of --model, bit for bit), and in
    reward_model.py the scalar head too;
  - the first `kl/ref` (and DPO's first implicit rewards, PPO's first objective/kl) is exactly 0:
    at the start B = 0, so the policy is exactly its base, and π_ref is that base (adapters off);
  - π_ref is the base model, not a copy: once the adapters have moved, π_ref still gives the base's
    log-probs, the policy others, and π_ref holds no weight of its own;
  - <out-dir>/model reloads with AutoPeftModelForCausalLM and gives the same log-probs;
  - --resume with adapters ends with the numbers of the uninterrupted run, exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

import common
import dpo
import grpo
import harness
import ppo
import reinforce
import reward_model

TINY = str(common.MODELS_DIR / "tiny")
SCRIPTS = {"grpo": grpo, "reinforce": reinforce, "dpo": dpo, "ppo": ppo, "reward_model": reward_model}
# a few small steps of each script (the flags of tests/test_resume.py, fewer evaluations)
FLAGS = {
    "grpo": ["--steps", "4", "--prompts-per-step", "4", "--group-size", "4", "--eval-every", "2",
             "--eval-size", "10", "--beta", "0.04", "--mu", "2", "--warmup-steps", "0", "--lr", "3e-3"],
    "reinforce": ["--steps", "4", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-every", "2",
                  "--eval-size", "10", "--baseline", "value", "--beta", "0.05", "--warmup-steps", "0"],
    "dpo": ["--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-size", "20",
            "--eval-samples", "8"],
    "ppo": ["--steps", "4", "--batch-size", "8", "--mini-batches", "2", "--ppo-epochs", "1", "--eval-samples", "8",
            "--eval-every", "2"],
    "reward_model": ["--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-size", "20",
                     "--norm-samples", "8"],
}
LORA = ["--lora-r", "4"]
# peft 0.21 asks transformers 5 `is_gradient_checkpointing`, which transformers renames
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
CLOCKS = ("time", "seconds", "per_second")


def rows(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not any(c in k for c in CLOCKS)}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


#####################################################################################################
#####  without peft: one line
#####################################################################################################


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_lora_without_peft_is_one_line_saying_how_to_install_it(monkeypatch, capsys, tmp_path, name):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, installed or not
    module, out = SCRIPTS[name], tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        harness.main(module.Args, module.train, argv=FLAGS[name] + LORA + ["--out-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --lora-r needs the peft library, which is not installed: pip install peft\n"
    assert not out.exists()  # refused before anything was loaded or written


@pytest.mark.parametrize("argv, names", [
    (["--lora-r", "-1"], "--lora-r must be ≥ 0"),
    (["--lora-r", "4", "--lora-dropout", "0.05"], "--lora-dropout 0.05"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
])
def test_bad_lora_flags_are_one_line_naming_the_flag(monkeypatch, capsys, tmp_path, argv, names):
    monkeypatch.setitem(sys.modules, "peft", None)  # the flags are checked before peft is looked for
    with pytest.raises(SystemExit) as e:
        harness.main(grpo.Args, grpo.train, argv=argv + ["--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {names}") and err.count("\n") == 1, err


def test_no_lora_flag_never_imports_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model = torch.nn.Linear(2, 2)
    assert harness.apply_lora(model, grpo.Args()) is model  # the default: --lora-r 0


#####################################################################################################
#####  with peft
#####################################################################################################


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def base_name(lora_name: str) -> str:
    """A base weight's name in the peft model -> its name in the plain model."""
    return lora_name.removeprefix("base_model.model.").replace(".base_layer", "")


def assert_only_adapters_moved(lora_model, base_path: str = TINY) -> None:
    base = dict(common.load_model(base_path, torch.device("cpu"))[0].named_parameters())
    named = dict(lora_model.named_parameters())
    adapters = {n: p for n, p in named.items() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    frozen = {base_name(n): p for n, p in named.items() if "lora_" not in n}
    assert set(frozen) == set(base)
    for n, p in frozen.items():  # the base: not trainable, and not moved by a single bit
        assert not p.requires_grad and torch.equal(p, base[n]), n
    assert any(bool(p.abs().sum() > 0) for n, p in adapters.items() if "lora_B" in n)  # B left 0


@pytest.fixture(scope="module")
def grpo_run(peft, tmp_path_factory):
    """grpo.py --lora-r 4 for 4 steps; -> (run folder, the trained policy as train() saved it)."""
    out = tmp_path_factory.mktemp("lora") / "grpo"
    saved = {}
    original = harness.save_policy

    def capture(model, tok, folder, enabled=True):
        saved["policy"], saved["tok"] = model, tok
        return original(model, tok, folder, enabled)
    harness.save_policy = capture
    try:
        # μ = 1: the logged kl/ref of step 1 is the first inner step's (with μ > 1, the last one's)
        grpo.train(harness.parse_args(grpo.Args, FLAGS["grpo"] + LORA + ["--mu", "1", "--out-dir", str(out)]))
    finally:
        harness.save_policy = original
    return out, saved["policy"], saved["tok"]


def test_grpo_trains_only_the_adapters(grpo_run):
    _, policy, _ = grpo_run
    assert harness.is_lora(policy)
    assert_only_adapters_moved(policy)


def test_grpo_first_kl_to_the_reference_is_exactly_zero(grpo_run):
    out, _, _ = grpo_run
    r = rows(out)
    assert r[1]["step"] == 1 and r[1]["kl/ref"] == 0.0  # B = 0: π_θ is its base, which π_ref is
    assert any(row.get("kl/ref", 0) > 0 for row in r[2:])  # then the adapters move π_θ away from π_ref


def test_saved_adapter_reloads_with_auto_peft_and_gives_the_same_logprobs(grpo_run, peft):
    out, policy, tok = grpo_run
    folder = out / "model"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"  # α = 2r
    assert not (folder / "model.safetensors").exists()  # the adapter alone, not the base
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    from transformers import AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(folder)
    prompts, completions = ["12+34=", "5+6=", "99+1="], ["46", "11", "100"]
    ids, mask, _, T = common.encode_prompt_completion(tok2, prompts, completions)
    with torch.no_grad():
        a = common.token_logprobs(policy, ids, mask, T)[0]  # [3, T]
        b = common.token_logprobs(loaded, ids, mask, T)[0]
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert tok2.get_vocab() == tok.get_vocab()


def test_reference_is_the_base_with_adapters_off_and_no_copy(peft):
    args = grpo.Args(lora_r=4)
    cpu = torch.device("cpu")
    policy = harness.apply_lora(common.load_model(TINY, cpu)[0].eval(), args)
    ref = harness.reference_of(policy, args, TINY, cpu, harness.MixedPrecision(cpu, "float32"))
    base = common.load_model(TINY, cpu, trainable=False)[0]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        lp = lambda m: common.token_logprobs(m, ids, mask, 4)[0]  # noqa: E731
        torch.testing.assert_close(lp(policy), lp(base), rtol=0, atol=0)  # B = 0: the policy is its base
        for n, p in policy.named_parameters():  # the adapters move
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
        assert not torch.equal(lp(policy), lp(base))
        torch.testing.assert_close(lp(ref), lp(base), rtol=0, atol=0)  # π_ref: still the base
        torch.testing.assert_close(lp(policy), lp(policy), rtol=0, atol=0)  # and the adapters back on after
    assert isinstance(ref, harness.AdaptersOff) and ref.model is policy  # no weights of its own


def test_unknown_target_module_is_one_line(peft):
    args = grpo.Args(lora_r=4, lora_target_modules="no_such_proj")
    with pytest.raises(common.UsageError, match="--lora-target-modules no_such_proj"):
        harness.apply_lora(common.load_model(TINY, torch.device("cpu"))[0], args)


def test_dpo_and_ppo_start_exactly_at_the_reference(peft, tmp_path):
    out = tmp_path / "dpo"
    dpo.train(harness.parse_args(dpo.Args, FLAGS["dpo"] + LORA + ["--max-steps", "1", "--out-dir", str(out)]))
    first = rows(out)[1]
    # β (log π_θ − log π_ref) = 0 for every response: loss ln 2 (float32)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    out = tmp_path / "ppo"
    ppo.train(harness.parse_args(ppo.Args, FLAGS["ppo"] + LORA + ["--steps", "1", "--out-dir", str(out)]))
    assert rows(out)[1]["objective/kl"] == 0.0  # the rollout's KL to π_ref, summed over the completion
    assert (out / "model" / "adapter_config.json").is_file() and (out / "value_model" / "config.json").is_file()


def test_reward_model_trains_the_adapters_and_the_whole_head(peft, tmp_path):
    out = tmp_path / "rm"
    seen = {}
    original = harness.merge_lora

    def capture(model):  # the LM just before its adapters are merged for saving
        assert_only_adapters_moved(model, str(common.MODELS_DIR / "tiny-pref"))
        seen["checked"] = True
        return original(model)
    harness.merge_lora = capture
    try:
        reward_model.train(harness.parse_args(reward_model.Args, FLAGS["reward_model"] + LORA
                                              + ["--save-every", "1", "--out-dir", str(out)]))
    finally:
        harness.merge_lora = original
    assert seen.get("checked")
    heads = [torch.load(out / f"checkpoint-{s}" / "reward_head.pt") for s in (1, 2)]
    assert not torch.equal(heads[0]["weight"], heads[1]["weight"])  # the head is trained
    assert (out / "checkpoint-1" / "model" / "adapter_config.json").is_file()
    # the saved reward model is the usual folder (adapters merged), which ppo.py loads
    import tasks
    rm, _ = tasks.load_reward_model(out / "model")
    assert not any("lora_" in n for n, _ in rm.named_parameters())


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_resume_with_adapters_gives_the_uninterrupted_numbers(peft, tmp_path, name):
    """A: 4 steps with --save-every 2. B: A's folder cut back to its checkpoint-2 (as a run stopped
    after step 3 would leave it), then --resume: the same rows, summary figures and saved weights."""
    module, a, b = SCRIPTS[name], tmp_path / "A", tmp_path / "B"
    module.train(harness.parse_args(module.Args, FLAGS[name] + LORA + ["--save-every", "2", "--out-dir", str(a)]))
    shutil.copytree(a, b)
    for p in ["checkpoint-4", "model", "value_model", "summary.json"]:
        if (b / p).is_dir():
            shutil.rmtree(b / p)
        elif (b / p).exists():
            (b / p).unlink()
    harness.main(module.Args, module.train, argv=["--resume", str(b)])
    assert rows(b) == rows(a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    strip = lambda s: {k: v for k, v in s.items()  # noqa: E731
                       if not any(c in k for c in CLOCKS) and k not in ("config", "model_dir")}
    assert strip(sb) == strip(sa)
    weights = sorted(p.relative_to(a) for p in a.glob("*/*.safetensors"))
    assert weights and all((b / w).read_bytes() == (a / w).read_bytes() for w in weights)
    if name != "reward_model":
        assert (a / "model" / "adapter_model.safetensors") in [a / w for w in weights]
