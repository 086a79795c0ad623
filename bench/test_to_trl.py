"""bench/to_trl.py: the flag → TRL mapping against the installed TRL, its messages, and short runs.

Bench-side (TRL is a bench-only dependency), run with the bench venv:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 bench/.venv/bin/python -m pytest bench/test_to_trl.py -q
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import to_trl  # noqa: E402

import common  # noqa: E402  (to_trl puts the repository root on the path)

import harness  # noqa: E402

import tasks  # noqa: E402
import dpo  # noqa: E402
import grpo  # noqa: E402
import reward_model  # noqa: E402


def test_mapping_matches_installed_trl_and_scripts():
    assert to_trl.check_mapping() == []


def test_check_reports_a_renamed_field_and_a_new_flag(monkeypatch):
    rows = [r for r in to_trl.MAPPING["grpo"] if r.flag != "beta"]  # as if grpo.py gained --beta
    rows.append(to_trl.Row("group_size", ("num_generation",), "field"))  # as if TRL renamed it
    monkeypatch.setitem(to_trl.MAPPING, "grpo", rows)
    problems = to_trl.check_mapping()
    assert "grpo.py --beta has no row in to_trl.MAPPING" in problems
    assert any("GRPOConfig has no field 'num_generation'" in p for p in problems)


def test_grpo_fields():
    kw = to_trl.grpo_fields(harness.parse_args(grpo.Args, []))
    # grpo.py's defaults: 16 prompts × G 8 = 128 completions per step, one micro-batch
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"], kw["num_generations"]) == (128, 1, 8)
    assert (kw["loss_type"], kw["scale_rewards"], kw["max_steps"], kw["beta"]) == ("grpo", "group", 2000, 0.04)
    assert kw["use_bias_correction_kl"] is False and kw["activation_checkpointing"] is False
    dr = to_trl.grpo_fields(harness.parse_args(grpo.Args, ["--loss-agg", "constant", "--no-scale-rewards"]))
    assert (dr["loss_type"], dr["scale_rewards"]) == ("dr_grpo", "none")  # Dr. GRPO
    # μ = 2: TRL counts optimiser steps, so 10 GRPO steps are 20; micro-batch 32 of 128 → 4 accumulated
    mu = to_trl.grpo_fields(harness.parse_args(grpo.Args, ["--steps", "10", "--mu", "2", "--micro-batch", "32"]))
    assert (mu["max_steps"], mu["num_iterations"], mu["per_device_train_batch_size"],
            mu["gradient_accumulation_steps"]) == (20, 2, 32, 4)
    # GSPO: the sequence ratio with its own clip range; CISPO: TRL caps the weight at epsilon_high itself
    gspo = to_trl.grpo_fields(harness.parse_args(grpo.Args, ["--mu", "2", "--ratio", "sequence"]))
    assert (gspo["importance_sampling_level"], gspo["epsilon"], gspo["epsilon_high"]) == ("sequence", 3e-4, 4e-4)
    cispo = to_trl.grpo_fields(harness.parse_args(grpo.Args, ["--mu", "2", "--policy-loss", "cispo",
                                                             "--loss-agg", "token-mean"]))
    assert (cispo["loss_type"], cispo["epsilon_high"], cispo["importance_sampling_level"]) == ("cispo", 5.0, "token")
    # DAPO's overlong shaping: TRL's soft punishment as a second reward, weighted by c
    assert kw["reward_weights"] is None
    ol = to_trl.grpo_fields(harness.parse_args(grpo.Args, ["--max-new-tokens", "6", "--overlong-buffer", "2",
                                                          "--overlong-penalty", "0.5"]))
    assert ol["reward_weights"] == [1.0, 0.5]
    # 4 processes: 128 / 4 = 32 per process, so that the step's batch stays 128
    four = to_trl.grpo_fields(harness.parse_args(grpo.Args, ["--out-dir", "x"]), world=4)
    assert (four["per_device_train_batch_size"], four["gradient_accumulation_steps"]) == (32, 1)


def test_pref_fields():
    # 4,000 built-in pairs / 32 = 125 steps per epoch, 2 epochs = 250; --max-steps cuts it
    kw = to_trl.dpo_fields(harness.parse_args(dpo.Args, ["--loss-type", "length_norm"]), 4000)
    assert (kw["max_steps"], kw["loss_type"], kw["max_length"], kw["precompute_ref_log_probs"]) == \
        (250, ["sigmoid_norm"], 1024, True)  # --max-length: the scripts' default is TRL's, 1024
    kw = to_trl.reward_fields(harness.parse_args(reward_model.Args, ["--no-normalize", "--max-steps", "7"]), 4000)
    assert (kw["max_steps"], kw["center_rewards_coefficient"], kw["max_length"]) == (7, None, 1024)
    assert to_trl.dpo_fields(harness.parse_args(dpo.Args, ["--max-length", "none"]), 4000)["max_length"] is None
    # --micro-batch 8 of --batch-size 32: 8 pairs per pass, 4 passes accumulated per step
    kw = to_trl.dpo_fields(harness.parse_args(dpo.Args, ["--micro-batch", "8"]), 4000)
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (8, 4)
    with pytest.raises(common.UsageError, match="--micro-batch 5 must divide the 32 rows"):  # TRL's are equal
        to_trl.reward_fields(harness.parse_args(reward_model.Args, ["--no-normalize", "--micro-batch", "5"]), 4000)
    # --chat-template: text rows go to TRL as messages (pair_rows); the config is the same
    plain, chat = (to_trl.dpo_fields(harness.parse_args(dpo.Args, flags), 4000)
                   for flags in ([], ["--chat-template"]))
    assert chat == plain
    assert to_trl.pair_rows([{"prompt": "p", "chosen": "c", "rejected": "r"}], chat_template=True) == [
        {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "r"}]}]


SCRIPT_ARGS = {"grpo": grpo.Args, "dpo": dpo.Args, "reward_model": reward_model.Args}


def script_fields(name, flags):
    a = harness.parse_args(SCRIPT_ARGS[name], [*flags, *(["--no-normalize"] * (name == "reward_model"))])
    return a, (to_trl.grpo_fields(a) if name == "grpo" else
               to_trl.dpo_fields(a, 4000) if name == "dpo" else to_trl.reward_fields(a, 4000))


@pytest.mark.parametrize("name", ["grpo", "dpo", "reward_model"])
def test_gradient_checkpointing_fields(name):
    # off: False, not TRL's default (on); on: non-reentrant torch.utils.checkpoint, as harness.gradient_checkpointing
    _, off = script_fields(name, [])
    assert (off["activation_checkpointing"], off["activation_checkpointing_kwargs"]) == (False, None)
    _, on = script_fields(name, ["--gradient-checkpointing"])
    assert (on["activation_checkpointing"], on["activation_checkpointing_kwargs"]) == (True, {"use_reentrant": False})
    assert {k: v for k, v in on.items() if not k.startswith("activation_checkpointing")} == \
        {k: v for k, v in off.items() if not k.startswith("activation_checkpointing")}  # nothing else changes
    cfg = to_trl.config_class(name)(**on)  # as TRL holds it: the deprecated alias mirrors the new name
    assert cfg.gradient_checkpointing is True and cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}


@pytest.mark.parametrize("name", ["grpo", "dpo", "reward_model"])
def test_lora_config(name):
    pytest.importorskip("peft")
    a, kw = script_fields(name, ["--lora-r", "8", "--lora-alpha", "16"])
    assert "peft_config" not in kw and kw == script_fields(name, [])[1]  # the trainer's argument, not a field
    cfg = to_trl.lora_config(a, name)
    head = name == "reward_model"  # the adapters on the backbone, the score head trained whole
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (8, 16, 0.0, "all-linear")
    assert (cfg.task_type, cfg.modules_to_save) == (("SEQ_CLS", ["score"]) if head else ("CAUSAL_LM", None))
    a, _ = script_fields(name, ["--lora-r", "4", "--lora-target-modules", "q_proj, v_proj"])
    cfg = to_trl.lora_config(a, name)
    assert (cfg.lora_alpha, set(cfg.target_modules)) == (8, {"q_proj", "v_proj"})  # α = 2r, as the scripts
    assert to_trl.lora_config(script_fields(name, [])[0], name) is None  # no --lora-r: no adapters


def test_lora_dry_run_prints_the_peft_config(capsys):
    pytest.importorskip("peft")
    assert to_trl.main(["--dry-run", "grpo.py", "--lora-r", "16", "--gradient-checkpointing"]) == 0
    printed = capsys.readouterr().out
    assert "activation_checkpointing=True" in printed and "{'use_reentrant': False}" in printed
    assert "GRPOTrainer(peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, " \
           "target_modules='all-linear', task_type='CAUSAL_LM'" in printed


def test_lora_target_that_names_no_module_is_one_line(tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(common.UsageError, match="--lora-target-modules nope: Target modules {'nope'} not found"):
        to_trl.run(["grpo.py", "--lora-r", "8", "--lora-target-modules", "nope", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_long_addition_task():
    # --task long-addition: grpo.py's rows, and its scoring: the strict answer after the work
    a = harness.parse_args(grpo.Args, ["--task", "long-addition", "--max-new-tokens", "40"])
    kw, (train, heldout) = to_trl.config_fields("grpo", a)
    assert (train, heldout) == tasks.long_addition_task() and kw == to_trl.grpo_fields(a)
    _, tok = common.load_model(str(common.MODELS_DIR / "tiny-long"), torch.device("cpu"), trainable=False)
    reward = to_trl.task_reward(tok, tasks.task_scoring(a.task, a.data))
    r = train[0]
    texts = [tasks.worked_answer(r["prompt"]), r["answer"], tasks.worked_answer(r["prompt"])[:-1] + "0"]
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    assert reward([r["prompt"]] * 3, texts, completion_ids=ids, answer=[r["answer"]] * 3) == [1.0, 1.0, 0.0]


def test_lr_factor_is_the_scripts_schedule():
    # warm-up (k+1)/(w+1), then linear to 0 at the last step; per=2: two optimiser steps per script step
    f = to_trl.lr_factor_fn(total=10, warmup=2, per=2)
    assert [f(s) for s in (0, 1, 2, 3, 4, 19)] == [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0, 1 / 8]
    g = to_trl.lr_factor_fn(total=10, warmup=2, schedule="constant")
    assert [g(s) for s in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]


@pytest.mark.parametrize("argv, says", [
    (["ppo.py"], "TRL 1.16 has no PPOTrainer"),
    (["grpo.py", "--adv-eps", "0.001"], "--adv-eps 0.001: TRL divides by std + 0.0001"),
    (["grpo.py", "--reward", "process"], "--reward process: TRL's GRPOTrainer has no per-token"),
    (["grpo.py", "--micro-batch", "30"], "--micro-batch 30 must divide the 128 completions"),
    (["grpo.py", "--device", "cuda:1"], "--device cuda:1: under TRL the launcher picks the GPUs"),
    (["grpo.py", "--mu", "2", "--policy-loss", "cispo", "--loss-agg", "seq-mean"], "--policy-loss cispo: TRL's loss_type=cispo is a token"),
    (["grpo.py", "--beta", "0.04", "--kl-estimator", "k2"], "--kl-estimator k2: TRL's KL term is k3 only"),
    (["grpo.py", "--dynamic-sampling"], "--dynamic-sampling: TRL's GRPOTrainer has no dynamic sampling"),
    (["dpo.py", "--loss-type", "reference_free"], "--loss-type reference_free: TRL 1.16's DPOTrainer has no"),
    (["dpo.py", "--label-smoothing", "0.1"], "--label-smoothing 0.1: TRL 1.16's sigmoid loss ignores"),
    (["dpo.py", "--beta", "0"], "--beta must be > 0"),  # the script's own validate
    (["sft.py"], "sft.py: expected grpo.py, dpo.py or reward_model.py"),
])
def test_no_equivalent_is_one_line_error(argv, says, capsys):
    assert to_trl.main(["--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, says", [
    (["grpo.py"], "--out-dir is required with 2 processes"),
    (["grpo.py", "--out-dir", "x", "--prompts-per-step", "3", "--group-size", "3"],
     "the batch of 9 does not split evenly over 2 processes"),  # 3 prompts × G 3
    (["dpo.py", "--out-dir", "x", "--batch-size", "5"], "--batch-size: the batch of 5 does not split evenly"),
])
def test_several_processes_keep_the_step_batch(argv, says, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun / accelerate launch set it
    assert to_trl.main(["--dry-run", *argv]) == 2
    assert says in capsys.readouterr().err


def test_bad_flag_is_the_scripts_error(capsys):
    for run in (lambda argv: harness.parse_args(grpo.Args, argv), lambda argv: to_trl.main(["grpo.py", *argv])):
        with pytest.raises(SystemExit) as e:
            run(["--group-size", "eight"])
        assert e.value.code == 2
    a, b = capsys.readouterr().err.splitlines()
    assert a == b and "--group-size" in a


def test_cosmetic_flag_warns(capsys):
    to_trl.reward_fields(harness.parse_args(reward_model.Args, []), 4000)  # --normalize is the default
    err = capsys.readouterr().err
    assert err.startswith("warning: --normalize") and err.count("\n") == 1


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert to_trl.main(["--dry-run", "grpo.py", "--out-dir", str(out), "--loss-agg", "token-mean"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("GRPOConfig(") and "loss_type='dapo'" in printed and "num_generations=8" in printed
    assert not out.exists()


def test_bad_data_or_model_leaves_no_folder(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    with pytest.raises(common.UsageError, match="missing key"):
        to_trl.run(["grpo.py", "--data", str(bad), "--out-dir", str(tmp_path / "run")])
    with pytest.raises(common.UsageError, match="--chat-template: the tokenizer of --model tiny has no chat"):
        to_trl.run(["grpo.py", "--chat-template", "--out-dir", str(tmp_path / "run")])  # grpo.py's check
    assert not (tmp_path / "run").exists()


def test_trl_tokenizes_pairs_as_the_scripts_do(tmp_path):
    # prompt, then completion + EOS: TRL's ids for the joined text are the ids the scripts score
    a = harness.parse_args(reward_model.Args, ["--no-normalize", "--max-steps", "1", "--out-dir", str(tmp_path)])
    train, heldout = tasks.load_preferences(None)
    train = train[:16]
    from trl import RewardConfig
    cfg = RewardConfig(**to_trl.reward_fields(a, len(train)))
    trainer = to_trl.build_reward(a, cfg, train, heldout)
    # the script's AdamW holds every weight (no --lora-r)
    assert [p for g in trainer.optimizer.param_groups for p in g["params"]] == list(trainer.model.parameters())
    tok = trainer.processing_class
    for p, ex in zip(train, trainer.train_dataset):
        prompt = tok.encode(p["prompt"], add_special_tokens=False)
        assert ex["chosen_ids"] == prompt + tok.encode(p["chosen"], add_special_tokens=False) + [tok.eos_token_id]
        assert ex["rejected_ids"] == prompt + tok.encode(p["rejected"], add_special_tokens=False) + [tok.eos_token_id]


@pytest.mark.parametrize("argv, key", [
    (["grpo.py", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "1",
      "--eval-size", "8", "--no-pass-at-k"], "eval/accuracy"),
    (["dpo.py", "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-size", "8",
      "--eval-samples", "4", "--max-new-tokens", "8"], "eval/heldout_pair_accuracy"),
    (["reward_model.py", "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-size", "8",
      "--no-normalize", "--margin", "0.5"], "eval/heldout_accuracy"),
])
def test_short_run_logs_and_saves(argv, key, tmp_path):
    out = tmp_path / "run"
    if argv[0] == "dpo.py":  # TRL precomputes the reference log-probs of every pair: give it 20
        pairs = (common.MODELS_DIR / "tiny-pref" / "pairs_train.jsonl").read_text().splitlines()[:20]
        (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
        argv = [*argv, "--data", str(tmp_path / "pairs.jsonl")]
    summary = to_trl.run([*argv, "--out-dir", str(out), "--device", "cpu", "--log-every", "1"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if key in r] == [0, 1, 2]  # the script's evaluation, its names
    assert any("trl/loss" in r for r in rows)  # TRL's own logs
    assert summary["steps"] == 2 and json.loads((out / "summary.json").read_text())["final"][key] is not None
    assert (out / "model" / "config.json").is_file()


@pytest.mark.parametrize("argv", [
    ["grpo.py", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "1",
     "--eval-size", "8", "--no-pass-at-k"],
    ["dpo.py", "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-size", "8",
     "--eval-samples", "4", "--max-new-tokens", "8"],
    ["reward_model.py", "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-size", "8",
     "--no-normalize"],
])
def test_short_run_with_lora_and_checkpointing(argv, tmp_path):
    # --lora-r through TRL's peft_config: only the adapters (and reward_model.py's head) in the optimiser,
    # trained; grpo.py and dpo.py save the adapter, reward_model.py the merged sequence-classification folder
    pytest.importorskip("peft")
    from safetensors.torch import load_file
    out = tmp_path / "run"
    if argv[0] == "dpo.py":
        pairs = (common.MODELS_DIR / "tiny-pref" / "pairs_train.jsonl").read_text().splitlines()[:20]
        (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
        argv = [*argv, "--data", str(tmp_path / "pairs.jsonl")]
    summary = to_trl.run([*argv, "--lora-r", "8", "--gradient-checkpointing", "--out-dir", str(out),
                          "--device", "cpu", "--log-every", "1"])
    assert summary["steps"] == 2 and summary["peft_config"].startswith("LoraConfig(r=8, lora_alpha=16, ")
    assert summary["trl_config"]["activation_checkpointing"] is True
    if argv[0] == "reward_model.py":
        weights = load_file(out / "model" / "model.safetensors")
        assert not any("lora" in k for k in weights) and "score.weight" in weights  # merged, the usual folder
        start, _ = to_trl.load_reward_backbone(summary["config"]["model"], summary["config"]["seed"])
        assert not torch.equal(weights["score.weight"], start.score.weight.detach())  # the head trained whole
        return
    weights = load_file(out / "model" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and (argv[0] == "grpo.py" or any(v.abs().sum() > 0 for v in lora_b))  # B starts at 0: trained


def test_trl_soft_overlong_punishment_is_grpos_overlong_penalty():
    # the same DAPO eq. 13 on the same lengths: L_max = 6, L = 2 → 0 up to 4 tokens, −0.5 at 5, −1 at 6
    from trl.rewards import get_soft_overlong_punishment
    trl_fn = get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=2)
    lengths = list(range(0, 7))
    ours = grpo.overlong_penalty(torch.tensor(lengths), max_len=6, buffer=2, penalty=1.0).tolist()
    assert ours == pytest.approx(trl_fn([[1] * n for n in lengths])) and ours[4:] == [0.0, -0.5, -1.0]


#####################################################################################################
#####  chat data: conversational prompts for grpo.py, message pairs for dpo.py and reward_model.py,
#####  and --chat-template on text rows, on a small model with Qwen2.5-Instruct's conventions
#####################################################################################################

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from qwen_style import save_qwen_style  # noqa: E402


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random Qwen2 model whose chat template ends every turn "<|im_end|>\\n" (tests/qwen_style.py)."""
    return save_qwen_style(tmp_path_factory.mktemp("qwen_style"))


def chat_data(folder: Path, kind: str) -> Path:
    """10 rows: `prompts` (conversational prompt-only rows with an answer), `pairs` (message pairs)
    or `text` (text pairs)."""
    def user(t):
        return [{"role": "user", "content": t}]

    def assistant(t):
        return [{"role": "assistant", "content": t}]
    rows = {"prompts": [{"prompt": user(f"What is {i}+{i}?"), "answer": 2 * i} for i in range(10)],
            "pairs": [{"prompt": user(f"What is {i}+{i}?"), "chosen": assistant(f"It is {2 * i}."),
                       "rejected": assistant(f"{2 * i + 1}")} for i in range(10)],
            "text": [{"prompt": f"What is {i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": f"{2 * i + 1}"}
                     for i in range(10)]}[kind]
    path = folder / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GRPO_2 = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "1",
          "--eval-size", "2", "--no-pass-at-k", "--max-new-tokens", "4"]
PREF_2 = ["--max-steps", "2", "--batch-size", "2", "--eval-every", "1", "--eval-size", "2"]


@pytest.mark.parametrize("script, data, flags, key", [
    ("grpo.py", "prompts", GRPO_2, "eval/accuracy"),  # TRL's conversational prompt-only rows
    ("dpo.py", "pairs", PREF_2 + ["--eval-samples", "2", "--max-new-tokens", "4"],
     "eval/heldout_pair_accuracy"),
    ("dpo.py", "text", PREF_2 + ["--eval-samples", "2", "--max-new-tokens", "4", "--chat-template"],
     "eval/heldout_pair_accuracy"),
    ("reward_model.py", "pairs", PREF_2 + ["--no-normalize"], "eval/heldout_accuracy"),
    ("reward_model.py", "text", PREF_2 + ["--no-normalize", "--chat-template"], "eval/heldout_accuracy"),
])
def test_chat_data_short_run(script, data, flags, key, qwen, tmp_path):
    out = tmp_path / "run"
    summary = to_trl.run([script, "--model", str(qwen), "--data", str(chat_data(tmp_path, data)), *flags,
                          "--out-dir", str(out), "--device", "cpu", "--log-every", "1"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if key in r] == [0, 1, 2]  # the script's evaluation, on the chat rows
    assert summary["steps"] == 2 and (out / "model" / "config.json").is_file()


@pytest.mark.parametrize("data, flags", [("pairs", []), ("text", ["--chat-template"])])
def test_trl_reads_a_chat_reward_where_the_scripts_do(data, flags, qwen, tmp_path):
    # TRL's RewardTrainer tokenizes apply_chat_template(prompt + chosen), "<|im_end|>\n" at the end;
    # the scripts' rows (render_chat, then prompt + completion + EOS + tasks.chat_suffix) are the same ids
    path = chat_data(tmp_path, data)
    a = harness.parse_args(reward_model.Args, ["--model", str(qwen), "--data", str(path), "--no-normalize",
                                               "--max-steps", "1", "--out-dir", str(tmp_path / "run"),
                                               *flags])
    train, heldout = tasks.load_preferences(str(path))
    from trl import RewardConfig
    trainer = to_trl.build_reward(a, RewardConfig(**to_trl.reward_fields(a, len(train))), train, heldout)
    tok = trainer.processing_class
    suffix = tasks.chat_suffix(tok)
    assert suffix == tok("\n", add_special_tokens=False)["input_ids"]
    for p, ex in zip(tasks.render_chat(tok, train, a.chat_template), trainer.train_dataset):
        ids, mask, _, _ = common.encode_prompt_completion(tok, [p["prompt"]] * 2,
                                                          [p["chosen"], p["rejected"]])  # [2, L]
        ids, mask = tasks.append_after_last(ids, mask, suffix, pad_id=tok.pad_token_id)
        assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == [ex["chosen_ids"], ex["rejected_ids"]]
