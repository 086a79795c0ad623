"""A Bradley–Terry reward model: learn a scalar r_φ(x, y) from noisy pairwise preferences.

Notes: `003_0bc5d2784dac14e1.txt`, "Training the reward model" and "Training objective";
`000_e75205f5b80b652d.txt`, the reward model loss L_RM(φ) of InstructGPT.

Annotators cannot say what a text is worth, but they can say which of two texts they prefer. The
Bradley–Terry model turns a difference of scalar rewards into that probability,
P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), and the reward model is logistic regression on the
difference of its two scores. The model is the language model itself (the SFT policy, as in
InstructGPT) with its LM head replaced by a linear head that outputs one number, read at the last
real token of prompt + completion (the EOS that ends the completion): with causal attention, that
is the only position that has seen the whole text. Chat-formatted rows are read where transformers
and TRL read them, after the template's trailing tokens (Qwen's "<|im_end|>\n": at the "\n").

    r_φ(x, y) = w · h_L(x, y)[last non-pad token] + b       h: the LM's final hidden states
    for epoch = 1 .. epochs:
        for each batch of pairs (x, y_w, y_l):
            L = mean[−log σ(r_φ(x,y_w) − r_φ(x,y_l) − m)] + c · mean[(r_φ(x,y_w) + r_φ(x,y_l))²]
                (a K-wise ranking y_1 ≻ … ≻ y_K: the mean over its C(K,2) pairs, as one batch element)
            φ ← φ − lr ∇_φ L                                                      (AdamW)
        every `eval_every` steps: pair accuracy on train and held-out pairs, beside the ceiling
    optionally: (μ, s) = mean and std of r_φ over completions sampled from the SFT policy,
                and the saved model outputs (r_φ − μ) / s

The built-in task (tasks.py, "the preference task") has a hidden gold reward, so the ceiling is
known: how often the gold reward agrees with the noisy labels. No model beats it on average.

The saved folder (`<out-dir>/model`) is the language model's `save_pretrained` folder plus
`reward_head.safetensors`; `tasks.load_reward_model(folder)` rebuilds the reward model (ppo.py uses it).
`models/tiny-pref-rm/` is such a folder: this script's defaults, run on the shipped `tiny-pref`.
The same folder also loads in transformers as a sequence classifier (TRL's reward-model format):
`AutoModelForSequenceClassification.from_pretrained(folder)` gives r_φ(x, y) − `config.reward_offset`
(see `tasks.save_reward_model`).

Run:
    python reward_model.py                            # the built-in task, `tiny-pref`, CPU, ~1 minute
    python reward_model.py --margin 0.5 --center-coef 0.01
    python reward_model.py --model Qwen/Qwen2.5-0.5B-Instruct --data pairs.jsonl --chat-template \\
        --batch-size 16 --micro-batch 2 --lr 1e-5 --epochs 1 --max-new-tokens 256   # one GPU, your pairs
    python reward_model.py --save-every 100 --out-dir runs/x  # a checkpoint every 100 steps; stopped by
    python reward_model.py --resume runs/x                    # Ctrl-C, it goes on from the last one
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

import common
import harness
import tasks
from common import check
from tasks import RewardModel, save_reward_model  # r_φ: the LM + a linear head read at the last real token


@dataclass
class Args:
    model: str = "tiny-pref"
    """--model NAME_OR_PATH: the backbone, usually the SFT policy (a Hugging Face causal LM folder
    or hub name, if cached), or `tiny-pref`, the embedded SFT policy of the built-in task (TRL: the
    model argument)"""
    data: Optional[str] = None
    """JSONL file of preference pairs {"prompt", "chosen", "rejected"} (text, or TRL's conversational
    lists of {"role", "content"} messages, with or without "prompt"), and/or K-wise rankings
    {"prompt", "completions": [best, ..., worst]} (the last fifth of the rows, at most 1,000, is held
    out); default: the built-in task's pairs, labelled by a hidden gold reward"""
    chat_template: bool = False
    """render text rows as a user message and an assistant reply with the tokenizer's chat template
    (for instruct models); rows of messages always use it. Such rows are read after the template's
    trailing tokens (Qwen: "<|im_end|>\n"), where transformers and TRL read them"""
    max_length: Optional[int] = 1024
    """drop the rows where prompt + completion + EOS (+ the chat template's trailing tokens) has more
    tokens than this, as TRL's reward trainer does (a cut sequence has no EOS to read the reward at);
    the run reports how many (TRL: max_length); none keeps every row"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the reward model; default
    runs/reward_model__s<seed>__<time> (TRL: output_dir)"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""
    seed: int = 1
    """seed of Python's random, numpy and torch (head init, data order, sampling) (TRL: seed)"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; default: CUDA when present, else the CPU"""
    threads: Optional[int] = None
    """torch's CPU threads; default: 1 for a model under 20M parameters, whose operations are too small
    to split (the threads only wait for each other, and for the cores when anything else runs), else
    torch's own choice (every core); recorded in summary.json; no effect on a GPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute dtype of the forward passes (autocast): auto (bfloat16 on a GPU that supports it,
    else float32), float32, bfloat16 or float16 (with loss scaling); the weights, head included,
    stay float32 (TRL: bf16 / fp16)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass instead of keeping them, in
    the reward model's LM: activation memory of one layer instead of all, for about one more forward
    pass per backward; the same gradients up to float rounding (TRL: gradient_checkpointing)"""

    epochs: int = 2
    """passes over the training pairs (InstructGPT trained its reward model for 1 epoch: more
    overfits) (TRL: num_train_epochs)"""
    batch_size: int = 32
    """preference rows per optimiser step (a pair is two sequences, a ranking K) (TRL:
    per_device_train_batch_size × gradient_accumulation_steps × GPUs)"""
    micro_batch: Optional[int] = None
    """preference rows per forward/backward pass (gradient accumulation), 1..batch_size; default: the
    whole batch. It changes no number but float rounding: a micro-batch of n rows out of B weighs
    its L_RM by n/B and its centering term by its pairs / the batch's N pairs, so the summed
    gradient is the batch mean's. The evaluation and the normalisation's scoring take passes of the
    same size (TRL: per_device_train_batch_size, with gradient_accumulation_steps)"""
    lr: float = 1e-3
    """peak learning rate of AdamW, for the backbone and the head (tiny-pref: 3e-4..3e-3; a 0.5B+
    model: ~1e-5) (TRL: learning_rate)"""
    max_steps: Optional[int] = None
    """stop after this many optimiser steps (for quick runs); default: epochs × pairs / batch size
    (TRL: max_steps)"""
    warmup_steps: int = 10
    """steps of linear learning-rate warm-up from 0; then linear decay to 0 at the last step (TRL:
    warmup_steps, lr_scheduler_type linear)"""
    weight_decay: float = 0.0
    """AdamW weight decay (TRL: weight_decay)"""
    margin: float = 0.0
    """m in −log σ(r_w − r_l − m): the chosen must win by at least m before the loss lets go
    (Llama 2 uses a margin that grows with the annotators' confidence); 0 is the notes' loss"""
    center_coef: float = 0.0
    """c, weight of the penalty c · mean((r_w + r_l)²) that keeps the rewards centred on 0
    (Eisenstein et al. 2023 use 0.01); 0 disables (TRL: center_rewards_coefficient)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 disables) (TRL: max_grad_norm)"""

    normalize: bool = True
    """after training, sample completions from the SFT policy and store the mean μ and std s of
    their rewards, so that the saved model outputs (r − μ) / s: mean 0, std 1 where PPO starts"""
    norm_samples: int = 1000
    """completions sampled from the SFT policy (the --model, before training) for the normalisation"""
    max_new_tokens: int = 20
    """token limit of those samples (20 fits the built-in task; ~256+ for a real model)"""

    eval_every: int = 50
    """steps between evaluations of train and held-out pair accuracy (TRL: eval_steps)"""
    eval_size: int = 1000
    """held-out pairs per evaluation (and as many training pairs, for the train accuracy)"""
    log_every: int = 25
    """steps between printed lines (every step is written to metrics.jsonl) (TRL: logging_steps)"""
    save_model: bool = True
    """save the reward model into <out-dir>/model (the LM's save_pretrained folder + reward_head.safetensors)"""
    save_every: int = 0
    """steps between checkpoints, <out-dir>/checkpoint-<step>/: the reward model (its LM by
    save_pretrained, and its head), the optimiser, the scheduler, the RNG states and the step, all
    that --resume needs to continue exactly; 0: none (TRL: save_steps)"""
    save_total_limit: Optional[int] = None
    """keep only the newest this many checkpoints; none: keep them all (TRL: save_total_limit)"""
    resume: Optional[str] = None
    """RUN_DIR: continue that run from its last checkpoint to its configured end, in its folder, with
    its saved config; other flags must be left out or equal the run's, except --device, --threads,
    --log-every, --save-every and --save-total-limit (TRL: resume_from_checkpoint)"""

    # LoRA (peft, optional: pip install peft)
    lora_r: int = 0
    """r, the rank of the LoRA adapters W + (α/r) B A on the base model's linear layers, the only weights
    trained (the base frozen, stored once); 0: no LoRA, every weight trained (typical 8..64; peft: 8, TRL's
    ModelConfig: 16); the scalar head is trained whole; <out-dir>/model is saved with the adapters merged
    into the weights, in the usual format (TRL: peft_config)"""
    lora_alpha: Optional[float] = None
    """α, the adapters' scale is α/r; default 2r, the ratio of TRL's ModelConfig (r 16, α 32): α/r = 2
    whatever r (peft's own default α = 8 gives 8/r)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (peft's default 0); only 0 is accepted: every forward pass here
    runs in eval mode, where dropout does nothing"""
    lora_target_modules: str = "all-linear"
    """the linear layers that get adapters: all-linear (peft: every linear layer but the LM head, as
    QLoRA does; peft's own default for Llama/Qwen is q_proj,v_proj only), or names, comma-separated
    (q_proj,k_proj,v_proj,o_proj)"""


#####################################################################################################
#####  the maths: the Bradley–Terry loss and pair accuracy (pure functions, no state, only torch)
#####################################################################################################


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The reward model's loss per pair (notes `003`, "Training objective"; InstructGPT's L_RM):

        L_RM = −log σ(r_φ(x, y_w) − r_φ(x, y_l) − m)

    r_chosen, r_rejected: [B], the rewards of y_w and y_l; margin m: a number or [B].  -> [B]
    m = 0 is the notes' loss. With m > 0 the loss keeps pushing until the chosen wins by m (Llama 2).
    Equal rewards and m = 0 give −log σ(0) = ln 2. ∂L/∂r_w = −σ(−(r_w − r_l − m)) = −∂L/∂r_l.
    Computed as softplus(−z) = log(1 + e^{−z}), which is exact for large |z| (−log σ(z) is not).
    """
    z = r_chosen - r_rejected - margin  # r_w − r_l − m   [B]
    return F.softplus(-z)  # −log σ(z)   [B]


def ranking_loss(rewards: torch.Tensor, margin: float = 0.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT's K-wise loss (notes `000`, the reward model loss; Ouyang et al. 2022, eq. 1):
    a labeller ranks K completions of one prompt, and the ranking counts as its C(K,2) pairs,

        L(x) = 1/C(K,2) · Σ_{i<j} −log σ(r_φ(x, y_i) − r_φ(x, y_j) − m)       y_1 ≻ y_2 ≻ … ≻ y_K

    one batch element per ranking (not C(K,2) separate pairs: InstructGPT found that shuffling the
    pairs of one ranking into different batches overfits, and one forward pass of K sequences is
    cheaper than C(K,2) of two). `rewards`: [B, K], each row in rank order, best first.  -> [B]
    `mask` [B, K] (1 = a real completion, as a prefix of each row) lets rankings of different K
    share a batch: row b averages over the pairs among its first K_b. K = 2 is `bradley_terry_loss`.
    """
    K = rewards.shape[1]
    w, l = torch.triu_indices(K, K, offset=1, device=rewards.device)  # every pair i < j: i wins   [C]
    losses = bradley_terry_loss(rewards[:, w], rewards[:, l], margin)  # −log σ(r_i − r_j − m)   [B, C]
    if mask is None:
        return losses.mean(1)  # 1/C(K,2) Σ_{i<j}   [B]
    return common.masked_mean(losses, mask[:, l].bool(), dim=1)  # pairs whose loser is real   [B]


def ranking_terms(rewards: torch.Tensor, valid: torch.Tensor, margin: float = 0.0):
    """The two terms of the loss of a batch of rankings, per element: L_RM per ranking (`ranking_loss`)
    and the rewards of its real pairs, row by row. rewards, valid: [B, K] (`ranking_rewards`).
    -> (L_RM [B], r_φ(x, y_w) [N], r_φ(x, y_l) [N]), N = Σ_b C(K_b, 2)."""
    K = rewards.shape[1]
    w, l = torch.triu_indices(K, K, offset=1, device=rewards.device)  # the pairs i ≻ j   [C]
    pair_ok = valid[:, l]  # [B, C]
    bt = ranking_loss(rewards, margin, None if bool(valid.all()) else valid)  # [B]
    return bt, rewards[:, w][pair_ok], rewards[:, l][pair_ok]  # [B], [N], [N]


def centering_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(r_w + r_l)² per pair, [B] -> [B]. The Bradley–Terry loss only sees differences, so the
    rewards can drift as a whole; a small weight on this keeps them near 0 (Eisenstein et al. 2023)."""
    return (r_chosen + r_rejected) ** 2  # [B]


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs that the rewards order like the label: 1[r_w > r_l] + ½·1[r_w = r_l],
    averaged over the pairs ([B], [B] -> scalar). A tie counts ½, as a coin flip would."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean()


def score_pairs(rm: RewardModel, tokenizer, pairs: list[dict], device, batch_size: int = 256,
                suffix: list[int] | None = None):
    """Rewards of every pair's chosen and rejected completion: two tensors [N] (no gradient).
    `suffix`: the chat template's trailing tokens, read after the EOS (`tasks.chat_suffix`)."""
    r_c, r_r = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            ids, mask, _, _ = common.encode_prompt_completion(
                tokenizer, [p["prompt"] for p in chunk] * 2,
                [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk], device)  # [2b, P+T]
            r = rm(*tasks.append_after_last(ids, mask, suffix, pad_id=tokenizer.pad_token_id))  # [2b]
            r_c.append(r[:len(chunk)])
            r_r.append(r[len(chunk):])
    return torch.cat(r_c), torch.cat(r_r)  # [N], [N]


#####################################################################################################
#####  the data: pairs are rankings of K = 2
#####################################################################################################


def ranked(row: dict) -> list[str]:
    """A row's completions in rank order, best first: a pair is the ranking [chosen, rejected]."""
    return row["completions"] if "completions" in row else [row["chosen"], row["rejected"]]


def ranking_pairs(rows: list[dict]) -> list[dict]:
    """Every ranking's C(K,2) pairs {"prompt", "chosen", "rejected"}, the better one as chosen
    (for the pair accuracy); a pair stays itself."""
    return [{"prompt": r["prompt"], "chosen": c[i], "rejected": c[j]}
            for r in rows for c in [ranked(r)] for i in range(len(c)) for j in range(i + 1, len(c))]


def ranking_rewards(rm: RewardModel, tokenizer, rows: list[dict], device,
                    suffix: list[int] | None = None):
    """r_φ of every completion of a batch of rankings, in one forward pass.  -> rewards [B, K],
    valid [B, K] (K = the longest ranking; each row's first K_b entries are real, the rest 0).
    The sequences go completion by completion (all first completions, then all second ones, ...),
    so a batch of pairs is the B chosen then the B rejected. Each is prompt + completion + EOS, then
    `suffix` (chat-formatted rows: the template's trailing tokens, `tasks.chat_suffix`), where the
    reward is read: the text `apply_chat_template` writes for the conversation, as TRL tokenizes it."""
    comps = [ranked(r) for r in rows]
    K = max(map(len, comps))
    slots = [(b, k) for k in range(K) for b, c in enumerate(comps) if k < len(c)]  # (row, rank)
    ids, mask, _, _ = common.encode_prompt_completion(
        tokenizer, [rows[b]["prompt"] for b, _ in slots], [comps[b][k] for b, k in slots], device)  # [N, L]
    r = rm(*tasks.append_after_last(ids, mask, suffix, pad_id=tokenizer.pad_token_id))  # [N], N = Σ_b K_b
    b_idx, k_idx = (torch.tensor(v, device=r.device) for v in zip(*slots))  # [N], [N]
    rewards = r.new_zeros(len(rows), K).index_put((b_idx, k_idx), r)  # [B, K]
    valid = torch.zeros(len(rows), K, dtype=torch.bool, device=r.device).index_put(
        (b_idx, k_idx), torch.ones_like(b_idx, dtype=torch.bool))  # [B, K]
    return rewards, valid


def drop_too_long(tokenizer, rows: list[dict], max_length: int | None,
                  extra: int = 0) -> tuple[list[dict], int]:
    """TRL's reward-trainer rule: keep a row only if every prompt + completion + EOS (+ `extra`
    tokens: the chat template's trailing ones) has at most `max_length` tokens (a cut sequence has no
    EOS for the reward to be read at); the prompt counts with BOS where the tokenizer adds one
    (`common.encode_prompts`). -> (kept, dropped)."""
    if max_length is None or not rows:
        return rows, 0
    def n_tokens(texts):
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    p_len = [len(ids) for ids in common.encode_prompts(tokenizer, [r["prompt"] for r in rows])]
    c_len = iter(n_tokens(c for r in rows for c in ranked(r)))
    kept = [r for r, p in zip(rows, p_len)
            if max(p + next(c_len) + 1 + extra for _ in ranked(r)) <= max_length]
    return kept, len(rows) - len(kept)


#####################################################################################################
#####  training
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
    check(args.grad_clip >= 0, f"--grad-clip must be ≥ 0 (got {args.grad_clip}; 0 disables it)")
    for name in ("epochs", "batch_size", "eval_every", "eval_size", "log_every", "max_new_tokens"):
        value = getattr(args, name)
        check(value >= 1, f"--{name.replace('_', '-')} must be ≥ 1 (got {value})")
    check(args.micro_batch is None or args.micro_batch >= 1, f"--micro-batch must be ≥ 1 (got {args.micro_batch})")
    check(args.micro_batch is None or args.micro_batch <= args.batch_size,
          f"--micro-batch {args.micro_batch} must be ≤ --batch-size {args.batch_size} (rows per forward pass)")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.margin >= 0, f"--margin must be ≥ 0 (got {args.margin}): the chosen must win by m")
    check(args.center_coef >= 0, f"--center-coef must be ≥ 0 (got {args.center_coef})")
    check(args.weight_decay >= 0, f"--weight-decay must be ≥ 0 (got {args.weight_decay})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.max_steps is None or args.max_steps >= 1, f"--max-steps must be ≥ 1 (got {args.max_steps})")
    check(args.max_length is None or args.max_length >= 2, f"--max-length must be ≥ 2 (got {args.max_length})")
    check(not args.normalize or args.norm_samples >= 2,
          f"--norm-samples must be ≥ 2 to estimate a std (got {args.norm_samples}), or pass --no-normalize")
    harness.check_lr(args.lr)
    harness.check_idle_flags(args, {"norm_samples": (args.normalize, "with --no-normalize")})


def train(args: Args) -> dict:
    args, ckpt = harness.resume_run(args)  # --resume RUN_DIR: the run's own config and last checkpoint
    validate(args)
    t_start = time.time()
    harness.seed_everything(args.seed)
    device = harness.pick_device(args.device)
    prec = harness.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    gold = args.data is None  # the hidden gold reward exists only for the built-in task

    ##### the model: the SFT policy's transformer and a fresh scalar head
    lm, tok, train_rows, heldout_rows, cuts, max_length, suffix = load_rows_and_model(args, device)
    # suffix: None for plain-text rows; chat-formatted rows are read after the template's trailing tokens
    harness.set_threads(args.threads, device, lm)  # CPU: 1 thread for a small model (see --threads)
    # the run folder is made only once the flags, the data and the model have all been accepted
    out = harness.prepare_run_dir(args.out_dir or harness.default_run_dir("reward_model", args.seed),
                                 args.overwrite, resume=ckpt)
    heldout = ranking_pairs(heldout_rows)[: args.eval_size]  # held-out pairs, a ranking as its C(K,2)
    rng = np.random.default_rng(args.seed)
    train_probe = ranking_pairs([train_rows[i] for i in rng.choice(  # the pairs of the train accuracy
        len(train_rows), min(len(train_rows), len(heldout)), replace=False)])[: len(heldout)]
    lm = harness.apply_lora(lm, args)  # --lora-r: adapters on the frozen LM; the head below is trained whole
    rm = RewardModel(harness.unwrap(lm))
    rm.eval()  # no dropout: a pair's two rewards come from the same function
    harness.gradient_checkpointing(lm, args.gradient_checkpointing)  # --gradient-checkpointing
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    batches = [(epoch, order[i:i + args.batch_size]) for epoch in range(args.epochs)
               for order in [rng.permutation(len(train_rows))]
               for i in range(0, len(order), args.batch_size)][: args.max_steps]  # (epoch, pair indices)
    total_steps = len(batches)
    sched = harness.lr_scheduler(opt, args.warmup_steps, total_steps, "linear")  # warm-up, then linear to 0

    ##### completions from the SFT policy for the normalisation, sampled now, before training
    norm_prompts, norm_texts = [], []
    if args.normalize:
        picks = rng.integers(len(train_rows), size=args.norm_samples)
        norm_prompts = [train_rows[i]["prompt"] for i in picks]
        print(f"sampling {len(norm_prompts)} completions of --model for the normalisation …", flush=True)
        for i in range(0, len(norm_prompts), 256):
            with prec.autocast():
                *_, texts, _ = common.generate_text(lm, tok, norm_prompts[i:i + 256], args.max_new_tokens)
            norm_texts += texts  # an empty text is scored as just its EOS
    load_seconds = time.time() - t_start

    log = harness.RunLogger(out, total_steps=total_steps)
    ceiling = tasks.ceiling_accuracy(heldout) if gold else None
    train_ceiling = tasks.ceiling_accuracy(train_probe) if gold else None
    print_header(out, device, prec, args, rm, len(train_rows), len(heldout), cuts, max_length, tok, suffix)
    evaluate = evaluator(rm, tok, train_probe, heldout, device, prec, suffix, args.micro_batch or 256)
    if ckpt is None:  # the start model, at step 0
        start = evaluate_start(evaluate, log, ceiling, gold)
        ev, step = start, 0
    else:  # --resume: the trained weights, the figures of the run so far, the state at the checkpoint's end
        start, ev, step = resume(ckpt, rm, lm, opt, sched, prec)

    t_train = time.time()
    for step, (epoch, idx) in enumerate(batches[step:], step + 1):
        t0 = time.time()
        batch = [train_rows[j] for j in idx]
        B, mb = len(batch), args.micro_batch or len(batch)  # rows per forward/backward pass (--micro-batch)
        N = len(ranking_pairs(batch))  # the batch's pairs, C(K_b, 2) per ranking
        opt.zero_grad(set_to_none=True)
        parts = []  # per micro-batch, detached: L_RM per ranking [b], r_φ(x, y_w) and r_φ(x, y_l) per pair [n]
        for i in range(0, B, mb):  # gradient accumulation: each mean gets the micro-batch's share of it
            with prec.autocast():
                rewards, valid = ranking_rewards(rm, tok, batch[i:i + mb], device, suffix)  # r_φ(x, y_k)  [b, K]
            bt_b, rc_b, rr_b = ranking_terms(rewards, valid, args.margin)  # [b], [n], [n]
            loss = bt_b.mean() * (len(bt_b) / B)  # L_RM, a mean over the B rankings: this one's share b/B
            if args.center_coef > 0:  # + c · center, a mean over the batch's N pairs: this one's share n/N
                loss = loss + args.center_coef * centering_penalty(rc_b, rr_b).mean() * (len(rc_b) / N)
            prec.backward(loss)
            parts.append((bt_b.detach(), rc_b.detach(), rr_b.detach()))
        bt_rows, r_c, r_r = (torch.cat(t) for t in zip(*parts))  # the whole batch's   [B], [N], [N]
        bt = bt_rows.mean()  # L_RM = mean over rankings of the mean over its pairs of −log σ(r_w − r_l − m)
        center = centering_penalty(r_c, r_r).mean()  # mean over pairs of (r_w + r_l)²
        loss = bt + args.center_coef * center if args.center_coef > 0 else bt  # L = L_RM + c · center
        prec.unscale_(opt)  # float16 only: .grad back to the true gradient, before clipping
        grad_norm = common.clip_grad_norm(rm.parameters(), args.grad_clip)  # ‖g‖; g ← g·min(1, c/‖g‖)
        prec.step(opt)  # AdamW: φ ← φ − lr·Adam(g)
        sched.step()

        metrics = {
            "loss/bt": bt.item(),
            "loss/center": center.item(),
            "loss/total": loss.item(),
            "rewards/chosen": r_c.mean().item(),
            "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(),
            "rewards/accuracies": float(pair_accuracy(r_c.detach(), r_r.detach())),
            "rm/grad_norm": float(grad_norm),
            "charts/lr": opt.param_groups[0]["lr"],
            "charts/epoch": epoch + 1,
            "time/step_seconds": time.time() - t0,
        }
        if step % args.eval_every == 0 or step == total_steps:
            ev = evaluate()
            metrics.update(ev)
        keys = ["loss/bt", "rewards/margins", "rewards/accuracies", "eval/train_accuracy",
                "eval/heldout_accuracy"]
        log.log(step, metrics, keys if (step % args.log_every == 0 or step == total_steps
                                        or "eval/heldout_accuracy" in metrics) else [])
        if args.save_every and step % args.save_every == 0:  ##### --save-every: what step + 1 needs
            harness.save_checkpoint(out, step, args, {"model": lm, "reward_head": rm.head}, {
                **harness.training_state(opt, sched, prec), "start": start, "ev": ev}, tok)
    train_seconds = time.time() - t_train

    ##### normalise over the SFT samples: (μ, s) = mean and std of r_φ, then r ← (r − μ) / s
    norm = {}
    if args.normalize:
        with torch.no_grad(), prec.autocast():
            raw = []
            # sequences per pass: with --micro-batch, a training pass's (its pairs' two sequences each)
            b = 2 * args.micro_batch if args.micro_batch else 256
            for i in range(0, len(norm_texts), b):
                ids, mask, _, _ = common.encode_prompt_completion(tok, norm_prompts[i:i + b],
                                                                  norm_texts[i:i + b], device)  # [b, L]
                raw.append(rm(*tasks.append_after_last(ids, mask, suffix, pad_id=tok.pad_token_id)))  # [b]
            raw = torch.cat(raw)  # r_φ of the SFT samples   [N]
        rm.reward_mean.fill_(raw.mean().item())  # μ
        rm.reward_std.fill_(raw.std().clamp(min=1e-6).item())  # s (Bessel-corrected)
        norm = {"reward_mean": rm.reward_mean.item(), "reward_std": rm.reward_std.item()}
        if gold:  # how well the learned reward tracks the gold reward where PPO will start
            g = torch.tensor([tasks.gold_reward(t) for t in norm_texts])  # [N]
            norm["gold_correlation"] = float(torch.corrcoef(torch.stack([raw.cpu(), g]))[0, 1])

    ##### save and summarise (--lora-r: the adapters merged into the LM's weights, so the folder is the usual one)
    harness.merge_lora(lm)
    model_dir = (str(save_reward_model(rm, tok, out / "model", chat=suffix is not None)) if args.save_model
                 else None)
    return summarise(log, out, args, start, ev, ceiling, train_ceiling, len(heldout), train_rows, cuts, norm,
                     len(norm_texts), step, model_dir, gold, device, t_start, train_seconds, load_seconds)


#####################################################################################################
#####  bookkeeping: the model and data, evaluation, resume, the summary
#####################################################################################################


def load_rows_and_model(args: Args, device):
    """The preference rows (pairs and/or rankings), rendered with the chat template, without those
    longer than --max-length (capped at the model's context), and the SFT policy's LM (float32
    weights). -> (lm, tok, train rows, held-out rows, {"train": dropped, "heldout": dropped},
    the --max-length in force, suffix): suffix is None for plain-text rows, and for chat-formatted
    ones the template's trailing tokens (`tasks.chat_suffix`)"""
    train_rows, heldout_rows = tasks.load_preferences(args.data, rankings=True)  # pairs and/or rankings
    print(f"loading --model {args.model} …", flush=True)
    lm, tok = common.load_model(common.resolve_model_path(args.model), device)  # float32 weights
    max_length = tasks.cap_max_length(args.max_length, lm)  # --max-length ≤ the model's positions
    chat = args.chat_template or isinstance(train_rows[0]["prompt"], list)  # one file: text, or messages
    # rows of messages (or, with --chat-template, of text) -> text, by the tokenizer's chat template
    train_rows, heldout_rows = (tasks.render_chat(tok, rows, args.chat_template, args.model)
                                for rows in (train_rows, heldout_rows))
    suffix = tasks.chat_suffix(tok) if chat else None
    (train_rows, cut_train), (heldout_rows, cut_heldout) = (
        drop_too_long(tok, rows, max_length, len(suffix or [])) for rows in (train_rows, heldout_rows))
    check(train_rows and heldout_rows, f"--max-length {max_length}: no training or no held-out row is "
          "that short; raise it (or pass --max-length none)")
    if args.normalize:  # the SFT samples of the normalisation: --max-new-tokens after train prompts
        tasks.check_context(tok, lm, [r["prompt"] for r in train_rows], args.max_new_tokens)
    return (lm, tok, train_rows, heldout_rows, {"train": cut_train, "heldout": cut_heldout}, max_length,
            suffix)


def print_header(out, device, prec, args: Args, rm, n_train: int, n_heldout: int, cuts: dict,
                 max_length: int | None, tok=None, suffix: list[int] | None = None) -> None:
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} "
          f"({sum(p.numel() for p in rm.parameters()) / 1e6:.2f}M parameters)  |  "
          f"{n_train} train rows, {n_heldout} held-out pairs")
    if max_length is not None:
        print(f"--max-length {max_length}: dropped {cuts['train']} train and {cuts['heldout']} held-out "
              "rows with a longer prompt + completion + EOS (TRL's reward trainer drops them too)")
    if suffix:
        print(f"chat-formatted rows: the reward is read after the EOS and the template's trailing tokens "
              f"{tok.decode(suffix)!r}, where transformers and TRL read it")


def evaluator(rm, tok, train_probe: list[dict], heldout: list[dict], device, prec,
              suffix: list[int] | None = None, per_pass: int = 256):
    """A closure: the pair accuracy of r_φ on a sample of the training pairs and on the held-out pairs,
    `per_pass` pairs per forward pass."""
    def evaluate() -> dict:
        m = {}
        for name, pairs in (("train", train_probe), ("heldout", heldout)):
            with prec.autocast():
                r_c, r_r = score_pairs(rm, tok, pairs, device, per_pass, suffix=suffix)  # [N], [N]
            m[f"eval/{name}_accuracy"] = float(pair_accuracy(r_c, r_r))
        return m
    return evaluate


def evaluate_start(evaluate, log, ceiling, gold: bool) -> dict:
    """The start model's figures, logged at step 0 and printed."""
    start = evaluate()
    log.log(0, {**start, "eval/ceiling_accuracy": ceiling})
    print(f"held-out pair accuracy before training: {start['eval/heldout_accuracy']:.3f}"
          + (f"  (ceiling {ceiling:.3f})" if gold else ""))
    return start


def resume(ckpt, rm, lm, opt, sched, prec) -> tuple:
    """--resume: the trained weights and the state at the end of the checkpoint's step (the global RNGs
    last). The SFT samples for the normalisation were drawn again, from the untrained LM; the data
    order is `batches`, drawn again from --seed: the run goes on at batch ckpt.step + 1.
    -> the figures of the run so far: (start, ev, step)."""
    harness.load_weights(lm, ckpt.path / "model")  # rm.lm, or (--lora-r) its adapters
    harness.load_weights(rm.head, ckpt.path / "reward_head.pt")
    start, ev, step = ckpt.state["start"], ckpt.state["ev"], ckpt.step
    harness.restore_training_state(ckpt.state, opt, sched, prec)
    return start, ev, step


def summarise(log, out, args: Args, start: dict, ev: dict, ceiling, train_ceiling, n_heldout: int,
              train_rows: list[dict], cuts: dict, norm: dict, n_norm: int, step: int, model_dir, gold: bool,
              device, t_start: float, train_seconds: float, load_seconds: float) -> dict:
    """summary.json, and the printed summary."""
    summary = log.summary({
        "script": "reward_model",
        "start_heldout_accuracy": start["eval/heldout_accuracy"],
        "heldout_accuracy": ev["eval/heldout_accuracy"],
        "train_accuracy": ev["eval/train_accuracy"],
        "ceiling_accuracy": ceiling,
        "train_ceiling_accuracy": train_ceiling,
        "heldout_pairs": n_heldout,
        "train_pairs": sum(len(ranked(r)) * (len(ranked(r)) - 1) // 2 for r in train_rows),  # C(K,2) each
        "train_rows": len(train_rows),
        "max_length_dropped_rows": cuts,
        **norm,
        "steps": step,
        "model_dir": model_dir,
        **harness.run_facts(args, device, t_start, train_seconds, load_seconds),
    })
    log.close()
    print(f"\n=== reward model summary ({out})")
    print(f"pair accuracy   train {ev['eval/train_accuracy']:.3f}"
          + (f" (ceiling {train_ceiling:.3f})" if gold else "")
          + f"   held-out {ev['eval/heldout_accuracy']:.3f}" + (f" (ceiling {ceiling:.3f})" if gold else "")
          + f"   in {step} steps, {summary['wall_seconds']:.0f}s wall")
    if norm:
        print(f"normalised over {n_norm} SFT samples: μ {norm['reward_mean']:+.3f}, "
              f"s {norm['reward_std']:.3f}"
              + (f"; correlation with the gold reward {norm['gold_correlation']:.3f}" if gold else ""))
    return summary


if __name__ == "__main__":
    harness.main(Args, train, __doc__)
