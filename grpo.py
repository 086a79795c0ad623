"""GRPO: Group Relative Policy Optimization for RL with verifiable rewards (RLVR), and Dr. GRPO.

Notes: `000_e75205f5b80b652d.txt`, "Group Relative Policy Optimization" and "GRPO Done Right";
`003_0bc5d2784dac14e1.txt`, the end part on GRPO ("start with PPO, replace GAE with the z-score
within the group").

State s_t = the prompt x and the tokens generated so far y_<t; action a_t = the next token y_t.
There is no value network: the advantage of every token of completion y_i is its reward relative
to the other completions of the same prompt.

    for step = 1 .. steps:
        draw `prompts_per_step` prompts x from the train split
        π_old ← π_θ;  sample G completions y_1..y_G ~ π_old(·|x) for every x          (KV cache)
        r_i = reward(x, y_i)                    (1 if the answer is exactly right, else 0)
        Â_{i,t} = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + eps)                       (outcome)
            or  Σ_{steps j ending at or after t} r̃_j, with r̃ the group-normalised step rewards
                                                                                        (process)
        cache log π_old(y_t|·) and, if β > 0, log π_ref(y_t|·)
        repeat μ times:                                             (μ inner iterations)
            ρ_t = π_θ(y_t|·) / π_old(y_t|·)
            L = −1/G Σ_i 1/|y_i| Σ_t { min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε_high) Â_t) − β D_KL,t }
            θ ← θ − lr ∇_θ L                                                      (AdamW)
        every `eval_every` steps: held-out greedy accuracy

Dr. GRPO = `--loss-agg constant --no-scale-rewards`: no 1/|y| (divide by the constant
`max_new_tokens` instead) and no division by the group's std.

Run:
    python grpo.py                                  # embedded `tiny` model, arithmetic, CPU, minutes
    python grpo.py --loss-agg constant --no-scale-rewards     # Dr. GRPO
    python grpo.py --reward process                 # process supervision, one reward per digit
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --chat-template \\
        --max-new-tokens 256 --prompts-per-step 8 --group-size 8 --lr 1e-6 --beta 0.04  # one GPU
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

import common
from common import check, masked_mean, masked_sum


@dataclass
class Args:
    model: str = "tiny"
    """--model NAME_OR_PATH: a Hugging Face causal LM folder (or hub name, if cached), or `tiny`,
    the embedded default (the folder models/tiny)"""
    data: Optional[str] = None
    """JSONL file with {"prompt", "answer"} lines, or GSM8K as published ({"question", "answer":
    "<solution> #### 72"}: the number after ####), scored by the last number
    in the completion; default: the built-in arithmetic task, scored strictly"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (for instruct models)"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the final model; default runs/grpo__s<seed>__<time>"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""
    seed: int = 1
    """seed of Python's random, numpy and torch (sampling included)"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; default: CUDA when present, else the CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute dtype of the forward passes (autocast): auto (bfloat16 on a GPU that supports it,
    else float32), float32, bfloat16 or float16 (with loss scaling); every model's weights stay
    float32, the frozen ones too, so that π_θ = π_ref exactly at step 0"""

    steps: int = 2000
    """number of GRPO steps (each: generate, score, μ optimiser steps)"""
    prompts_per_step: int = 16
    """prompts x per step; the batch holds prompts_per_step × G completions"""
    group_size: int = 8
    """G, completions sampled per prompt; ≥ 2 (the notes: 'a few responses'; DeepSeekMath used 64)"""
    max_new_tokens: int = 4
    """completion token limit (4 fits a 3-digit sum and EOS; ~256+ for GSM8K); also the Dr. GRPO constant"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken of the same tempered distribution"""
    lr: float = 3e-4
    """peak learning rate of AdamW (tiny: 3e-4; 1e-3 first drops its accuracy, or collapses it
    into completions that never end; a 0.5B model: ~1e-6)"""
    warmup_steps: int = 20
    """steps of linear learning-rate warm-up from 0 (Adam's first steps are sign-like and large)"""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """after warm-up: keep the rate (constant) or decay it linearly to 0 at the last step
    (linear, the shape of TRL's default schedule; HF's version starts its warm-up at 0, this one
    at lr/(warmup+1))"""
    mu: int = 1
    """μ, inner optimiser steps on each batch, reusing the cached π_old log-probs (GRPO paper: 1)"""
    epsilon: float = 0.2
    """ε, the clip range: ρ is clipped to [1−ε, 1+ε_high] (usually 0.1..0.3)"""
    epsilon_high: Optional[float] = None
    """ε_high, a separate upper clip bound (DAPO's clip-higher, e.g. 0.28); default: ε"""
    beta: float = 0.0
    """β, weight of the k3 KL to the frozen reference inside the loss (DeepSeekMath: 0.04); 0 skips
    the reference model entirely"""
    loss_agg: Literal["seq-mean", "token-mean", "constant"] = "seq-mean"
    """seq-mean: the notes' GRPO, 1/|y| inside, mean over sequences; token-mean: Σ over all tokens /
    number of tokens (DAPO); constant: Σ / (B · max_new_tokens) (Dr. GRPO)"""
    scale_rewards: bool = True
    """divide the group-centred reward by the group's std (GRPO); --no-scale-rewards for Dr. GRPO"""
    adv_eps: float = 1e-4
    """eps in Â = (r − mean) / (std + eps): keeps an all-equal group at exactly 0 advantage"""
    reward: Literal["outcome", "process"] = "outcome"
    """outcome: one reward per completion; process: one reward per answer digit (built-in task only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 disables)"""
    micro_batch: Optional[int] = None
    """completions per forward/backward pass (gradient accumulation); default: the whole batch"""

    eval_every: int = 100
    """steps between held-out greedy evaluations"""
    eval_size: int = 500
    """held-out prompts per evaluation"""
    pass_at_k: bool = True
    """before and after training, also measure pass@1 and pass@k on the held-out prompts, with k = G
    samples per prompt at --temperature: what sampling can reach, which RL can then reinforce"""
    log_every: int = 50
    """steps between printed lines (every step is written to metrics.jsonl)"""
    save_model: bool = True
    """save the final policy with save_pretrained into <out-dir>/model"""


#####################################################################################################
#####  the maths: advantages and the loss (pure functions, no state, only torch)
#####################################################################################################


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Outcome-supervision advantage, one value per completion (every token of y_i shares it).

    rewards: [B] with B = n_prompts × G, the G completions of a prompt consecutive.  -> [B]
        GRPO:     Â_i = (r_i − mean(r)) / (std(r) + eps)
        Dr. GRPO: Â_i =  r_i − mean(r)                          (scale_std=False)
    std is the Bessel-corrected sample std (÷ (G−1)), as `torch.std` and TRL's GRPOTrainer compute
    it; the population std (÷ G) would give larger |Â| for small G. An all-equal group gives
    exactly 0 (0 / eps), never NaN.
    """
    r = rewards.view(-1, group_size)  # [n, G]
    centred = r - r.mean(dim=1, keepdim=True)  # r − mean   [n, G]
    if scale_std:
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)  # ÷ (std + eps)
    return centred.reshape(-1)  # [B]


def process_advantages(step_rewards: torch.Tensor, step_mask: torch.Tensor, group_size: int,
                       scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Process-supervision advantage (DeepSeekMath §4.1.3), per token.

    step_rewards, step_mask: [B, T]. A step's reward sits at the token that ends the step, and
    step_mask marks those tokens. A completion may have any number of steps.  -> [B, T]
        r̃_j   = (r_j − mean(R)) / (std(R) + eps), R = every step reward of the G completions
        Â_t   = Σ_{j : end(j) ≥ t} r̃_j         (the normalised rewards of this and later steps)
    std is Bessel-corrected, as in `group_advantages`; scale_std=False only centres (Dr. GRPO).
    """
    B, T = step_rewards.shape
    r = step_rewards.view(-1, group_size * T)  # [n, G·T]  all steps of a group together
    m = step_mask.view(-1, group_size * T).bool()  # [n, G·T]
    count = m.sum(dim=1, keepdim=True)  # [n, 1] steps in the group
    mean = masked_sum(r, m, dim=1).unsqueeze(1) / count.clamp(min=1)  # [n, 1]
    norm = r - mean  # r − mean(R)  [n, G·T]
    if scale_std:
        var = masked_sum((r - mean) ** 2, m, dim=1).unsqueeze(1) / (count - 1).clamp(min=1)  # [n, 1]
        norm = norm / (var.sqrt() + eps)  # r̃ = (r − mean) / (std + eps)   [n, G·T]
    norm = torch.where(m, norm, torch.zeros_like(norm)).view(B, T)  # [B, T], 0 where no step ends
    return norm.flip(-1).cumsum(-1).flip(-1)  # Â_t = Σ_{j ≥ t} r̃_j   [B, T]


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate of D_KL(π_θ || π_ref), the 'k3' estimator (Schulman, 2020), as in
    DeepSeekMath's GRPO:  π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1.
    Unbiased under y ~ π_θ, and never negative (e^x ≥ 1 + x).  [B, T] -> [B, T]
    Computed as expm1(x) − x, the same function: exp(x) − x − 1 in float32 cancels when π_θ ≈ π_ref
    and can come out slightly negative (−6e-8), while expm1(x) − x stays ≥ 0 and accurate."""
    log_ratio = ref_logp - logp  # x = log(π_ref / π_θ)   [B, T]
    return torch.expm1(log_ratio) - log_ratio  # e^x − 1 − x   [B, T]


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              epsilon: float = 0.2, epsilon_high: float | None = None, loss_agg: str = "seq-mean",
              max_len: int | None = None):
    """The GRPO loss (to minimise: the notes' objective with its sign flipped).

    logp, old_logp, ref_logp: [B, T]   log π_θ, log π_old, log π_ref of each completion token
    advantages: [B] (one per completion) or [B, T] (per token, process supervision)
    mask: [B, T]  1 on completion tokens up to and including the first EOS
        ρ_t    = exp(log π_θ − log π_old)
        ℓ_t    = min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε_high) Â_t) − β D_KL,t        (D_KL,t: k3)
        loss_agg="seq-mean"  : L = −1/B Σ_i 1/|y_i| Σ_t ℓ_t        (the notes' GRPO)
        loss_agg="token-mean": L = −Σ_i Σ_t ℓ_t / Σ_i |y_i|        (DAPO)
        loss_agg="constant"  : L = −1/B Σ_i Σ_t ℓ_t / max_len      (Dr. GRPO; max_len defaults to T)
    Returns (loss, metrics) with detached scalar metrics: kl, clip fractions, ratio statistics.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1], broadcast over tokens
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)  # ρ_t   [B, T]
    surr1 = ratio * advantages  # ρ Â   [B, T]
    surr2 = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * advantages  # clip(ρ, 1−ε, 1+ε_high) Â
    per_token = torch.min(surr1, surr2)  # ℓ_t before the KL   [B, T]
    kl = None
    if ref_logp is not None and beta != 0.0:
        kl = k3_kl(logp, ref_logp)  # D_KL,t   [B, T]
        per_token = per_token - beta * kl  # ℓ_t   [B, T]

    if loss_agg == "seq-mean":
        per_seq = masked_sum(per_token, mask, dim=1) / mask.sum(dim=1).clamp(min=1)  # 1/|y| Σ_t  [B]
        loss = -per_seq.mean()
    elif loss_agg == "token-mean":
        loss = -masked_sum(per_token, mask) / mask.sum().clamp(min=1)
    elif loss_agg == "constant":
        L = mask.shape[1] if max_len is None else max_len
        loss = -masked_sum(per_token, mask) / (mask.shape[0] * L)
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}: expected seq-mean, token-mean or constant")

    with torch.no_grad():
        adv = advantages.expand_as(ratio)
        low = (ratio < 1 - epsilon) & (adv < 0)  # clipping binds below: gradient is 0 there
        high = (ratio > 1 + eps_high) & (adv > 0)  # clipping binds above
        metrics = {
            "clip_frac": masked_mean((low | high).float(), mask),
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "kl": masked_mean(kl, mask) if kl is not None else torch.zeros(()),
        }
    return loss, metrics


#####################################################################################################
#####  training
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
    check(args.group_size >= 2, f"--group-size must be ≥ 2 (got {args.group_size}): the advantage "
                                "compares a completion with the others of its group")
    check(args.epsilon > 0, f"--epsilon must be > 0 (got {args.epsilon})")
    check(args.epsilon_high is None or args.epsilon_high > 0,
          f"--epsilon-high must be > 0 (got {args.epsilon_high})")
    check(args.beta >= 0, f"--beta must be ≥ 0 (got {args.beta}): it weights a KL penalty")
    check(args.loss_agg in ("seq-mean", "token-mean", "constant"),
          f"--loss-agg {args.loss_agg!r}: expected seq-mean, token-mean or constant")
    check(args.reward in ("outcome", "process"), f"--reward {args.reward!r}: expected outcome or process")
    check(args.reward == "outcome" or args.data is None,
          "--reward process needs per-step rewards, which only the built-in arithmetic task defines "
          "(drop --data, or use --reward outcome)")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "eval_every", "eval_size",
                 "log_every"):
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(args, name)})")
    check(args.temperature > 0, f"--temperature must be > 0 (got {args.temperature})")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.adv_eps > 0, f"--adv-eps must be > 0 (got {args.adv_eps})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.micro_batch is None or args.micro_batch >= 1, "--micro-batch must be ≥ 1")


def train(args: Args) -> dict:
    validate(args)
    t_start = time.time()
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    prec = common.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    train_rows, heldout = common.load_task(args.data)
    heldout = heldout[: args.eval_size]
    strict = args.data is None  # the built-in task is scored strictly, a --data file by its last number

    ##### models: the policy π_θ, and the frozen reference π_ref only when β > 0
    print(f"loading --model {args.model}" + (" (the policy, and a frozen copy as π_ref)" * (args.beta > 0))
          + " …", flush=True)
    policy, tok = common.load_model(args.model, device)  # float32 weights
    policy.eval()  # no dropout: ρ must be exactly 1 on the first inner iteration
    ref = common.load_model(args.model, device, trainable=False)[0] if args.beta > 0 else None
    common.check_chat_template(tok, args.model, args.chat_template, train_rows + heldout)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    # the run folder is made only once the flags, the data and the model have all been accepted
    out = common.prepare_run_dir(args.out_dir or common.default_run_dir("grpo", args.seed), args.overwrite)

    sched = common.lr_scheduler(opt, args.warmup_steps, args.steps, args.lr_schedule)  # common.lr_factor
    load_seconds = time.time() - t_start

    def prompt_text(row):
        return common.chat_prompt(tok, row["prompt"], args.chat_template)  # messages: the chat template
    for r in heldout:
        r["text"] = prompt_text(r)

    eval_rows = [{"prompt": r["text"], "answer": r["answer"]} for r in heldout]

    def evaluate():
        with prec.autocast():
            return common.greedy_accuracy(policy, tok, eval_rows, args.max_new_tokens, strict)

    def evaluate_pass_at_k():  # pass@1 and pass@G at the sampling temperature, a fixed seed
        if not args.pass_at_k:
            return None
        with prec.autocast():
            return common.pass_at_k(policy, tok, eval_rows, args.group_size, args.max_new_tokens, strict,
                                    args.temperature)

    log = common.RunLogger(out, total_steps=args.steps)
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} "
          f"({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters)")
    print(f"evaluating the start model on {len(heldout)} held-out prompts …", flush=True)
    start_acc, start_pass = evaluate(), evaluate_pass_at_k()
    log.log(0, {"eval/accuracy": start_acc, **common.pass_metrics(start_pass)})
    print(f"held-out greedy accuracy before training: {start_acc:.3f} ({len(heldout)} prompts)"
          + common.pass_text(start_pass))

    G, B = args.group_size, args.prompts_per_step * args.group_size
    mb = args.micro_batch or B
    rng = np.random.default_rng(args.seed)
    acc, t_train = start_acc, time.time()
    for step in range(1, args.steps + 1):
        t0 = time.time()
        ##### 1. generate G completions per prompt from π_old (= π_θ right now)
        picks = rng.choice(len(train_rows), args.prompts_per_step,
                           replace=args.prompts_per_step > len(train_rows))
        rows = [train_rows[i] for i in picks]
        prompts = [prompt_text(r) for r in rows for _ in range(G)]  # groups are consecutive
        answers = [r["answer"] for r in rows for _ in range(G)]
        with prec.autocast():
            p_ids, p_mask, c_ids, c_mask, texts, finished = common.generate_text(
                policy, tok, prompts, args.max_new_tokens, args.temperature)  # c_ids, c_mask: [B, T]
        t_gen = time.time() - t0

        ##### 2. rewards and advantages
        rewards = torch.tensor([common.score(t, a, f, strict) for t, a, f in zip(texts, answers, finished)],
                               device=device)  # [B]
        if args.reward == "process":
            targets = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for a in answers]
            step_r = common.digit_step_rewards(c_ids, c_mask, targets)  # [B, T]
            adv = process_advantages(step_r, c_mask, G, args.scale_rewards, args.adv_eps)  # [B, T]
        else:
            adv = group_advantages(rewards, G, args.scale_rewards, args.adv_eps)  # [B]

        ##### 3. cache log π_old and log π_ref (no gradient)
        ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
        T = c_ids.shape[1]
        with torch.no_grad(), prec.autocast():
            # with μ = 1, π_old = π_θ at the only gradient step, so log π_old is logp.detach()
            # and this forward pass is skipped (TRL does the same)
            old_logp = torch.cat([common.token_logprobs(policy, ids[i:i + mb], mask[i:i + mb], T,
                                                        args.temperature)[0] for i in range(0, B, mb)]
                                 ) if args.mu > 1 else None  # [B, T]
            ref_logp = torch.cat([common.token_logprobs(ref, ids[i:i + mb], mask[i:i + mb], T,
                                                        args.temperature)[0] for i in range(0, B, mb)]
                                 ) if ref is not None else None  # [B, T]

        ##### 4. μ optimiser steps on this batch, accumulated over micro-batches
        n_tokens = c_mask.sum()
        for it in range(args.mu):
            stats: dict[str, float] = {}
            for i in range(0, B, mb):
                sl = slice(i, i + mb)
                with prec.autocast():
                    logp, ent = common.token_logprobs(policy, ids[sl], mask[sl], T, args.temperature,
                                                      with_entropy=(it == 0))  # [b, T]
                loss, m = grpo_loss(logp, old_logp[sl] if old_logp is not None else logp.detach(),
                                    adv[sl], c_mask[sl], None if ref_logp is None else ref_logp[sl],
                                    args.beta, args.epsilon, args.epsilon_high, args.loss_agg,
                                    args.max_new_tokens)
                # each micro-batch's share of the full-batch loss, so that the sum of gradients
                # equals the full-batch gradient whatever the split
                w = (c_mask[sl].sum() / n_tokens) if args.loss_agg == "token-mean" else (logp.shape[0] / B)
                prec.backward(loss * w)
                stats["loss"] = stats.get("loss", 0.0) + loss.item() * float(w)
                # the metrics are token means: weight each micro-batch by its share of the tokens
                w_tok = float(c_mask[sl].sum() / n_tokens)
                for k, v in m.items():
                    stats[k] = stats.get(k, 0.0) + float(v) * w_tok
                if ent is not None:
                    stats["entropy"] = stats.get("entropy", 0.0) + float(masked_mean(ent, c_mask[sl])) * w_tok
            grad_norm = prec.step(opt, policy.parameters(), max_norm=args.grad_clip)  # clip ‖g‖, AdamW step
            opt.zero_grad(set_to_none=True)
            if it == 0:
                first = dict(stats)
        sched.step()  # one schedule step per GRPO step, whatever μ

        ##### 5. log
        r_groups = rewards.view(-1, G)  # [n, G]
        metrics = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/frac_zero_std_groups": float((r_groups.std(1) == 0).float().mean()),
            "loss/policy": first["loss"],
            "kl/ref": stats["kl"],
            "policy/clip_frac": stats["clip_frac"],
            "policy/clip_frac_low": stats["clip_frac_low"],
            "policy/clip_frac_high": stats["clip_frac_high"],
            "policy/ratio_mean": stats["ratio_mean"],
            "policy/entropy": first["entropy"],
            "policy/grad_norm": float(grad_norm),
            "charts/lr": opt.param_groups[0]["lr"],
            "completions/mean_length": float(c_mask.sum(1).float().mean()),
            "completions/no_eos_frac": 1.0 - float(np.mean(finished)),
            "time/step_seconds": time.time() - t0,
            "time/generate_seconds": t_gen,
            "charts/completions_per_second": B / (time.time() - t0),
        }
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate()
            metrics["eval/accuracy"] = acc
        if step == args.steps:
            final_pass = evaluate_pass_at_k()
            metrics.update(common.pass_metrics(final_pass))
        keys = ["reward/mean", "reward/frac_zero_std_groups", "kl/ref", "policy/clip_frac",
                "policy/entropy", "completions/mean_length", "eval/accuracy"]
        log.log(step, metrics, keys if (step % args.log_every == 0 or step == args.steps
                                        or "eval/accuracy" in metrics) else [])

    ##### 6. save and summarise
    train_seconds = time.time() - t_train
    model_dir = common.save_policy(policy, tok, out, args.save_model)
    examples = heldout[:4]
    with prec.autocast():
        *_, ex_texts, _ = common.generate_text(policy, tok, [r["text"] for r in examples],
                                               args.max_new_tokens, greedy=True)
    summary = log.summary({
        "script": "grpo",
        "start_accuracy": start_acc,
        "final_accuracy": acc,
        "start_pass_at_k": start_pass,  # {"k", "pass_at_1", "pass_at_k"} or None
        "final_pass_at_k": final_pass,
        "steps": args.steps,
        "completions": args.steps * B,
        "model_dir": model_dir,
        **common.run_facts(args, device, t_start, train_seconds, load_seconds),
    })
    log.close()
    print(f"\n=== GRPO summary ({out})")
    print(f"held-out greedy accuracy: {start_acc:.3f} -> {acc:.3f} ({100 * (acc - start_acc):+.1f} points)"
          f" in {args.steps} steps, {summary['wall_seconds']:.0f}s wall ({train_seconds:.0f}s training)")
    if start_pass is not None:
        print(f"sampling at temperature {args.temperature}: pass@1 {start_pass['pass_at_1']:.3f} -> "
              f"{final_pass['pass_at_1']:.3f}, pass@{start_pass['k']} {start_pass['pass_at_k']:.3f} -> "
              f"{final_pass['pass_at_k']:.3f}")
    for r, t in zip(examples, ex_texts):
        print(f"  {r['prompt']!r:>14} -> {t!r:8} (answer {r['answer']})")
    return summary


if __name__ == "__main__":
    common.main(Args, train, __doc__)
