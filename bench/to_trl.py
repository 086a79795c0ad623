"""The README's TRL column, runnable: a script's own flags, trained by TRL's trainer on the project's task.

    python bench/to_trl.py grpo.py [grpo.py's flags]            # GRPOTrainer, arithmetic + tasks.score
    python bench/to_trl.py dpo.py [dpo.py's flags]              # DPOTrainer, the preference pairs
    python bench/to_trl.py reward_model.py [its flags]          # RewardTrainer, the preference pairs
    python bench/to_trl.py --dry-run grpo.py --loss-agg constant --no-scale-rewards   # print the config only
    python bench/to_trl.py --check                              # the mapping against the installed TRL
    python bench/to_trl.py --table                              # the mapping as README tables

    accelerate launch --num_processes 4 bench/to_trl.py grpo.py --out-dir runs/trl_grpo \\
        --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --chat-template \\
        --max-new-tokens 256 --prompts-per-step 8 --group-size 8 --lr 1e-6 --beta 0.04   # 4 GPUs

It runs in the bench virtual environment (TRL is a bench-only dependency):
    python3 -m venv bench/.venv && bench/.venv/bin/pip install -r requirements.txt -r bench/requirements.txt
    HF_HUB_OFFLINE=1 bench/.venv/bin/python bench/to_trl.py grpo.py --steps 20

The flags are parsed by the script's own `Args` (harness.parse_args), so the defaults, `--help` and
the errors of a bad flag are the script's; the script's `validate` runs too. Each flag then becomes
a field of the TRL config (GRPOConfig, DPOConfig, RewardConfig), or something that this file does
itself (the data, the run folder, the exact learning-rate schedule, the script's evaluation), or a
one-line message when TRL has no equivalent: an error when the flag's value changes the algorithm,
a warning when it does not change training. `MAPPING` below is that table, per script, and
`--table` prints it; `--check` (and bench/test_to_trl.py) checks that every field it names exists
in the installed TRL's config dataclass, that every flag of each script has a row, and that the
built configs construct.

What is the same as the script (see bench/bench_trl_grpo.py for a measured GRPO side by side):
the model (loaded with common.load_model, float32 weights, autocast through bf16/fp16), the data
(tasks.load_task, tasks.load_preferences), the reward (tasks.score), the optimiser (torch
AdamW, weight decay as the script's, grad-norm clip) and the learning-rate schedule: the scripts
warm up as (s+1)/(w+1), HF's schedules start at 0, so the exact LambdaLR goes to the trainer through
`optimizers=` (the config's lr_scheduler_type and warmup_steps are set to the nearest HF schedule,
for a reader who copies the config). The script's evaluation runs as a callback every
--eval-every steps on the main process, and its numbers go to <out-dir>/metrics.jsonl under the
script's names (TRL's own logs go there too, as trl/...), with summary.json at the end.

What differs, by construction: the random streams (prompt order, samples, data order), TRL's
generation (HF `generate`), and in reward_model.py the head (TRL: AutoModelForSequenceClassification,
a bias-free `score` head drawn from N(0, initializer_range²); reward_model.py: a head with a bias,
N(0, 1/(d+1))). The saved model is TRL's (`save_model` into <out-dir>/model): for reward_model.py a
sequence-classification folder, which tasks.load_reward_model and ppo.py --reward-model read.

Memory options: --gradient-checkpointing becomes activation_checkpointing=True (transformers 5's
name of gradient_checkpointing) with non-reentrant torch.utils.checkpoint, as the scripts; HF
checkpoints each decoder layer in train mode, the scripts wrap each layer themselves in eval mode.
--lora-r R (with --lora-alpha, --lora-dropout, --lora-target-modules) becomes the trainer's
peft_config, the peft.LoraConfig that harness.apply_lora builds (α = 2r by default); for
reward_model.py with modules_to_save=["score"], so the head is trained whole, and the saved folder
has the adapters merged in, as reward_model.py's. The optimiser holds the trainable weights of the
model TRL wrapped (with --lora-r the adapters, and the score head).

Chat data: rows of messages go to TRL as they are, and with --chat-template text rows go as one user
and one assistant message, which TRL renders with the tokenizer's chat template; the evaluation
renders them as the script does (tasks.render_chat), and reads a reward model where TRL trained it,
after the template's trailing tokens (tasks.chat_suffix).

Several GPUs: `accelerate launch --num_processes N bench/to_trl.py SCRIPT ...`, or
`torchrun --nproc_per_node N bench/to_trl.py SCRIPT ...` (which also runs N processes on the CPU,
with gloo; `accelerate launch` on the CPU starts one unless MPI is set up). The batch flags keep
their meaning for the whole step: per_device_train_batch_size × N × gradient_accumulation_steps =
the script's batch, so it must divide evenly; --out-dir is then required (every process must name
the same folder); the evaluation runs on the main process only. With several processes dpo.py's
reference log-probs are recomputed every step (TRL caches its precomputed ones per process for an
in-memory data set). ppo.py: TRL 1.16 has no PPOTrainer.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

import harness  # noqa: E402

import tasks  # noqa: E402
from common import UsageError, check  # noqa: E402

SCRIPTS = {"grpo": "GRPOConfig", "dpo": "DPOConfig", "reward_model": "RewardConfig"}
TRAINERS = {"grpo": "GRPOTrainer", "dpo": "DPOTrainer", "reward_model": "RewardTrainer"}
TRAINER_ARGS = {"reward_funcs", "peft_config"}  # rows' TRL names that are the trainer's arguments, not config fields
NO_TRAINER = {
    "ppo": "ppo.py: TRL 1.16 has no PPOTrainer (neither trl nor trl.experimental defines one), so ppo.py "
           "has no TRL trainer to run",
    "reinforce": "reinforce.py: not mapped (TRL's nearest trainer is RLOOTrainer, a different estimator)",
    "dqn_maze": "dqn_maze.py: not an LLM trainer; TRL has no equivalent",
}


@dataclass(frozen=True)
class Row:
    """One flag of a script and what it becomes. kind: `field` (sets the TRL fields `trl`),
    `to_trl` (this file honours it: data, run folder, schedule, evaluation), `error` or `warning`
    (no TRL equivalent: the note says when it stops the run or warns)."""
    flag: str
    trl: tuple[str, ...]
    kind: str
    note: str = ""


R = Row
COMMON_RUN = [  # the flags every script shares
    R("out_dir", ("output_dir",), "field", "default runs/trl_<script>__s<seed>__<time>; required with several "
                                          "processes"),
    R("overwrite", (), "to_trl", "the script's rule (harness.prepare_run_dir)"),
    R("seed", ("seed",), "field"),
    R("device", ("use_cpu",), "field", "cpu → use_cpu=True; cuda: the launcher's GPUs; cuda:N is an error "
                                       "(use CUDA_VISIBLE_DEVICES=N)"),
    R("dtype", ("bf16", "fp16"), "field", "auto → bf16 on a GPU that supports it, else fp32; float32 → "
                                          "neither; bfloat16 → bf16; float16 → fp16 (weights stay fp32)"),
    R("save_every", (), "error", "set is an error: to_trl saves the final model only (TRL's save_steps "
                                 "writes TRL's own checkpoints, which --resume cannot read)"),
    R("save_total_limit", (), "error", "set is an error (see --save-every)"),
    R("resume", (), "error", "set is an error: TRL resumes its own checkpoints (trainer.train("
                             "resume_from_checkpoint=...))"),
    R("threads", (), "to_trl", "harness.set_threads on the model, as the script (the CPU only)"),
    R("gradient_checkpointing", ("activation_checkpointing", "activation_checkpointing_kwargs"), "field",
      "activation_checkpointing=True (transformers 5's name of gradient_checkpointing) with "
      "activation_checkpointing_kwargs={use_reentrant: False}: non-reentrant torch.utils.checkpoint per "
      "decoder layer, as the scripts; but HF calls model.activation_checkpointing_enable, which "
      "checkpoints a layer only in train mode (the Trainer trains in train mode, the scripts in eval "
      "mode and wrap each layer themselves); off → False (TRL's own default is on)"),
]
LORA = [  # every script's --lora-* flags: a peft.LoraConfig as the trainer's peft_config (build_lora)
    R("lora_r", ("peft_config",), "field", "R > 0 → peft_config=LoraConfig(r=R, ...), passed to the trainer "
                                          "(TRL calls get_peft_model, as harness.apply_lora); 0 → None, no "
                                          "adapters; the optimiser then holds the trainable (adapter) weights"),
    R("lora_alpha", ("peft_config",), "field", "LoraConfig(lora_alpha=α), default 2r as the scripts; idle "
                                              "without --lora-r"),
    R("lora_dropout", ("peft_config",), "field", "LoraConfig(lora_dropout=0): the scripts accept only 0 "
                                                "(TRL trains in train mode, where a dropout would act)"),
    R("lora_target_modules", ("peft_config",), "field", "LoraConfig(target_modules=): all-linear as it is, "
                                                       "names as a list; idle without --lora-r"),
]
PREF_STEPS = [  # dpo.py and reward_model.py loop the same way
    R("epochs", ("num_train_epochs", "max_steps"), "field", "max_steps = the script's step count, "
                                                            "epochs × ⌈pairs / batch⌉ (HF would run on past it)"),
    R("batch_size", ("per_device_train_batch_size",), "field", "pairs per step over all processes: "
                                                               "per_device_train_batch_size × processes "
                                                               "× gradient_accumulation_steps"),
    R("micro_batch", ("per_device_train_batch_size", "gradient_accumulation_steps"), "field",
      "per_device_train_batch_size = micro_batch; it must divide the rows per process (the scripts allow "
      "a ragged last micro-batch, TRL does not: error)"),
    R("lr", ("learning_rate",), "field"),
    R("max_steps", ("max_steps",), "field", "min(--max-steps, the epochs' steps)"),
    R("warmup_steps", ("warmup_steps", "lr_scheduler_type"), "field",
      "lr_scheduler_type=linear; the exact schedule ((s+1)/(w+1) warm-up, linear decay) through optimizers="),
    R("grad_clip", ("max_grad_norm",), "field", "0 disables clipping in both"),
    R("chat_template", (), "to_trl", "text rows go to TRL as [{role: user, content: prompt}] and "
                                     "[{role: assistant, content: completion}], which TRL renders with the "
                                     "chat template, as the script's --chat-template; rows of messages go "
                                     "as they are"),
]
MAPPING: dict[str, list[Row]] = {
    "grpo": [
        R("model", (), "to_trl", "common.load_model, passed as the instance; TRL builds the β > 0 reference "
                                 "from the same folder"),
        R("data", (), "to_trl", "tasks.load_task rows {prompt, answer}; `answer` reaches the reward function"),
        R("task", ("reward_funcs",), "to_trl", "arithmetic or long-addition: tasks.load_task(task=)'s rows, "
                                               "scored by tasks.score as grpo.py scores them (long addition: "
                                               "the strict answer after the work); the evaluation logs "
                                               "long addition's format figures (eval/worked_frac, ...) as "
                                               "grpo.py, not its per-step completions/worked_frac"),
        R("chat_template", (), "to_trl", "a text prompt goes in as [{role: user, content}], which TRL "
                                         "renders with the tokenizer's chat template "
                                         "(add_generation_prompt); a prompt of messages goes as it is"),
        *COMMON_RUN,
        R("steps", ("max_steps",), "field", "max_steps = steps × mu (TRL counts optimiser steps)"),
        R("prompts_per_step", ("per_device_train_batch_size", "gradient_accumulation_steps"), "field",
          "B = prompts × G completions per step: per_device_train_batch_size × processes × "
          "gradient_accumulation_steps = B"),
        R("group_size", ("num_generations",), "field"),
        R("max_new_tokens", ("max_completion_length",), "field", "also Dr. GRPO's constant in both"),
        R("temperature", ("temperature", "top_k", "top_p"), "field", "top_k=0, top_p=1: no truncation, as grpo.py"),
        R("lr", ("learning_rate",), "field"),
        R("warmup_steps", ("warmup_steps",), "field", "× mu; the exact schedule through optimizers="),
        R("lr_schedule", ("lr_scheduler_type",), "field", "linear → linear, constant → constant_with_warmup; "
                                                           "the exact schedule through optimizers="),
        R("mu", ("num_iterations",), "field"),
        R("epsilon", ("epsilon",), "field"),
        R("epsilon_high", ("epsilon_high",), "field"),
        R("beta", ("beta", "use_bias_correction_kl"), "field", "use_bias_correction_kl=False: grpo.py's plain k3 KL"),
        R("loss_agg", ("loss_type",), "field", "seq-mean → grpo, token-mean → dapo, constant → dr_grpo"),
        R("ratio", ("importance_sampling_level",), "field", "token → token, sequence → sequence (GSPO)"),
        R("gspo_epsilon", ("epsilon",), "field", "with --ratio sequence: epsilon"),
        R("gspo_epsilon_high", ("epsilon_high",), "field", "with --ratio sequence: epsilon_high"),
        R("policy_loss", ("loss_type",), "field", "cispo → loss_type=cispo, which is a token mean in TRL: "
                                                  "--policy-loss cispo's default (or --loss-agg token-mean); another --loss-agg is an error"),
        R("cispo_epsilon", (), "error", "set is an error: TRL's CISPO clips the weight from above only"),
        R("cispo_epsilon_high", ("epsilon_high",), "field", "with --policy-loss cispo: epsilon_high = 1 + ε_high "
                                                            "(TRL's value is the cap itself)"),
        R("kl_estimator", (), "error", "k3 is TRL's (always); k1 or k2 with --beta > 0 is an error"),
        R("dynamic_sampling", (), "error", "set is an error: GRPOTrainer has no dynamic sampling"),
        R("max_sample_rounds", (), "to_trl", "only with --dynamic-sampling (an error here)"),
        R("overlong_buffer", ("reward_funcs",), "field", "> 0 adds TRL's trl.rewards.get_soft_overlong_punishment("
                                                         "max_new_tokens, L), DAPO eq. 13 on the same lengths "
                                                         "(completion ids up to the first EOS)"),
        R("overlong_penalty", ("reward_weights",), "field", "reward_weights = [1, c]: the task score plus c × "
                                                            "the penalty, summed before the group advantage"),
        R("scale_rewards", ("scale_rewards",), "field", "true → group, false → none"),
        R("adv_eps", (), "error", "TRL divides by std + 1e-4, fixed: any other value is an error"),
        R("reward", ("reward_funcs",), "field", "outcome → tasks.score as TRL's reward function; process is "
                                                "an error (TRL has no per-token advantages)"),
        R("grad_clip", ("max_grad_norm",), "field", "0 disables clipping in both"),
        R("micro_batch", ("per_device_train_batch_size", "gradient_accumulation_steps"), "field",
          "per_device_train_batch_size = micro_batch; it must divide B / processes (grpo.py allows a "
          "ragged last micro-batch, TRL does not: error)"),
        R("eval_every", (), "to_trl", "callback: tasks.greedy_accuracy every N GRPO steps → eval/accuracy"),
        R("eval_size", (), "to_trl", "held-out prompts of that evaluation"),
        R("pass_at_k", (), "to_trl", "callback: tasks.pass_at_k before and after training"),
        R("log_every", ("logging_steps",), "field", "× mu"),
        R("save_model", (), "to_trl", "trainer.save_model(<out-dir>/model); with --lora-r the adapter as "
                                      "peft saves it, as grpo.py"),
        *LORA,
    ],
    "dpo": [
        R("model", ("precompute_ref_log_probs",), "to_trl", "common.load_model, passed as the instance; the "
          "reference is the same weights; precompute_ref_log_probs=True on one process (once, before "
          "training, as dpo.py), False on several (TRL's cache of them is per process: a reference "
          "forward pass every step instead)"),
        R("data", (), "to_trl", "tasks.load_preferences; a space joins prompt and completion where neither "
                                "has one (TRL tokenizes prompt + completion as one string)"),
        *COMMON_RUN,
        R("max_length", ("max_length",), "field", "TRL's keep_start truncation, as dpo.py; none → None"),
        R("beta", ("beta",), "field"),
        R("loss_type", ("loss_type",), "field", "sigmoid, ipo, hinge → the same; length_norm → sigmoid_norm; "
                                                "reference_free is an error (TRL 1.16 dropped it)"),
        R("label_smoothing", (), "error", "> 0 is an error: TRL 1.16's sigmoid ignores label_smoothing, and its "
                                          "robust loss is another estimator (rDPO, not cDPO)"),
        *PREF_STEPS,
        R("eval_every", (), "to_trl", "callback: held-out pair accuracy of the implicit reward, gold reward and "
                                      "KL to π_ref of samples (dpo.py's evaluate)"),
        R("eval_size", (), "to_trl", "held-out pairs of that evaluation"),
        R("eval_samples", (), "to_trl", "samples of that evaluation"),
        R("max_new_tokens", (), "to_trl", "token limit of those samples"),
        R("log_every", ("logging_steps",), "field"),
        R("save_model", (), "to_trl", "trainer.save_model(<out-dir>/model); with --lora-r the adapter as "
                                      "peft saves it, as dpo.py"),
        *LORA,
    ],
    "reward_model": [
        R("model", (), "to_trl", "AutoModelForSequenceClassification(num_labels=1) from the same folder "
                                 "(a bias-free score head, HF's init)"),
        R("data", (), "to_trl", "tasks.load_preferences, joined as for dpo.py; TRL appends EOS, as "
                                "reward_model.py does"),
        *COMMON_RUN,
        *PREF_STEPS,
        R("max_length", ("max_length",), "field", "TRL drops the longer rows, as reward_model.py; none → None"),
        R("weight_decay", ("weight_decay",), "field", "the optimiser (torch AdamW on every parameter, as "
                                                      "reward_model.py) goes in through optimizers="),
        R("margin", (), "to_trl", "a `margin` column of m in every row: TRL's −log σ(r_w − r_l − margin)"),
        R("center_coef", ("center_rewards_coefficient",), "field", "0 → None"),
        R("normalize", (), "warning", "TRL does not normalise: the saved model outputs raw r_φ (training is the "
                                      "same); pass --no-normalize to silence"),
        R("norm_samples", (), "warning", "only with --normalize (see there)"),
        R("max_new_tokens", (), "warning", "only with --normalize (see there)"),
        R("eval_every", (), "to_trl", "callback: train and held-out pair accuracy (reward_model.score_pairs)"),
        R("eval_size", (), "to_trl", "pairs of that evaluation"),
        R("log_every", ("logging_steps",), "field"),
        R("save_model", (), "to_trl", "trainer.save_model(<out-dir>/model): a sequence-classification folder; "
                                      "with --lora-r the adapters merged in first (merge_and_unload), as "
                                      "reward_model.py"),
        R("lora_r", ("peft_config",), "field", "as dpo.py's, with task_type=SEQ_CLS and "
                                              "modules_to_save=['score']: the adapters on the backbone's "
                                              "linear layers, the score head trained whole, as reward_model.py "
                                              "(TRL's docstring asks for modules_to_save=['score'])"),
        *LORA[1:],
    ],
}
# what to_trl sets whatever the flags, because the scripts do it that way
FIXED = {
    "all": {"report_to": "none", "save_strategy": "no", "dataloader_num_workers": 0},
    "grpo": {"weight_decay": 0.0, "mask_truncated_completions": False, "disable_dropout": True},
    "dpo": {"weight_decay": 0.0},
    "reward_model": {},
}
FIXED_WHY = {
    "save_strategy": "the final model only", "weight_decay": "the script's AdamW",
    "mask_truncated_completions": "a cut-off completion is trained on, with reward 0",
    "disable_dropout": "grpo.py trains in eval mode",
}
LOSS_AGG = {"seq-mean": "grpo", "token-mean": "dapo", "constant": "dr_grpo"}
DPO_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "length_norm": "sigmoid_norm"}
TRL_ADV_EPS = 1e-4  # TRL 1.16's GRPOTrainer: advantages / (std + 1e-4)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def lr_factor_fn(total: int, warmup: int, schedule: str = "linear", per: int = 1):
    """The scripts' schedule (harness.lr_factor: warm-up (k+1)/(w+1), then constant or linear decay)
    as a LambdaLR factor of the optimiser step s (from 0), with k = s // per the script's step
    (GRPO: `per` = μ optimiser steps per GRPO step; its schedule steps once per GRPO step)."""
    return lambda s: harness.lr_factor(s // per, warmup, total, schedule)


#####################################################################################################
#####  flags -> config fields
#####################################################################################################


def run_fields(a, script: str, world: int) -> dict:
    """output_dir, seed, device and precision: the same for every script."""
    check(a.save_every == 0 and a.save_total_limit is None and a.resume is None,
          "--save-every, --save-total-limit, --resume: to_trl saves the final model only, and TRL's "
          "checkpoints are its own (TRL: save_steps, save_total_limit, resume_from_checkpoint)")
    check(a.device is None or a.device in ("cpu", "cuda", "auto"),
          f"--device {a.device}: under TRL the launcher picks the GPUs; use CUDA_VISIBLE_DEVICES=N "
          "(or accelerate launch --gpu_ids) instead of cuda:N")
    check(world == 1 or a.out_dir is not None,
          f"--out-dir is required with {world} processes: every process must name the same run folder")
    device = harness.pick_device(a.device)  # checks that CUDA exists when asked for
    dtype = harness.pick_dtype(device, a.dtype)  # checks the name; auto → bf16 on a GPU that has it
    import torch
    out = a.out_dir or str(harness.default_run_dir(f"trl_{script}", a.seed))
    return {"output_dir": out, "seed": a.seed, "use_cpu": device.type == "cpu",
            "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
            # --gradient-checkpointing: off unless given (TRL turns it on by default); on, non-reentrant
            # torch.utils.checkpoint per decoder layer, as harness.gradient_checkpointing
            "activation_checkpointing": a.gradient_checkpointing,
            "activation_checkpointing_kwargs": {"use_reentrant": False} if a.gradient_checkpointing else None}


def per_device(total: int, world: int, flag: str) -> int:
    check(total % world == 0, f"{flag}: the batch of {total} does not split evenly over {world} processes")
    return total // world


def grpo_fields(a, world: int = 1) -> dict:
    """GRPOConfig fields from grpo.Args."""
    check(a.reward == "outcome", "--reward process: TRL's GRPOTrainer has no per-token (process) advantages; "
                                 "use --reward outcome")
    check(a.adv_eps == TRL_ADV_EPS, f"--adv-eps {a.adv_eps}: TRL divides by std + {TRL_ADV_EPS}, fixed; "
                                    f"use --adv-eps {TRL_ADV_EPS}")
    check(a.policy_loss != "cispo" or a.loss_agg in (None, "token-mean"),
          "--policy-loss cispo: TRL's loss_type=cispo is a token mean; drop --loss-agg (or give token-mean)")
    check(a.cispo_epsilon is None, f"--cispo-epsilon {a.cispo_epsilon}: TRL's CISPO has no lower bound")
    check(a.beta == 0 or a.kl_estimator == "k3", f"--kl-estimator {a.kl_estimator}: TRL's KL term is k3 only")
    check(not a.dynamic_sampling, "--dynamic-sampling: TRL's GRPOTrainer has no dynamic sampling")
    if a.ratio == "sequence":  # GSPO: its own clip range
        eps_low, eps_high = a.gspo_epsilon, a.gspo_epsilon_high
    elif a.policy_loss == "cispo":  # TRL clamps the weight at epsilon_high itself; grpo.py at 1 + ε_high
        eps_low, eps_high = a.epsilon, 1.0 + a.cispo_epsilon_high
    else:
        eps_low, eps_high = a.epsilon, a.epsilon_high
    B = a.prompts_per_step * a.group_size  # completions per GRPO step, over all processes
    local = per_device(B, world, "--prompts-per-step × --group-size")
    mb = min(a.micro_batch or local, local)  # as grpo.py: a micro-batch larger than the batch is the batch
    check(local % mb == 0, f"--micro-batch {a.micro_batch} must divide the {local} completions per process "
                           "(TRL accumulates equal micro-batches)")
    return {**run_fields(a, "grpo", world), **FIXED["all"], **FIXED["grpo"],
            "max_steps": a.steps * a.mu, "per_device_train_batch_size": mb,
            "gradient_accumulation_steps": local // mb, "num_generations": a.group_size,
            "max_completion_length": a.max_new_tokens, "temperature": a.temperature, "top_k": 0, "top_p": 1.0,
            "learning_rate": a.lr, "warmup_steps": a.warmup_steps * a.mu,
            "lr_scheduler_type": "linear" if a.lr_schedule == "linear" else "constant_with_warmup",
            "num_iterations": a.mu, "epsilon": eps_low, "epsilon_high": eps_high, "beta": a.beta,
            "use_bias_correction_kl": False,
            "loss_type": "cispo" if a.policy_loss == "cispo" else LOSS_AGG[a.loss_agg or "seq-mean"],
            "importance_sampling_level": a.ratio,
            # DAPO's overlong shaping as TRL's second reward function, weighted by c (see build_grpo)
            "reward_weights": [1.0, a.overlong_penalty] if a.overlong_buffer > 0 else None,
            "scale_rewards": "group" if a.scale_rewards else "none", "max_grad_norm": a.grad_clip,
            "logging_steps": a.log_every * a.mu}


def pref_steps(a, n_pairs: int) -> int:
    """dpo.py's and reward_model.py's step count: epochs × ⌈pairs / batch⌉, cut at --max-steps."""
    total = a.epochs * math.ceil(n_pairs / a.batch_size)
    return total if a.max_steps is None else min(total, a.max_steps)


def pref_fields(a, script: str, n_pairs: int, world: int) -> dict:
    local = per_device(a.batch_size, world, "--batch-size")
    mb = min(a.micro_batch or local, local)  # as the scripts: a micro-batch larger than the batch is the batch
    check(local % mb == 0, f"--micro-batch {a.micro_batch} must divide the {local} rows per process "
                           "(TRL accumulates equal micro-batches)")
    return {**run_fields(a, script, world), **FIXED["all"], **FIXED[script], "max_length": a.max_length,
            "num_train_epochs": a.epochs, "max_steps": pref_steps(a, n_pairs),
            "per_device_train_batch_size": mb, "gradient_accumulation_steps": local // mb,
            "learning_rate": a.lr, "warmup_steps": a.warmup_steps, "lr_scheduler_type": "linear",
            "max_grad_norm": a.grad_clip, "logging_steps": a.log_every}


def dpo_fields(a, n_pairs: int, world: int = 1) -> dict:
    """DPOConfig fields from dpo.Args."""
    check(a.loss_type != "reference_free", "--loss-type reference_free: TRL 1.16's DPOTrainer has no "
                                           "reference-free DPO")
    check(a.label_smoothing == 0, f"--label-smoothing {a.label_smoothing}: TRL 1.16's sigmoid loss ignores "
                                  "label_smoothing (cDPO), and its robust loss is another estimator")
    # dpo.py computes the reference log-probs once, before training; TRL does it too on one process,
    # but its cache of them is per process for an in-memory data set, so with several processes the
    # reference runs a forward pass every step (the same numbers, more compute)
    return {**pref_fields(a, "dpo", n_pairs, world), "beta": a.beta, "loss_type": [DPO_LOSS[a.loss_type]],
            "precompute_ref_log_probs": world == 1}


def reward_fields(a, n_pairs: int, world: int = 1) -> dict:
    """RewardConfig fields from reward_model.Args."""
    if a.normalize:
        warn("--normalize: TRL's RewardTrainer does not normalise, so the saved model outputs raw r_φ "
             "(training is the same); pass --no-normalize to silence")
    return {**pref_fields(a, "reward_model", n_pairs, world), "weight_decay": a.weight_decay,
            "center_rewards_coefficient": a.center_coef or None}


#####################################################################################################
#####  data, reward, model, evaluation
#####################################################################################################


def task_reward(tok, strict: bool):
    """tasks.score as a TRL reward function. TRL passes `completion_ids` cut just after the first
    EOS, so a completion finished iff its ids end in EOS, or in another of the model's stop tokens
    (`common.stop_ids`), where generate stopped. It is scored from those ids, as the scripts score
    theirs (a special token inside an answer is then wrong under strict scoring)."""
    stops = set(common.stop_ids(tok))

    def task_score(prompts, completions, completion_ids, answer, **kw):
        return [tasks.score(list(ids), ans, len(ids) > 0 and ids[-1] in stops, strict, tok)  # from the ids
                for ids, ans in zip(completion_ids, answer)]
    return task_score


def joined(prompt, completion):
    """TRL tokenizes prompt + completion as one string, the scripts tokenize them apart: a space
    keeps the two apart where neither side has one (tiny-pref's word tokenizer then gives the very
    ids the scripts score). Conversational rows pass unchanged."""
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        return completion
    return completion if prompt[-1:].isspace() or completion[:1].isspace() else " " + completion


def as_messages(text, role: str):
    """--chat-template on text rows: a string becomes one message of `role`, as the scripts' render_chat
    wraps it; a list of messages stays as it is (TRL renders both with the chat template)."""
    return [{"role": role, "content": text}] if isinstance(text, str) else text


def pair_rows(pairs: list[dict], margin: float = 0.0, chat_template: bool = False) -> list[dict]:
    """TRL's preference rows: text (joined, see `joined`), messages as they are, or with --chat-template
    text as one user and one assistant message."""
    if chat_template:
        pairs = [{"prompt": as_messages(p["prompt"], "user"), "chosen": as_messages(p["chosen"], "assistant"),
                  "rejected": as_messages(p["rejected"], "assistant")} for p in pairs]
    return [{"prompt": p["prompt"], "chosen": joined(p["prompt"], p["chosen"]),
             "rejected": joined(p["prompt"], p["rejected"]), **({"margin": margin} if margin > 0 else {})}
            for p in pairs]


def exact_schedule(trainer, lr: float, weight_decay: float, factor):
    """The scripts' optimiser and schedule on the built trainer: torch AdamW on every trainable
    parameter of trainer.model (every weight; with --lora-r the adapters, and reward_model.py's score
    head, once TRL has wrapped the model) and the LambdaLR. -> the trainer. Set before train(), they
    are the trainer's (HF builds its own only when none is set)."""
    import torch
    opt = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    trainer.optimizer, trainer.lr_scheduler = opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return trainer


def lora_config(a, script: str):
    """--lora-r R: harness.lora_config (the scripts' LoraConfig) as the trainer's peft_config;
    reward_model.py: task SEQ_CLS with modules_to_save=["score"], so that the adapters sit on the
    backbone and the score head is trained whole, as reward_model.py's head. None without --lora-r."""
    head = {"task_type": "SEQ_CLS", "modules_to_save": ["score"]} if script == "reward_model" else {}
    return harness.lora_config(a, **head)


def lora_text(cfg) -> str:
    """A LoraConfig as the fields that to_trl sets (the dry run, summary.json)."""
    if cfg is None:
        return "None"
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "modules_to_save")
    vals = {k: getattr(cfg, k) for k in keys}
    vals["target_modules"] = sorted(vals["target_modules"]) if isinstance(vals["target_modules"], (set, list)) \
        else vals["target_modules"]
    vals["task_type"] = getattr(vals["task_type"], "value", vals["task_type"])
    return "LoraConfig(" + ", ".join(f"{k}={v!r}" for k, v in vals.items()) + ")"


def make_trainer(cls, a, **kw):
    """cls(**kw), with a --lora-target-modules that names no module of the model as one line."""
    try:
        return cls(**kw)
    except ValueError as e:
        if a.lora_r and "arget modules" in str(e):
            raise UsageError(f"--lora-target-modules {a.lora_target_modules}: "
                             f"{str(e).strip().splitlines()[0]}") from None
        raise


def make_callback(evaluate, every: int, per: int, total: int, out: Path | None):
    """A TrainerCallback that runs the script's `evaluate(model, when) -> dict` (when: start, step,
    end) on the main process
    before training, every `every` script steps (= `per` optimiser steps each) and at the last,
    and writes it and TRL's own logs (as trl/...) to <out>/metrics.jsonl."""
    from transformers import TrainerCallback

    class ScriptEvaluation(TrainerCallback):
        log, last = None, {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.is_world_process_zero and out is not None:
                self.log = harness.RunLogger(out)
                self.last = evaluate(model, "start")
                self.log.log(0, self.last)

        def on_step_end(self, args, state, control, model=None, **kw):
            s = state.global_step
            if self.log is None or s % per:
                return
            k = s // per
            if k % every == 0 or k == total:
                self.last = evaluate(model, "end" if k == total else "step")
                self.log.log(k, self.last)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.log is not None and logs:
                self.log.log(state.global_step // per, {f"trl/{k}": v for k, v in logs.items()}, keys=[])

        def on_train_end(self, args, state, control, **kw):
            if self.log is not None:
                self.log.close()
                self.log = None
    return ScriptEvaluation()


def precision(model, dtype: str):
    return harness.MixedPrecision(next(model.parameters()).device, dtype)


def build_grpo(a, cfg, train_rows, heldout, callbacks=(), out: Path | None = None):
    """A GRPOTrainer on grpo.py's task (tasks.load_task's rows): its model, prompts, reward,
    optimiser and schedule."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    strict = tasks.task_scoring(a.task, a.data)  # as grpo.py: built-in tasks strictly, --data by its last number
    model, tok = common.load_model(a.model, torch.device("cpu"))  # the trainer moves it
    tasks.check_chat_template(tok, a.model, a.chat_template, train_rows + heldout)  # grpo.py's check

    def prompt(p):  # TRL's conversational prompt (messages, or with --chat-template a text as one), or text
        return as_messages(p, "user") if a.chat_template else p
    data = Dataset.from_list([{"prompt": prompt(r["prompt"]), "answer": r["answer"]} for r in train_rows])
    eval_rows = [{"prompt": tasks.chat_prompt(tok, r["prompt"], a.chat_template), "answer": r["answer"]}
                 for r in heldout[:a.eval_size]]  # as grpo.py evaluates: the text the template renders

    def evaluate(m, when):
        with precision(m, a.dtype).autocast():
            if a.task == "long-addition":  # as grpo.py: the accuracy, and the share worked out and each format's
                f = tasks.greedy_format_figures(m, tok, eval_rows, a.max_new_tokens, strict)
                res = {"eval/accuracy": f.pop("accuracy"), **{f"eval/{k}": v for k, v in f.items()}}
            else:
                res = {"eval/accuracy": tasks.greedy_accuracy(m, tok, eval_rows, a.max_new_tokens, strict)}
            if a.pass_at_k and when != "step":  # as grpo.py: before and after training
                res.update(tasks.pass_metrics(tasks.pass_at_k(m, tok, eval_rows, a.group_size,
                                                                a.max_new_tokens, strict, a.temperature)))
        return res
    cbs = list(callbacks) + ([make_callback(evaluate, a.eval_every, a.mu, a.steps, out)] if out else [])
    rewards = [task_reward(tok, strict)]
    if a.overlong_buffer > 0:  # r_i + c·R_length(y_i), as grpo.py's shaped reward
        from trl.rewards import get_soft_overlong_punishment
        rewards.append(get_soft_overlong_punishment(a.max_new_tokens, a.overlong_buffer))
    trainer = make_trainer(GRPOTrainer, a, model=model, reward_funcs=rewards, args=cfg, train_dataset=data,
                           processing_class=tok, callbacks=cbs, peft_config=lora_config(a, "grpo"))
    return exact_schedule(trainer, a.lr, 0.0, lr_factor_fn(a.steps, a.warmup_steps, a.lr_schedule, a.mu))


def build_dpo(a, cfg, train_pairs, heldout, out: Path | None = None):
    """A DPOTrainer on dpo.py's pairs, with dpo.py's optimiser, schedule and evaluation."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    import dpo
    model, tok = common.load_model(a.model, torch.device("cpu"))
    heldout = tasks.render_chat(tok, heldout[:a.eval_size], a.chat_template, a.model)  # as dpo.py evaluates
    average = a.loss_type in dpo.PER_TOKEN_AVERAGED
    prompts = [heldout[i % len(heldout)]["prompt"] for i in range(a.eval_samples)]
    gold, ref, ref_h = a.data is None, [], []

    def evaluate(m, when):
        device = next(m.parameters()).device
        if not ref:  # the frozen SFT policy, as dpo.py's π_ref, for the evaluation only
            ref.append(common.load_model(a.model, device, trainable=False)[0])
            with precision(m, a.dtype).autocast():
                ref_h.extend(dpo.all_pair_logps(ref[0], tok, heldout, device, average))
        with precision(m, a.dtype).autocast():
            pc, pr = dpo.all_pair_logps(m, tok, heldout, device, average)
            s = tasks.sample_and_score(m, ref[0], tok, prompts, a.max_new_tokens, a.seed + 1, gold)
        return {"eval/heldout_pair_accuracy": dpo.implicit_reward_accuracy(pc, pr, *ref_h, a.beta, a.loss_type),
                "eval/gold_reward": s["gold_reward"], "eval/kl_to_ref": s["kl_to_ref"],
                "eval/mean_length": s["mean_length"]}
    total = cfg.max_steps
    rows = pair_rows(train_pairs, 0.0, a.chat_template)
    trainer = make_trainer(DPOTrainer, a, model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                           processing_class=tok, peft_config=lora_config(a, "dpo"),
                           callbacks=[make_callback(evaluate, a.eval_every, 1, total, out)] if out else [])
    return exact_schedule(trainer, a.lr, 0.0, lr_factor_fn(total, a.warmup_steps))


def load_reward_backbone(name: str, seed: int):
    """(AutoModelForSequenceClassification with one label, tokenizer) from --model, float32."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(seed)  # the fresh score head
    path = common.resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {name}: could not load a model there ({first})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id  # HF reads the score at the last non-pad token
    return model, tok


def build_reward(a, cfg, train_pairs, heldout, out: Path | None = None):
    """A RewardTrainer on reward_model.py's pairs, with its optimiser, schedule and evaluation."""
    import numpy as np
    from datasets import Dataset
    from trl import RewardTrainer

    import reward_model as rm_lib
    model, tok = load_reward_backbone(a.model, a.seed)
    tok.padding_side = "left"
    chat = a.chat_template or isinstance(train_pairs[0]["prompt"], list)  # TRL renders the conversation
    heldout = tasks.render_chat(tok, heldout[:a.eval_size], a.chat_template, a.model)  # the evaluation's text
    rng = np.random.default_rng(a.seed)
    probe = [train_pairs[i] for i in rng.choice(len(train_pairs), min(len(train_pairs), len(heldout)), replace=False)]
    probe = tasks.render_chat(tok, probe, a.chat_template, a.model)
    # read where TRL trained it: after apply_chat_template's trailing tokens (reward_model.py does the same)
    suffix = tasks.chat_suffix(tok) if chat else None

    def evaluate(m, when):
        def rm(ids, mask):
            return m(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # [B]
        res = {}
        for name, pairs in (("train", probe), ("heldout", heldout)):
            with precision(m, a.dtype).autocast():
                r_c, r_r = rm_lib.score_pairs(rm, tok, pairs, next(m.parameters()).device, suffix=suffix)
            res[f"eval/{name}_accuracy"] = float(rm_lib.pair_accuracy(r_c, r_r))
        return res
    total = cfg.max_steps
    rows = pair_rows(train_pairs, a.margin, a.chat_template)
    trainer = make_trainer(RewardTrainer, a, model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                           processing_class=tok, peft_config=lora_config(a, "reward_model"),
                           callbacks=[make_callback(evaluate, a.eval_every, 1, total, out)] if out else [])
    return exact_schedule(trainer, a.lr, a.weight_decay, lr_factor_fn(total, a.warmup_steps))


#####################################################################################################
#####  the command line
#####################################################################################################


def script_name(arg: str) -> str:
    name = Path(arg).name.removesuffix(".py")
    check(name not in NO_TRAINER, NO_TRAINER.get(name, ""))
    check(name in SCRIPTS, f"{arg}: expected grpo.py, dpo.py or reward_model.py (to_trl maps those)")
    return name


def parse(name: str, argv: list[str]):
    """The script's Args from its own parser (its defaults, --help and errors), then its validate."""
    mod = importlib.import_module(name)
    a = harness.parse_args(mod.Args, argv, description=mod.__doc__)
    mod.validate(a)
    return mod, a


def config_fields(name: str, a, world: int = 1):
    """(the config's keyword arguments, (train, heldout) rows: tasks.load_task's or load_preferences')."""
    if name == "grpo":
        return grpo_fields(a, world), tasks.load_task(a.data, task=a.task)
    if name == "reward_model" and a.data is not None:  # reward_model.py reads rankings; TRL does not
        check(not any("completions" in r and "chosen" not in r for r in tasks.read_jsonl(a.data)),
              f"--data {a.data}: rows of 'completions' (K-wise rankings), which reward_model.py reads but "
              "TRL's RewardTrainer does not (it takes 'chosen' and 'rejected' pairs): run reward_model.py "
              "itself, or write the rankings as pairs")
    pairs = tasks.load_preferences(a.data)
    return (dpo_fields if name == "dpo" else reward_fields)(a, len(pairs[0]), world), pairs


def config_class(name: str):
    import trl
    return getattr(trl, SCRIPTS[name])


def run(argv: list[str], dry_run: bool = False) -> dict | None:
    """`to_trl.py [--dry-run] SCRIPT FLAGS`: build the config, then (unless dry_run) train with TRL."""
    check(len(argv) > 0, "give a script: grpo.py, dpo.py or reward_model.py (see --help)")
    name = script_name(argv[0])
    mod, a = parse(name, argv[1:])
    world = world_size()
    kw, rows = config_fields(name, a, world)  # data errors come before any run folder
    try:
        cfg = config_class(name)(**kw)
    except ValueError as e:  # TRL's own checks of the combination, e.g. batch sizes
        raise UsageError(f"{SCRIPTS[name]} refuses these flags: {str(e).strip().splitlines()[0]}") from None
    shown = {k: getattr(getattr(cfg, k), "value", getattr(cfg, k)) for k in kw}  # as TRL holds them
    if dry_run:
        print(f"{type(cfg).__name__}(\n" + "".join(f"    {k}={v!r},\n" for k, v in shown.items()) + ")")
        print(f"plus {TRAINERS[name]}(peft_config={lora_text(lora_config(a, name))})")
        print("plus optimizers=(torch AdamW, the script's exact LambdaLR schedule), and the script's "
              "evaluation as a callback")
        return None
    # TRL 1.16 itself still calls transformers' deprecated is_gradient_checkpointing, and (around its
    # generation, with --gradient-checkpointing) gradient_checkpointing_disable/_enable: not ours to fix
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    out = Path(cfg.output_dir) if rank0 else None  # only the main process writes there
    build = {"grpo": build_grpo, "dpo": build_dpo, "reward_model": build_reward}[name]
    trainer = build(a, cfg, *rows, out=out)  # model errors, too, come before the run folder
    harness.set_threads(a.threads, harness.pick_device(a.device), trainer.model)  # --threads, as the script
    if rank0:
        harness.prepare_run_dir(out, a.overwrite)
    import trl
    if out is not None:
        print(f"run folder: {out}  |  TRL {trl.__version__} {type(trainer).__name__}  |  {world} process(es)")
    trainer.train()
    if not rank0:
        return None
    model_dir = None
    if a.save_model:
        model_dir = str(out / "model")
        if a.lora_r and name == "reward_model":  # as reward_model.py: the adapters merged, the usual folder
            trainer.model.merge_and_unload().save_pretrained(model_dir)
            trainer.processing_class.save_pretrained(model_dir)
        else:  # with --lora-r the adapter as peft saves it, as grpo.py and dpo.py
            trainer.save_model(model_dir)
    final = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "last")), None)
    summary = {"script": f"to_trl {name}", "trl": trl.__version__, "trainer": type(trainer).__name__,
               "steps": trainer.state.global_step, "final": final.last if final else None,
               "model_dir": model_dir, "processes": world, "config": dataclasses.asdict(a),
               "trl_config": {k: v for k, v in shown.items()},
               "peft_config": lora_text(lora_config(a, name))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n=== TRL {type(trainer).__name__} summary ({out}): {json.dumps(summary['final'])}")
    return summary


def check_mapping() -> list[str]:
    """Problems between MAPPING and the installed TRL and scripts (empty: all good)."""
    import trl
    problems = []
    for name, cls_name in SCRIPTS.items():
        mod = importlib.import_module(name)
        cls = getattr(trl, cls_name, None)
        if cls is None:
            problems.append(f"trl has no {cls_name}")
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        ours = [f.name for f in dataclasses.fields(mod.Args)]
        rows = {r.flag: r for r in MAPPING[name]}
        problems += [f"{name}.py --{f.replace('_', '-')} has no row in to_trl.MAPPING" for f in ours if f not in rows]
        problems += [f"to_trl.MAPPING[{name!r}] maps --{f.replace('_', '-')}, which {name}.py no longer has"
                     for f in rows if f not in ours]
        named = {t for r in MAPPING[name] for t in r.trl if t not in TRAINER_ARGS} | set(FIXED["all"]) | set(FIXED[name])
        problems += [f"{cls_name} has no field {t!r} (renamed in TRL {trl.__version__}?)" for t in sorted(named - fields)]
        trainer_args = set(inspect.signature(getattr(trl, TRAINERS[name])).parameters)
        problems += [f"{TRAINERS[name]} has no argument {t!r} (renamed in TRL {trl.__version__}?)"
                     for t in sorted({t for r in MAPPING[name] for t in r.trl if t in TRAINER_ARGS} - trainer_args)]
        # the configs that the flags' choices build: each constructs, and sets only what the table names
        lora = ["--lora-r", "8", "--lora-target-modules", "q_proj,v_proj"] * bool(importlib.util.find_spec("peft"))
        variants = {"grpo": [[], ["--loss-agg", "token-mean"], ["--loss-agg", "constant", "--no-scale-rewards"],
                             ["--mu", "2", "--micro-batch", "32", "--lr-schedule", "constant"],
                             ["--gradient-checkpointing", *lora], ["--task", "long-addition", "--max-new-tokens", "40"]],
                    "dpo": [["--loss-type", t] for t in DPO_LOSS] + [["--gradient-checkpointing", *lora]],
                    "reward_model": [["--no-normalize", "--margin", "0.5", "--center-coef", "0.01"],
                                     ["--no-normalize", "--gradient-checkpointing", *lora]]}[name]
        for v in variants:
            a = harness.parse_args(mod.Args, v)
            kw, _ = config_fields(name, a)
            lora_config(a, name)  # the LoraConfig constructs (peft's own checks)
            extra = set(kw) - named - {"output_dir"}
            if extra:
                problems.append(f"{name}: fields set but not in the table: {sorted(extra)}")
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    cls(**kw)
            except Exception as e:  # noqa: BLE001 - any refusal of TRL's __post_init__ is the finding
                problems.append(f"{cls_name}({' '.join(v)}): {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            problems += [f"{cls_name}: {w.message}" for w in seen  # a field we set that is deprecated
                         if issubclass(w.category, (FutureWarning, DeprecationWarning))
                         and any(f"`{k}`" in str(w.message) for k in kw)]
    if hasattr(trl, "PPOTrainer") or (Path(trl.__file__).parent / "experimental" / "ppo").exists():
        problems.append(f"TRL {trl.__version__} has a PPOTrainer again: map ppo.py")
    return problems


def table() -> str:
    """The mapping as Markdown, one table per script (README-ready)."""
    kinds = {"field": "", "to_trl": "to_trl:", "error": "**error:**", "warning": "warning:"}
    md = []
    for name, cls_name in SCRIPTS.items():
        md += [f"`{name}.py` → TRL `{cls_name}`", "", "| flag | TRL | how |", "| --- | --- | --- |"]
        for r in MAPPING[name]:
            trl_ = ", ".join(f"`{t}`" for t in r.trl) or "—"
            md.append(f"| `--{r.flag.replace('_', '-')}` | {trl_} | {' '.join(x for x in (kinds[r.kind], r.note) if x)} |")
        fixed = {**FIXED["all"], **FIXED[name]}
        md += ["", "Always: " + "; ".join(f"`{k}={v!r}`" + (f" ({FIXED_WHY[k]})" if k in FIXED_WHY else "")
                                          for k, v in fixed.items()) + ".", ""]
    md.append(NO_TRAINER["ppo"] + ".")
    return "\n".join(md)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        if argv[0] == "--check":
            import trl
            problems = check_mapping()
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            if not problems:
                print(f"to_trl: the mapping of {', '.join(s + '.py' for s in SCRIPTS)} matches TRL {trl.__version__}")
            return 1 if problems else 0
        if argv[0] == "--table":
            print(table())
            return 0
        dry = argv[0] == "--dry-run"
        run(argv[1:] if dry else argv, dry_run=dry)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
