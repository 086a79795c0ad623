"""GRPO: Group Relative Policy Optimization for RL with verifiable rewards (RLVR), Dr. GRPO, and
the GRPO family the field uses now (GSPO, CISPO, DAPO's dynamic sampling and overlong shaping).

Notes: `000_e75205f5b80b652d.txt`, "Group Relative Policy Optimization" and "GRPO Done Right";
`003_0bc5d2784dac14e1.txt`, the end part on GRPO ("start with PPO, replace GAE with the z-score
within the group"). The variants after Dr. GRPO are not in the notes; each docstring cites its paper.

State s_t = the prompt x and the tokens generated so far y_<t; action a_t = the next token y_t.
There is no value network: the advantage of every token of completion y_i is its reward relative
to the other completions of the same prompt.

    for step = 1 .. steps:
        draw `prompts_per_step` prompts x from the train split
        π_old ← π_θ;  sample G completions y_1..y_G ~ π_old(·|x) for every x          (KV cache)
        r_i = reward(x, y_i)                    (1 if the answer is exactly right, else 0)
            [+ R_length(y_i)                    (--overlong-buffer: DAPO's soft length penalty)]
        [--dynamic-sampling: drop the groups with all G right or all G wrong (DAPO: on the task's
         score, not the shaped reward; process: on the step rewards), draw more prompts,
         until `prompts_per_step` groups with mixed outcomes are in the batch]
        Â_{i,t} = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + eps)                       (outcome)
            or  Σ_{steps j ending at or after t} r̃_j, with r̃ the group-normalised step rewards
                                                                                        (process)
        cache log π_old(y_t|·) and, if β > 0, log π_ref(y_t|·)
        repeat μ times:                                             (μ inner iterations)
            ρ_t = π_θ(y_t|·) / π_old(y_t|·)
                  [--ratio sequence: ρ_t = s_i = exp(1/|y_i| Σ_t log ρ_t) for every t (GSPO)]
            ℓ_t = min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε_high) Â_t) − β D_KL,t
                  [--policy-loss cispo: ℓ_t = sg(clip(ρ_t, 1−ε, 1+ε_high)) Â_t log π_θ(y_t) − β D_KL,t]
            L = −1/B Σ_i 1/|y_i| Σ_t ℓ_t          over all B = prompts × G completions of the step
                  [CISPO: L = −Σ_i Σ_t ℓ_t / Σ_i |y_i|, the paper's token mean]
            θ ← θ − lr ∇_θ L                                                      (AdamW)
        every `eval_every` steps: held-out greedy accuracy

The notes write L = −1/G Σ_i for one prompt's group; the code averages over the B completions of
all the step's prompts, which is the mean over prompts of the notes' per-group loss. D_KL,t is the
k3 estimator by default (`kl_estimate` says what its value and its gradient are).

Dr. GRPO = `--loss-agg constant --no-scale-rewards`: no 1/|y| (divide by the constant
`max_new_tokens` instead) and no division by the group's std.

Run:
    python grpo.py                                  # embedded `tiny` model, arithmetic, CPU, minutes
    python grpo.py --loss-agg constant --no-scale-rewards     # Dr. GRPO
    python grpo.py --reward process                 # process supervision: every completion token a step
    python grpo.py --task long-addition --model models/tiny-long --max-new-tokens 40 --beta 0 --lr 1e-4
    python grpo.py --mu 4 --ratio sequence          # GSPO (the ratio only matters off-policy, μ > 1)
    python grpo.py --mu 4 --policy-loss cispo       # CISPO
    python grpo.py --dynamic-sampling --epsilon-high 0.28 --loss-agg token-mean \\
        --max-new-tokens 6 --overlong-buffer 2      # DAPO's four changes
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --chat-template \\
        --max-new-tokens 256 --prompts-per-step 8 --group-size 8 --micro-batch 8 --lr 1e-6  # one GPU
    python grpo.py --save-every 100 --out-dir runs/x   # a checkpoint every 100 steps; stopped by
    python grpo.py --resume runs/x                     # Ctrl-C, it goes on from the last one
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

import common
import harness
import tasks
from common import check, masked_mean, masked_sum


@dataclass
class Args:
    # "(TRL: name)" gives the equivalent field of TRL's GRPOConfig (or of its TrainingArguments base)
    model: str = "tiny"
    """--model NAME_OR_PATH: a Hugging Face causal LM folder (or hub name, if cached), or `tiny`,
    the embedded default (the folder models/tiny) (TRL: GRPOTrainer's model)"""
    data: Optional[str] = None
    """JSONL file with {"prompt", "answer"} lines (the prompt a string, or a list of {"role",
    "content"} messages, rendered with the chat template), or GSM8K as published ({"question",
    "answer": "<solution> #### 72"}: the number after ####), scored by the last number in the
    completion; default: the built-in arithmetic task, scored strictly (TRL: train_dataset)"""
    task: Literal["arithmetic", "long-addition"] = "arithmetic"
    """the built-in task when there is no --data: arithmetic (a+b= up to 99+99, answered alone, with
    --model tiny), or long-addition (three-digit sums, answered directly or worked out column by
    column; with --model models/tiny-long --max-new-tokens 40 --beta 0 --lr 1e-4, and logs the share of
    worked answers and the accuracy of each format)"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (for instruct models)"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the final model; default runs/grpo__s<seed>__<time>
    (TRL: output_dir)"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""
    seed: int = 1
    """seed of Python's random, numpy and torch (sampling included) (TRL: seed)"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; default: CUDA when present, else the CPU"""
    threads: Optional[int] = None
    """torch's CPU threads; default: 1 for a model under 20M parameters, whose operations are too small
    to split (the threads only wait for each other, and for the cores when anything else runs), else
    torch's own choice (every core); recorded in summary.json; no effect on a GPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute dtype of the forward passes (autocast): auto (bfloat16 on a GPU that supports it,
    else float32), float32, bfloat16 or float16 (with loss scaling); the trained weights stay
    float32, the frozen models store their matmul weights as autocast rounds them and the rest
    in float32 (`harness.freeze`), so that π_θ = π_ref exactly at step 0 (TRL: bf16, fp16)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass instead of keeping them, in
    the policy: activation memory of one layer instead of all, for about one more forward
    pass per backward; the same gradients up to float rounding (TRL: gradient_checkpointing)"""

    steps: int = 2000
    """number of GRPO steps (each: generate, score, μ optimiser steps) (TRL: max_steps)"""
    prompts_per_step: int = 16
    """prompts x per step; the batch holds prompts_per_step × G completions
    (TRL: generation_batch_size / num_generations)"""
    group_size: int = 8
    """G, completions sampled per prompt; ≥ 2 (the notes: 'a few responses'; DeepSeekMath used 64)
    (TRL: num_generations)"""
    max_new_tokens: int = 4
    """completion token limit (4 fits a 3-digit sum and EOS; ~256+ for GSM8K); also the Dr. GRPO
    constant and DAPO's L_max (TRL: max_completion_length)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken of the same tempered distribution (TRL: temperature)"""
    lr: float = 3e-4
    """peak learning rate of AdamW (tiny: 3e-4; 1e-3 first drops its accuracy, or collapses it
    into completions that never end; a 0.5B model: ~1e-6) (TRL: learning_rate)"""
    warmup_steps: int = 20
    """steps of linear learning-rate warm-up from 0 (Adam's first steps are sign-like and large)
    (TRL: warmup_steps)"""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """after warm-up: keep the rate (constant) or decay it linearly to 0 at the last step
    (linear, the shape of TRL's default schedule; HF's version starts its warm-up at 0, this one
    at lr/(warmup+1)) (TRL: lr_scheduler_type)"""
    mu: int = 1
    """μ, inner optimiser steps on each batch, reusing the cached π_old log-probs (GRPO paper: 1);
    at μ = 1 every ratio is exactly 1, so --ratio and --policy-loss only matter for μ > 1
    (TRL: num_iterations)"""
    epsilon: float = 0.2
    """ε, the clip range of the token ratio: ρ is clipped to [1−ε, 1+ε_high] (usually 0.1..0.3)
    (TRL: epsilon)"""
    epsilon_high: Optional[float] = None
    """ε_high, a separate upper clip bound (DAPO's clip-higher, e.g. 0.28); default: ε (TRL: epsilon_high)"""
    ratio: Literal["token", "sequence"] = "token"
    """token: one ρ_t per token (GRPO); sequence: GSPO's s_i = (π_θ(y_i|x)/π_old(y_i|x))^(1/|y_i|),
    shared by every token of y_i and clipped per sequence with --gspo-epsilon(-high)
    (Zheng et al., 2025) (TRL: importance_sampling_level)"""
    gspo_epsilon: float = 3e-4
    """GSPO's clip range below, s_i ≥ 1 − ε (the GSPO paper, §5.1: 3e-4); used with --ratio sequence
    (TRL: epsilon, with importance_sampling_level="sequence")"""
    gspo_epsilon_high: float = 4e-4
    """GSPO's clip range above, s_i ≤ 1 + ε_high (the GSPO paper, §5.1: 4e-4); used with --ratio
    sequence (TRL: epsilon_high)"""
    policy_loss: Literal["clip", "cispo"] = "clip"
    """clip: PPO's clipped surrogate min(ρÂ, clip(ρ)Â), whose gradient is 0 where the clip binds;
    cispo: −sg(clip(ρ, 1−ε, 1+ε_high)) Â log π_θ, a detached, clipped weight that drops no token's
    gradient (MiniMax-M1, 2025), with --cispo-epsilon(-high) (TRL: loss_type="cispo")"""
    cispo_epsilon: Optional[float] = None
    """CISPO's lower bound on the weight, ρ ≥ 1 − ε; default none: no lower bound, as MiniMax-M1,
    which sets ε_low large and tunes only ε_high"""
    cispo_epsilon_high: float = 4.0
    """CISPO's upper bound on the weight, ρ ≤ 1 + ε_high. MiniMax-M1 does not publish its value; 4
    (a cap of 5) is TRL's recommended cap for cispo, from ScaleRL (TRL: epsilon_high=5.0, the cap itself)"""
    beta: float = 0.04
    """β, weight of the KL to the frozen reference inside the loss (DeepSeekMath: 0.04, the default,
    so that the notes' −β D_KL term runs); 0 skips the reference model entirely, which on `tiny` is
    about 1.4× faster at the same accuracy (TRL: beta, default 0)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """the per-token estimator D_KL,t of the β term (Schulman, 2020): k3 (DeepSeekMath) has the
    unbiased value of KL(π_θ‖π_ref) but the gradient of KL(π_ref‖π_θ); k2 has the gradient of
    KL(π_θ‖π_ref); k1's gradient is 0 in expectation (see kl_estimate). TRL 1.16 multiplies k3 by
    the differentiable ratio ρ_t by default (use_bias_correction_kl=True), whose expected gradient is
    ∇KL(π_θ‖π_ref), k2's, not k3's (TRL: k3 with use_bias_correction_kl=False; no k1, k2)"""
    loss_agg: Optional[Literal["seq-mean", "token-mean", "constant"]] = None
    """seq-mean: the notes' GRPO, 1/|y| inside, mean over sequences; token-mean: Σ over all tokens /
    number of tokens (DAPO, CISPO); constant: Σ / (B · max_new_tokens) (Dr. GRPO); default none:
    seq-mean, or token-mean with --policy-loss cispo, as MiniMax-M1 and TRL's loss_type="cispo"
    average (see loss_agg_of) (TRL: loss_type = "grpo" / "dapo" / "dr_grpo")"""
    scale_rewards: bool = True
    """divide the group-centred reward by the group's std (GRPO); --no-scale-rewards for Dr. GRPO
    (TRL: scale_rewards)"""
    adv_eps: float = 1e-4
    """eps in Â = (r − mean) / (std + eps), added to the std as TRL does (note 003 adds it to the
    variance): keeps an all-equal group at exactly 0 advantage (TRL: fixed at 1e-4)"""
    reward: Literal["outcome", "process"] = "outcome"
    """outcome: one reward per completion; process: every completion token is a step, EOS
    included, rewarded 1 if it is the target's token at that position (built-in task only)
    (TRL: reward_funcs)"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups with all G right or all G wrong (DAPO's 0 < #correct
    < G, on the task's score, whatever --overlong-buffer adds; with --reward process, the groups whose
    step rewards are all equal, as the advantage sees them) and draw more prompts until
    --prompts-per-step kept groups fill the batch"""
    max_sample_rounds: int = 10
    """with --dynamic-sampling, at most this many rounds of prompts_per_step prompts per step; when
    it is hit, the step trains on the mixed groups found so far (and says so)"""
    overlong_buffer: int = 0
    """L, DAPO's soft overlong punishment: completions longer than max_new_tokens − L tokens
    (EOS included) lose c·(|y| − (max_new_tokens − L))/L, up to c at the limit; 0 disables it
    (DAPO: L_cache = 4096 of 20480) (TRL: the reward function get_soft_overlong_punishment)"""
    overlong_penalty: float = 1.0
    """c, the largest overlong penalty, reached at max_new_tokens (DAPO: 1)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 disables) (TRL: max_grad_norm)"""
    micro_batch: Optional[int] = None
    """completions per forward/backward pass (gradient accumulation); default: the whole batch
    (TRL: per_device_train_batch_size, with gradient_accumulation_steps)"""

    eval_every: int = 100
    """steps between held-out greedy evaluations (TRL: eval_steps)"""
    eval_size: int = 500
    """held-out prompts per evaluation"""
    pass_at_k: bool = True
    """before and after training, also measure pass@1 and pass@k on the held-out prompts, with k = G
    samples per prompt at --temperature: what sampling can reach, which RL can then reinforce"""
    log_every: int = 50
    """steps between printed lines (every step is written to metrics.jsonl) (TRL: logging_steps)"""
    save_model: bool = True
    """save the final policy with save_pretrained into <out-dir>/model (TRL: save_strategy)"""
    save_every: int = 0
    """steps between checkpoints, <out-dir>/checkpoint-<step>/: the policy (save_pretrained), the
    optimiser, the scheduler, the RNG states and the step, all that --resume needs to continue
    exactly; 0: none (TRL: save_steps)"""
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
    ModelConfig: 16); π_ref (--beta > 0) is the base with the adapters off, not a second copy;
    <out-dir>/model holds the adapter as peft saves it (AutoPeftModelForCausalLM loads it) (TRL:
    peft_config)"""
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
    eps is added to the std, as TRL's GRPOTrainer does (so the side-by-side with TRL matches); note
    `003` adds it to the variance, (r − mean) / √(var + eps). Both give 0 for an all-equal group.
    For 0/1 rewards a mixed group with k of G right has var = k(G−k)/(G(G−1)) ≥ 1/G, so std ≥ 1/√G
    (0.35 for G = 8), where the two differ by less than eps (√(var + eps) ≈ std + eps/(2 std)).
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


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level importance ratio (Zheng et al., 2025, "Group Sequence Policy
    Optimization", eq. 7), the geometric mean of the token ratios:

        s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp( 1/|y_i| Σ_t (log π_θ(y_t) − log π_old(y_t)) )

    logp, old_logp, mask: [B, T] -> [B]. Its gradient is ∇s_i = s_i · 1/|y_i| Σ_t ∇log π_θ(y_t): every
    token of y_i gets the same weight s_i/|y_i|, and a long completion's ratio stays near 1 instead
    of multiplying |y_i| token ratios together.
    """
    log_s = masked_sum(logp - old_logp, mask, dim=1) / mask.sum(dim=1).clamp(min=1)  # 1/|y| Σ_t log ρ_t   [B]
    return torch.exp(log_s)  # s_i   [B]


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The 'k3' estimator (Schulman, 2020, "Approximating KL divergence"), as in DeepSeekMath's GRPO
    (TRL multiplies it by ρ_t unless use_bias_correction_kl=False, see `kl_estimate`):
        π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1.  [B, T] -> [B, T]
    Its value, for y ~ π_θ, is an unbiased estimate of KL(π_θ ‖ π_ref), and never negative
    (e^x ≥ 1 + x). Its gradient in the loss is that of the other direction, KL(π_ref ‖ π_θ): see
    `kl_estimate`. With μ > 1 the samples come from π_old, so after the first inner iteration it
    estimates E_{π_old}[k3], not KL(π_θ ‖ π_ref).
    Computed as expm1(x) − x, the same function: exp(x) − x − 1 in float32 cancels when π_θ ≈ π_ref
    and can come out slightly negative (−6e-8), while expm1(x) − x stays ≥ 0 and accurate."""
    log_ratio = ref_logp - logp  # x = log(π_ref / π_θ)   [B, T]
    return torch.expm1(log_ratio) - log_ratio  # e^x − 1 − x   [B, T]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(π_θ ‖ π_ref) from one sample y_t (Schulman, 2020).  [B, T] -> [B, T]

    With log r = log π_ref(y_t) − log π_θ(y_t):
        k1 = −log r                       value: unbiased for KL(π_θ‖π_ref) under y ~ π_θ; can be < 0
        k2 = ½ (log r)²                   value: biased (≥ 0, equal to KL to second order near π_ref)
        k3 = (r − 1) − log r              value: unbiased for KL(π_θ‖π_ref) under y ~ π_θ; ≥ 0

    Inside the loss the samples are fixed and only log π_θ(y_t) is differentiated. The expected
    gradients, over y ~ π_θ (exact enumeration in tests/test_grpo_family.py):
        ∇k1 = ∇log π_θ(y)                  E = 0: the score function has zero mean, no pull at all
        ∇k2 = (log π_θ − log π_ref) ∇log π_θ   E = ∇KL(π_θ ‖ π_ref), the notes' direction
        ∇k3 = (1 − π_ref/π_θ) ∇log π_θ     E = −Σ_y π_ref(y) ∇log π_θ(y) = ∇KL(π_ref ‖ π_θ),
                                           the other direction (DeepSeekMath does the same)
    TRL 1.16 by default (use_bias_correction_kl=True) puts ρ_t·k3 in the loss instead, with
    ρ_t = π_θ/π_old differentiable even where it is 1 (DeepSeek-V3.2): at ρ = 1,
        ∇(ρ k3) = (k3 + 1 − π_ref/π_θ) ∇log π_θ = (log π_θ − log π_ref) ∇log π_θ = ∇k2,
    so its expected gradient is ∇KL(π_θ ‖ π_ref), the notes' direction; `--kl-estimator k2` gives
    that gradient here (k3 here is TRL's use_bias_correction_kl=False).
    Near π_ref the two directions agree to second order, so k2's and k3's gradients agree to first.
    With μ > 1 the samples come from π_old, so these hold only on the first inner iteration.
    """
    log_r = ref_logp - logp  # log r = log π_ref − log π_θ   [B, T]
    if kind == "k1":
        return -log_r  # k1   [B, T]
    if kind == "k2":
        return 0.5 * log_r ** 2  # k2   [B, T]
    if kind == "k3":
        return k3_kl(logp, ref_logp)  # k3   [B, T]
    raise ValueError(f"unknown KL estimator {kind!r}: expected k1, k2 or k3")


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025, "DAPO", eq. 13), times c = `penalty`:

        R_length(y) = 0                                  |y| ≤ L_max − L
                    = ((L_max − L) − |y|) / L            L_max − L < |y| ≤ L_max
                    = −1                                 |y| > L_max

    lengths: [B] completion tokens, EOS included; max_len = L_max (--max-new-tokens), buffer = L.
    -> [B], added to the task reward. Generation stops at L_max, so a completion cut off there gets
    −c on top of its score of 0. buffer = 0 gives zeros.
    """
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)  # [B]
    over = (lengths.float() - (max_len - buffer)) / buffer  # (|y| − (L_max − L)) / L   [B]
    return -penalty * over.clamp(min=0.0, max=1.0)  # [B]


def mixed_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter (Yu et al., 2025, eq. 11: keep a prompt if
    0 < #correct < G): which groups have rewards that are not all equal.
    rewards: [B] with the G completions of a prompt consecutive -> [n] bool. Called on the task's
    score r_i (1 right, 0 wrong), where "not all equal" is 0 < #correct < G; not on the overlong-
    shaped reward, by which a group with no right answer ([0, 0, 0, −0.5]) would be kept. A group
    whose scores are all equal has Â = 0 on every completion (without shaping), so it adds nothing
    but the KL term to the gradient."""
    r = rewards.view(-1, group_size)  # [n, G]
    return (r != r[:, :1]).any(dim=1)  # [n]


def mixed_step_reward_groups(step_rewards: torch.Tensor, step_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """The dynamic-sampling filter under process supervision: which groups have step rewards that
    are not all equal. step_rewards, step_mask: [B, T] -> [n] bool. `process_advantages`
    normalises over all the steps of a group, so a group is 0 everywhere exactly when its step
    rewards are all equal; an all-wrong group whose steps differ has Â ≠ 0 and is kept (DAPO filters
    on the outcome, which here would drop such a group; the filter follows the advantage instead)."""
    n = step_rewards.shape[0] // group_size
    r = step_rewards.reshape(n, -1)  # [n, G·T]  all steps of a group together
    m = step_mask.reshape(n, -1).bool()  # [n, G·T]
    hi = torch.where(m, r, torch.full_like(r, -float("inf"))).amax(dim=1)  # [n] largest step reward
    lo = torch.where(m, r, torch.full_like(r, float("inf"))).amin(dim=1)  # [n] smallest
    return hi > lo  # [n]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str, max_len: int | None = None):
    """The loss −(objective) from the per-token objective ℓ [B, T] and the completion mask [B, T]:
        seq-mean  : L = −1/B Σ_i 1/|y_i| Σ_t ℓ_t        (the notes' GRPO; GSPO's 1/G Σ_i)
        token-mean: L = −Σ_i Σ_t ℓ_t / Σ_i |y_i|        (DAPO, CISPO)
        constant  : L = −1/B Σ_i Σ_t ℓ_t / max_len      (Dr. GRPO; max_len defaults to T)"""
    if loss_agg == "seq-mean":
        per_seq = masked_sum(per_token, mask, dim=1) / mask.sum(dim=1).clamp(min=1)  # 1/|y| Σ_t  [B]
        return -per_seq.mean()
    if loss_agg == "token-mean":
        return -masked_sum(per_token, mask) / mask.sum().clamp(min=1)
    if loss_agg == "constant":
        L = mask.shape[1] if max_len is None else max_len
        return -masked_sum(per_token, mask) / (mask.shape[0] * L)
    raise ValueError(f"unknown loss_agg {loss_agg!r}: expected seq-mean, token-mean or constant")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              epsilon: float | None = 0.2, epsilon_high: float | None = None, loss_agg: str = "seq-mean",
              max_len: int | None = None, ratio: str = "token", policy_loss: str = "clip",
              kl_estimator: str = "k3"):
    """The GRPO loss (to minimise: the notes' objective with its sign flipped), and its variants.

    logp, old_logp, ref_logp: [B, T]   log π_θ, log π_old, log π_ref of each completion token
    advantages: [B] (one per completion) or [B, T] (per token, process supervision)
    mask: [B, T]  1 on completion tokens up to and including the first EOS
        ρ_t    = exp(log π_θ − log π_old)                    ratio="token"   (GRPO)
               = s_i = exp(1/|y_i| Σ_t log ρ_t), every t     ratio="sequence" (GSPO, `sequence_ratio`)
        ℓ_t    = min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε_high) Â_t) − β D_KL,t           policy_loss="clip"
               = sg(clip(ρ_t, 1−ε, 1+ε_high)) Â_t log π_θ(y_t) − β D_KL,t        policy_loss="cispo"
        (D_KL,t: `kl_estimate` of kind `kl_estimator`; for CISPO, ε = None means no lower bound)
        L      = `aggregate`(ℓ, mask, loss_agg): seq-mean −1/B Σ_i 1/|y_i| Σ_t ℓ_t, over all B rows
    Here ρ = 1 at the first inner iteration (π_old = π_θ), where all four (token or sequence ratio,
    clip or CISPO) have the same gradient, −1/B Σ_i 1/|y_i| Σ_t Â_t ∇log π_θ(y_t) for seq-mean.
    They differ once π_θ has moved (μ > 1): the clip's gradient is 0 where it binds, CISPO's never.
    Returns (loss, metrics) with detached scalar metrics: the k3 KL to π_ref (whatever the loss's
    estimator, so that runs compare), the estimator's own mean, clip fractions, the mean ratio.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1], broadcast over tokens
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if ratio == "token":
        rho = torch.exp(logp - old_logp)  # ρ_t   [B, T]
    elif ratio == "sequence":
        if policy_loss != "clip":
            raise ValueError("ratio='sequence' goes with policy_loss='clip' (GSPO)")
        rho = sequence_ratio(logp, old_logp, mask).unsqueeze(1).expand_as(logp)  # s_i on every t   [B, T]
    else:
        raise ValueError(f"unknown ratio {ratio!r}: expected token or sequence")
    low_bound = 1 - epsilon if epsilon is not None else None
    clipped = torch.clamp(rho, low_bound, 1 + eps_high)  # clip(ρ, 1−ε, 1+ε_high)   [B, T]
    below = rho < low_bound if low_bound is not None else torch.zeros_like(rho, dtype=torch.bool)  # [B, T]
    if policy_loss == "clip":
        per_token = torch.min(rho * advantages, clipped * advantages)  # min(ρ Â, clip(ρ) Â)   [B, T]
        adv = advantages.expand_as(rho)  # [B, T]
        low = below & (adv < 0)  # the clip binds below: gradient 0 there
        high = (rho > 1 + eps_high) & (adv > 0)  # the clip binds above
    elif policy_loss == "cispo":
        per_token = clipped.detach() * advantages * logp  # sg(clip(ρ)) Â log π_θ   [B, T]
        low = below  # the weight is raised to 1 − ε (its gradient still flows, scaled)
        high = rho > 1 + eps_high  # the weight is capped at 1 + ε_high
    else:
        raise ValueError(f"unknown policy_loss {policy_loss!r}: expected clip or cispo")
    kl = est = None
    if ref_logp is not None and beta != 0.0:
        est = kl_estimate(logp, ref_logp, kl_estimator)  # D_KL,t   [B, T]
        per_token = per_token - beta * est  # ℓ_t   [B, T]
        kl = est if kl_estimator == "k3" else k3_kl(logp, ref_logp)  # [B, T]
    loss = aggregate(per_token, mask, loss_agg, max_len)

    with torch.no_grad():
        zero = torch.zeros((), device=logp.device)
        metrics = {
            "clip_frac": masked_mean((low | high).float(), mask),
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            "ratio_mean": masked_mean(rho, mask),
            "kl": masked_mean(kl, mask) if kl is not None else zero,
            "kl_estimate": masked_mean(est, mask) if est is not None else zero,
        }
    return loss, metrics


def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               epsilon_low: float | None = None, epsilon_high: float = 4.0, loss_agg: str = "token-mean",
               max_len: int | None = None):
    """CISPO (MiniMax-M1, 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention", §3.1), without a KL term: a REINFORCE loss whose importance weight is clipped and
    detached,

        L = −1/Σ|y_i| Σ_i Σ_t sg(clip(ρ_t, 1−ε_low, 1+ε_high)) Â_t log π_θ(y_t)      (token-mean, the paper's)

    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T]. dL/dlog π_θ(y_t) = −w_t Â_t /Σ|y| with
    w_t = clip(ρ_t): never 0, unlike PPO-clip's, which is 0 wherever its clip binds. ε_low = None:
    no lower bound (MiniMax-M1). This is `grpo_loss(policy_loss="cispo")` with CISPO's defaults.
    Returns (loss, metrics) as `grpo_loss`.
    """
    return grpo_loss(logp, old_logp, advantages, mask, epsilon=epsilon_low, epsilon_high=epsilon_high,
                     loss_agg=loss_agg, max_len=max_len, policy_loss="cispo")


#####################################################################################################
#####  training
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
    check(args.group_size >= 2, f"--group-size must be ≥ 2 (got {args.group_size}): the advantage "
                                "compares a completion with the others of its group")
    check(0 < args.epsilon < 1, f"--epsilon must be in (0, 1) (got {args.epsilon}): the lower clip bound "
                                "1 − ε must stay above 0")
    check(args.epsilon_high is None or args.epsilon_high > 0,
          f"--epsilon-high must be > 0 (got {args.epsilon_high})")
    check(args.beta >= 0, f"--beta must be ≥ 0 (got {args.beta}): it weights a KL penalty")
    check(args.loss_agg in (None, "seq-mean", "token-mean", "constant"),
          f"--loss-agg {args.loss_agg!r}: expected seq-mean, token-mean or constant")
    check(args.reward in ("outcome", "process"), f"--reward {args.reward!r}: expected outcome or process")
    check(args.reward == "outcome" or args.data is None,
          "--reward process needs per-step rewards, which only the built-in arithmetic task defines "
          "(drop --data, or use --reward outcome)")
    check(not (args.ratio == "sequence" and args.policy_loss == "cispo"),
          "--ratio sequence with --policy-loss cispo: GSPO clips the sequence ratio inside PPO's min, "
          "CISPO weights token log-probs; pick one")
    check(args.gspo_epsilon > 0 and args.gspo_epsilon_high > 0,
          f"--gspo-epsilon and --gspo-epsilon-high must be > 0 (got {args.gspo_epsilon}, {args.gspo_epsilon_high})")
    check(args.gspo_epsilon < 1, f"--gspo-epsilon must be < 1 (got {args.gspo_epsilon}): the lower clip "
                                 "bound 1 − ε must stay above 0")
    check(args.cispo_epsilon is None or args.cispo_epsilon > 0,
          f"--cispo-epsilon must be > 0, or none for no lower bound (got {args.cispo_epsilon})")
    check(args.cispo_epsilon_high > 0, f"--cispo-epsilon-high must be > 0 (got {args.cispo_epsilon_high})")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "eval_every", "eval_size",
                 "log_every"):  # before --overlong-buffer, whose range is given by --max-new-tokens
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(args, name)})")
    check(0 <= args.overlong_buffer <= args.max_new_tokens,
          f"--overlong-buffer must be in 0..--max-new-tokens ({args.max_new_tokens}) (got {args.overlong_buffer})")
    check(args.overlong_penalty >= 0, f"--overlong-penalty must be ≥ 0 (got {args.overlong_penalty})")
    check(args.overlong_buffer == 0 or args.reward == "outcome",
          "--overlong-buffer shapes the one reward of a completion: use it with --reward outcome")
    tasks.check_task(args.task, args.data, args.max_new_tokens)  # room for the task's longest answer
    check(args.max_sample_rounds >= 1, f"--max-sample-rounds must be ≥ 1 (got {args.max_sample_rounds})")
    check(args.temperature > 0, f"--temperature must be > 0 (got {args.temperature})")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.adv_eps > 0, f"--adv-eps must be > 0 (got {args.adv_eps})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.micro_batch is None or args.micro_batch >= 1, "--micro-batch must be ≥ 1")
    check(args.grad_clip >= 0, f"--grad-clip must be ≥ 0 (got {args.grad_clip}; 0 disables it)")
    harness.check_lr(args.lr)
    token_clip = args.ratio == "token" and args.policy_loss == "clip"
    harness.check_idle_flags(args, {  # each flag set where it does nothing: one line
        "kl_estimator": (args.beta > 0, "with --beta 0 (no KL term, no reference model)"),
        "epsilon": (token_clip, "with --ratio sequence or --policy-loss cispo, which clip with their own ε"),
        "epsilon_high": (token_clip, "with --ratio sequence or --policy-loss cispo, which clip with their own ε"),
        "gspo_epsilon": (args.ratio == "sequence", "without --ratio sequence"),
        "gspo_epsilon_high": (args.ratio == "sequence", "without --ratio sequence"),
        "cispo_epsilon": (args.policy_loss == "cispo", "without --policy-loss cispo"),
        "cispo_epsilon_high": (args.policy_loss == "cispo", "without --policy-loss cispo"),
        "max_sample_rounds": (args.dynamic_sampling, "without --dynamic-sampling"),
        "overlong_penalty": (args.overlong_buffer > 0, "with --overlong-buffer 0"),
        "adv_eps": (args.scale_rewards, "with --no-scale-rewards (it guards the division by the std)"),
    })
    if args.mu == 1 and (args.ratio == "sequence" or args.policy_loss == "cispo"):
        print("note: with --mu 1 every ratio is exactly 1, so --ratio sequence and --policy-loss cispo "
              "give GRPO's update; they differ only off-policy (--mu > 1)")
    elif args.mu == 1 and (args.epsilon, args.epsilon_high) != (Args.epsilon, Args.epsilon_high):
        print("note: with --mu 1 every ratio is exactly 1, so the clip range (--epsilon, --epsilon-high) "
              "never binds; it acts only off-policy (--mu > 1)")


def train(args: Args) -> dict:
    args, ckpt = harness.resume_run(args)  # --resume RUN_DIR: the run's own config and last checkpoint
    validate(args)
    t_start = time.time()
    harness.seed_everything(args.seed)
    device = harness.pick_device(args.device)
    prec = harness.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    train_rows, heldout = tasks.load_task(args.data, task=args.task)
    heldout = heldout[: args.eval_size]
    strict = tasks.task_scoring(args.task, args.data)  # built-in tasks strictly, --data by its last number

    ##### models: the policy π_θ, and the frozen reference π_ref only when β > 0
    print(f"loading --model {args.model}" + (" (the policy, and a frozen copy as π_ref)" * (args.beta > 0))
          + " …", flush=True)
    policy, tok = common.load_model(harness.start_weights(ckpt, args.model, args), device)  # float32
    policy.eval()  # no dropout: ρ must be exactly 1 on the first inner iteration
    harness.gradient_checkpointing(policy, args.gradient_checkpointing)  # --gradient-checkpointing
    policy = harness.apply_lora(policy, args, ckpt)  # --lora-r: adapters on the frozen base, only they trained
    ref = harness.reference_of(policy, args, args.model, device, prec) if args.beta > 0 else None
    tasks.check_chat_template(tok, args.model, args.chat_template, train_rows + heldout)
    # every prompt + --max-new-tokens within the model's positions (row i of train + held out: line of --data)
    tasks.check_context(tok, policy, [tasks.chat_prompt(tok, r["prompt"], args.chat_template)
                                      for r in train_rows + heldout], args.max_new_tokens, args.data)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    harness.set_threads(args.threads, device, policy)  # CPU: 1 thread for a small model (see --threads)
    # the run folder is made only once the flags, the data and the model have all been accepted
    out = harness.prepare_run_dir(args.out_dir or harness.default_run_dir("grpo", args.seed), args.overwrite,
                                  resume=ckpt)
    sched = harness.lr_scheduler(opt, args.warmup_steps, args.steps, args.lr_schedule)  # harness.lr_factor
    load_seconds = time.time() - t_start
    evaluate = Evaluation(policy, tok, heldout, args, strict, prec)  # held-out greedy accuracy, pass@k
    log = harness.RunLogger(out, total_steps=args.steps)
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} "
          f"({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters)")
    if ckpt is None:
        start_acc, start_pass = evaluate.start(log)

    G = args.group_size
    rng = np.random.default_rng(args.seed)
    eps_low, eps_high = clip_range(args)  # GSPO's and CISPO's clip ranges are their own (see Args)
    agg = loss_agg_of(args)  # seq-mean, the notes' GRPO (CISPO: token-mean, the paper's)

    def sample():  # one round of step 1: prompts_per_step prompts, G completions each, r_i = reward(x, y_i)
        return sample_groups(policy, tok, train_rows, rng, args, strict, prec)

    t_train = time.time()
    if ckpt is None:
        acc, final_pass, total_generated, capped_steps = start_acc, None, 0, 0
    else:  # --resume: the state at the end of the checkpoint's step (the global RNGs last)
        start_acc, start_pass, acc, final_pass, total_generated, capped_steps = resume(ckpt, rng, opt, sched, prec)
    for step in range((ckpt.step if ckpt else 0) + 1, args.steps + 1):
        t0 = time.time()
        ##### 1. sample G completions per prompt from π_old (= π_θ right now), and score them
        if args.dynamic_sampling:  # DAPO: keep the groups with mixed rewards, sample more rounds
            batch, rounds, capped = dynamic_sampling(sample, args, step, tok, capped_steps)
            capped_steps += capped
        else:
            batch = sample()
            rounds, capped = [batch], False
        p_ids, p_mask, c_ids, c_mask = batch["p_ids"], batch["p_mask"], batch["c_ids"], batch["c_mask"]  # [B, ·]
        B = c_ids.shape[0]
        mb = args.micro_batch or B
        generated = sum(r["scores"].shape[0] for r in rounds)
        total_generated += generated
        t_gen = time.time() - t0

        ##### 2. advantages, from the rewards of step 1 (r_i: batch["scores"]; r_i + R_length: "shaped")
        if args.reward == "process":  # a reward per step (per token here), Â_t per token
            adv = process_advantages(process_rewards(tok, batch), c_mask, G, args.scale_rewards,
                                     args.adv_eps)  # [B, T]
        else:  # Â_i = (r_i − mean(r)) / (std(r) + eps) within each group of G, on the shaped reward
            adv = group_advantages(batch["shaped"], G, args.scale_rewards, args.adv_eps)  # [B]

        ##### 3. cache log π_old and log π_ref (no gradient)
        ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
        T = c_ids.shape[1]
        # with μ = 1, π_old = π_θ at the only gradient step, so log π_old is logp.detach() and this
        # forward pass is skipped (TRL does the same)
        old_logp = frozen_logprobs(policy, ids, mask, T, args, prec) if args.mu > 1 else None  # [B, T]
        ref_logp = frozen_logprobs(ref, ids, mask, T, args, prec) if ref is not None else None  # [B, T]

        ##### 4. μ optimiser steps on this batch, accumulated over micro-batches
        # μ = 1 (the default, the paper's): π_old = π_θ, ρ ≡ 1, the clip never binds (policy/clip_frac 0)
        # and the update is the policy gradient. From the second inner step it binds: `--mu 2 --steps 400
        # --beta 0` clips 3% of tokens over the run, 6–7% in steps 20–60 (seeds 1–3, bench_grpo_family).
        n_tokens = c_mask.sum()
        for it in range(args.mu):
            stats: dict[str, float] = {}
            for i in range(0, B, mb):
                sl = slice(i, i + mb)
                with prec.autocast():
                    logp, ent = common.token_logprobs(policy, ids[sl], mask[sl], T, args.temperature,
                                                      with_entropy=(it == 0))  # log π_θ   [b, T]
                loss, m = grpo_loss(logp, old_logp[sl] if old_logp is not None else logp.detach(),
                                    adv[sl], c_mask[sl], None if ref_logp is None else ref_logp[sl],
                                    args.beta, eps_low, eps_high, agg, args.max_new_tokens,
                                    args.ratio, args.policy_loss, args.kl_estimator)
                # each micro-batch's share of the full-batch loss, so that the sum of gradients
                # equals the full-batch gradient whatever the split
                w = (c_mask[sl].sum() / n_tokens) if agg == "token-mean" else (logp.shape[0] / B)
                prec.backward(loss * w)
                add_stats(stats, loss, w, m, ent, c_mask[sl], n_tokens)
            prec.unscale_(opt)  # float16 only: .grad back to the true gradient, before clipping
            grad_norm = common.clip_grad_norm(policy.parameters(), args.grad_clip)  # g ← g·min(1, c/‖g‖)
            prec.step(opt)  # AdamW: θ ← θ − lr·Adam(g)
            opt.zero_grad(set_to_none=True)
            if it == 0:
                first = dict(stats)
        sched.step()  # one schedule step per GRPO step, whatever μ

        ##### 5. evaluate every `eval_every` steps, and log
        metrics = step_metrics(batch, rounds, capped, first, stats, grad_norm, opt, G, t0, t_gen)
        metrics.update(worked_metrics(args, batch))  # long addition: the samples' format; else none
        if step % args.eval_every == 0 or step == args.steps:
            metrics.update(evaluate.metrics())
            acc = metrics["eval/accuracy"]
        if step == args.steps:
            final_pass = evaluate.pass_at_k()
            metrics.update(tasks.pass_metrics(final_pass))
        log.log(step, metrics, printed_keys(args) if (step % args.log_every == 0 or step == args.steps
                                                      or "eval/accuracy" in metrics) else [])
        if args.save_every and step % args.save_every == 0:  # --save-every: what step + 1 needs
            harness.save_checkpoint(out, step, args, {"model": policy}, {
                **harness.training_state(opt, sched, prec), "data_rng": rng.bit_generator.state,
                "start_acc": start_acc, "start_pass": start_pass, "acc": acc, "final_pass": final_pass,
                "total_generated": total_generated, "capped_steps": capped_steps}, tok)

    ##### 6. save and summarise
    return summarise(policy, tok, out, log, evaluate, args, device, prec, dict(
        start_accuracy=start_acc, final_accuracy=acc, start_pass_at_k=start_pass, final_pass_at_k=final_pass,
        completions=total_generated, sample_rounds_capped_steps=capped_steps),
        t_start, time.time() - t_train, load_seconds)


#####################################################################################################
#####  the steps of train() that the default run does not take, and its bookkeeping
#####################################################################################################


def clip_range(args: Args) -> tuple[float | None, float | None]:
    """(ε, ε_high) of the chosen ratio and loss: GSPO's and CISPO's ranges are their own (see Args)."""
    if args.ratio == "sequence":
        return args.gspo_epsilon, args.gspo_epsilon_high
    if args.policy_loss == "cispo":
        return args.cispo_epsilon, args.cispo_epsilon_high
    return args.epsilon, args.epsilon_high


def loss_agg_of(args: Args) -> str:
    """The loss aggregation: --loss-agg if given, else seq-mean (the notes' GRPO) or, under
    --policy-loss cispo, token-mean, the mean over all the batch's tokens that MiniMax-M1 (§3.1) and
    TRL's loss_type="cispo" use."""
    if args.loss_agg is not None:
        return args.loss_agg
    return "token-mean" if args.policy_loss == "cispo" else "seq-mean"


def sample_groups(policy, tok, train_rows: list[dict], rng: np.random.Generator, args: Args, strict: bool,
                  prec) -> dict:
    """Step 1, one round: draw prompts_per_step prompts, sample G completions of each from π_old,
    and score them. Returns the round as a dict: p_ids, p_mask [b, P]; c_ids, c_mask [b, T];
    finished, answers, texts (lists of b; a text: the completion before its stop token); scores [b]
    (the task's reward r_i); shaped [b] (r_i + R_length)."""
    G = args.group_size
    picks = rng.choice(len(train_rows), args.prompts_per_step, replace=args.prompts_per_step > len(train_rows))
    rows = [train_rows[i] for i in picks]
    prompts = [tasks.chat_prompt(tok, r["prompt"], args.chat_template)  # messages: the chat template
               for r in rows for _ in range(G)]  # groups are consecutive
    answers = [r["answer"] for r in rows for _ in range(G)]
    with prec.autocast():
        p_ids, p_mask, c_ids, c_mask, texts, finished = common.generate_text(
            policy, tok, prompts, args.max_new_tokens, args.temperature)  # c_ids, c_mask: [b, T]
    scores = torch.tensor([tasks.score(c, a, f, strict, tok)  # r_i, scored from the ids, as generated
                           for c, a, f in zip(c_ids.tolist(), answers, finished)], device=c_ids.device)  # [b]
    # DAPO's soft overlong punishment, on top of the task reward (0 when --overlong-buffer 0)
    shaped = scores + overlong_penalty(c_mask.sum(1), args.max_new_tokens, args.overlong_buffer,
                                       args.overlong_penalty)  # r_i + R_length(y_i)   [b]
    return dict(p_ids=p_ids, p_mask=p_mask, c_ids=c_ids, c_mask=c_mask, finished=finished,
                answers=answers, texts=texts, scores=scores, shaped=shaped)


def groups_to_keep(r: dict, args: Args, tok) -> torch.Tensor:
    """Which groups of one sampling round dynamic sampling keeps.  -> [n] bool
    outcome: DAPO's 0 < #correct < G (eq. 11), on the task's score r_i, not on r_i + R_length
    (--overlong-buffer); process: on the step rewards, which are what the advantage uses."""
    if args.reward == "process":
        return mixed_step_reward_groups(process_rewards(tok, r), r["c_mask"], args.group_size)  # [n]
    return mixed_reward_groups(r["scores"], args.group_size)  # [n]


def dynamic_sampling(sample, args: Args, step: int, tok, capped_steps: int):
    """DAPO's dynamic sampling: call `sample()` for rounds of prompts, keep the groups with mixed
    outcomes (`groups_to_keep`: 0 < #correct < G), until prompts_per_step such groups fill the batch or
    --max-sample-rounds is reached. -> (batch, rounds, capped): the batch (as a round, at most
    prompts_per_step × G rows; the last round whole if no group was mixed, its advantages all 0),
    every round sampled (for the metrics), and whether the cap was hit."""
    G, rounds, kept = args.group_size, [], []
    while True:
        r = sample()
        rounds.append(r)
        groups = groups_to_keep(r, args, tok)  # [n] 0 < #correct < G (process: step rewards not all equal)
        kept.append((r, groups.repeat_interleave(G)))  # [b] rows of the mixed groups
        n_kept = sum(int(m.sum()) for _, m in kept) // G
        if n_kept >= args.prompts_per_step:
            capped = False
            break
        if len(rounds) == args.max_sample_rounds:
            if capped_steps == 0:
                print(f"step {step}: --max-sample-rounds {args.max_sample_rounds} reached with "
                      f"{n_kept} of {args.prompts_per_step} groups of mixed rewards; training on "
                      f"those (this step's batch is smaller; counted in sampling/capped)")
            capped = True
            break
    batch = merge_rounds(kept, args.prompts_per_step * G, tok.pad_token_id)
    if batch is None:  # no mixed group at all: the last round (advantages 0 but for overlong shaping)
        batch = merge_rounds([(rounds[-1], torch.ones_like(rounds[-1]["scores"], dtype=torch.bool))],
                             args.prompts_per_step * G, tok.pad_token_id)
    return batch, rounds, capped


def merge_rounds(kept, max_rows: int, pad_id: int):
    """Concatenate the kept rows of several sampling rounds into one batch of at most `max_rows`
    rows (whole groups, in order). kept: [(round dict, row mask [b] bool)]. Prompts stay
    left-padded and completions right-padded, to the longest of the rounds. None if nothing is kept."""
    parts = [(r, m.nonzero().squeeze(1)) for r, m in kept if bool(m.any())]
    if not parts:
        return None
    P = max(r["p_ids"].shape[1] for r, _ in parts)
    T = max(r["c_ids"].shape[1] for r, _ in parts)
    out = {k: [] for k in parts[0][0]}  # every field of a round
    for r, idx in parts:
        pp, tt = P - r["p_ids"].shape[1], T - r["c_ids"].shape[1]
        pad = torch.nn.functional.pad
        for k, v in r.items():
            if k in ("p_ids", "p_mask"):  # left-padded   [b, P]
                out[k].append(pad(v[idx], (pp, 0), value=pad_id if k == "p_ids" else 0))
            elif k in ("c_ids", "c_mask"):  # right-padded   [b, T]
                out[k].append(pad(v[idx], (0, tt), value=pad_id if k == "c_ids" else 0))
            elif isinstance(v, torch.Tensor):  # scores, shaped   [b]
                out[k].append(v[idx])
            else:  # finished, answers, texts: lists of b
                out[k].extend(v[i] for i in idx.tolist())
    batch = {k: (torch.cat(v)[:max_rows] if isinstance(v[0], torch.Tensor) else v[:max_rows])
             for k, v in out.items()}
    return batch


def process_rewards(tok, batch: dict) -> torch.Tensor:
    """--reward process: every completion token is a step, EOS included, rewarded 1 if it is the
    target's token at that position (the built-in task's `digit_step_rewards`).  -> [B, T]"""
    targets = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for a in batch["answers"]]
    return tasks.digit_step_rewards(batch["c_ids"], batch["c_mask"], targets)  # [B, T]


def frozen_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, T: int, args: Args, prec) -> torch.Tensor:
    """log π(y_t | x, y_<t) of a model that is not trained at this point (π_old, π_ref), without a
    gradient, in micro-batches of --micro-batch rows.  ids, mask: [B, P+T] -> [B, T]"""
    mb = args.micro_batch or ids.shape[0]
    with torch.no_grad(), prec.autocast():
        return torch.cat([common.token_logprobs(model, ids[i:i + mb], mask[i:i + mb], T, args.temperature)[0]
                          for i in range(0, ids.shape[0], mb)])  # [B, T]


def add_stats(stats: dict, loss, w, m: dict, ent, c_mask: torch.Tensor, n_tokens) -> None:
    """Accumulate one micro-batch's loss (weighted by its share `w` of the loss) and metrics (token
    means: weighted by its share of the tokens) into `stats`."""
    stats["loss"] = stats.get("loss", 0.0) + loss.item() * float(w)
    w_tok = float(c_mask.sum() / n_tokens)
    for k, v in m.items():
        stats[k] = stats.get(k, 0.0) + float(v) * w_tok
    if ent is not None:
        stats["entropy"] = stats.get("entropy", 0.0) + float(masked_mean(ent, c_mask)) * w_tok


def resume(ckpt, rng: np.random.Generator, opt, sched, prec) -> tuple:
    """--resume: the counters at the end of the checkpoint's step; the data RNG, the optimiser, the
    scheduler, the scaler and the global RNGs (last) as they were then."""
    values = tuple(ckpt.state[k] for k in ("start_acc", "start_pass", "acc", "final_pass", "total_generated",
                                           "capped_steps"))
    rng.bit_generator.state = ckpt.state["data_rng"]
    harness.restore_training_state(ckpt.state, opt, sched, prec)
    return values


class Evaluation:
    """Held-out greedy accuracy, and pass@1 / pass@G at the sampling temperature (a fixed seed)."""

    def __init__(self, policy, tok, heldout: list[dict], args: Args, strict: bool, prec):
        self.policy, self.tok, self.args, self.strict, self.prec = policy, tok, args, strict, prec
        self.heldout = heldout
        for r in heldout:
            r["text"] = tasks.chat_prompt(tok, r["prompt"], args.chat_template)  # messages: the chat template
        self.rows = [{"prompt": r["text"], "answer": r["answer"]} for r in heldout]

    def accuracy(self) -> float:
        with self.prec.autocast():
            return tasks.greedy_accuracy(self.policy, self.tok, self.rows, self.args.max_new_tokens, self.strict)

    def metrics(self) -> dict:
        """eval/accuracy; on long addition also the greedy answers' mean length, the share worked
        out and the accuracy of each format (`tasks.format_figures`)."""
        if self.args.task != "long-addition":
            return {"eval/accuracy": self.accuracy()}
        with self.prec.autocast():
            f = tasks.greedy_format_figures(self.policy, self.tok, self.rows, self.args.max_new_tokens, self.strict)
        return {"eval/accuracy": f.pop("accuracy"), **{f"eval/{k}": v for k, v in f.items()}}

    def pass_at_k(self) -> dict | None:
        if not self.args.pass_at_k:
            return None
        with self.prec.autocast():
            return tasks.pass_at_k(self.policy, self.tok, self.rows, self.args.group_size,
                                   self.args.max_new_tokens, self.strict, self.args.temperature)

    def start(self, log) -> tuple:
        """The start model's accuracy and pass@k, logged as step 0 and printed."""
        print(f"evaluating the start model on {len(self.rows)} held-out prompts …", flush=True)
        m, passed = self.metrics(), self.pass_at_k()
        acc = m["eval/accuracy"]
        log.log(0, {**m, **tasks.pass_metrics(passed)})
        print(f"held-out greedy accuracy before training: {acc:.3f} ({len(self.rows)} prompts)"
              + tasks.pass_text(passed))
        return acc, passed


def step_metrics(batch: dict, rounds: list[dict], capped: bool, first: dict, stats: dict, grad_norm: float,
                 opt, G: int, t0: float, t_gen: float) -> dict:
    """The metrics of one step (every step is written to metrics.jsonl). `first`: the stats of the
    first inner iteration, `stats`: of the last."""
    all_scores = torch.cat([r["scores"] for r in rounds])  # [generated] every completion of the step
    rewards, c_mask, generated = batch["scores"], batch["c_mask"], all_scores.shape[0]
    r_groups = all_scores.view(-1, G)  # [n, G] every group generated this step
    lengths, right = c_mask.sum(1).float(), rewards > 0  # |y_i|, r_i = 1 of the batch trained on   [B], [B]
    return {
        "reward/mean": float(all_scores.mean()),  # the task score of every completion generated
        "reward/std": float(all_scores.std()),
        "reward/frac_zero_std_groups": float((r_groups.std(1) == 0).float().mean()),
        "reward/batch_mean": float(rewards.mean()),  # of the completions trained on
        "reward/overlong_penalty": float((batch["shaped"] - rewards).mean()),
        "sampling/generations": generated,
        "sampling/rounds": len(rounds),
        "sampling/capped": float(capped),
        "loss/policy": first["loss"],
        "kl/ref": stats["kl"],
        "kl/estimate": stats["kl_estimate"],
        "policy/clip_frac": stats["clip_frac"],
        "policy/clip_frac_low": stats["clip_frac_low"],
        "policy/clip_frac_high": stats["clip_frac_high"],
        "policy/ratio_mean": stats["ratio_mean"],
        "policy/entropy": first["entropy"],
        "policy/grad_norm": float(grad_norm),
        "charts/lr": opt.param_groups[0]["lr"],
        "completions/mean_length": float(c_mask.sum(1).float().mean()),
        # mean |y| of the right and of the wrong completions (Dr. GRPO's length bias shows in
        # the wrong ones); None when the batch has no completion of that kind
        "completions/len_correct": float(lengths[right].mean()) if right.any() else None,
        "completions/len_incorrect": float(lengths[~right].mean()) if (~right).any() else None,
        "completions/no_eos_frac": 1.0 - float(np.mean(batch["finished"])),
        "time/step_seconds": time.time() - t0,
        "time/generate_seconds": t_gen,
        "charts/completions_per_second": generated / (time.time() - t0),
    }


def worked_metrics(args: Args, batch: dict) -> dict:
    """--task long-addition: `tasks.format_figures` of the step's samples (the batch trained on):
    the share worked out, and the reward of each format, under completions/; other tasks: {}."""
    if args.task != "long-addition":
        return {}
    lengths = batch["c_mask"].sum(1)  # |y_i|, EOS included   [B]
    f = tasks.format_figures(batch["texts"], batch["scores"].tolist(), lengths.tolist())
    return {"completions/worked_frac": f["worked_frac"], "completions/reward_worked": f["accuracy_worked"],
            "completions/reward_direct": f["accuracy_direct"]}


def printed_keys(args: Args) -> list[str]:
    """The metrics of the printed line (every metric goes to metrics.jsonl)."""
    keys = ["reward/mean", "reward/frac_zero_std_groups", "kl/ref", "policy/clip_frac",
            "policy/entropy", "completions/mean_length", "eval/accuracy"]
    if args.dynamic_sampling:
        keys.insert(2, "sampling/generations")
    if args.task == "long-addition":
        keys.insert(-1, "completions/worked_frac")
    return keys


def summarise(policy, tok, out, log, evaluate: Evaluation, args: Args, device, prec, figures: dict,
              t_start: float, train_seconds: float, load_seconds: float) -> dict:
    """Save the final policy, write summary.json and print the before/after summary."""
    model_dir = harness.save_policy(policy, tok, out, args.save_model)
    examples = evaluate.heldout[:4]
    with prec.autocast():
        *_, ex_texts, _ = common.generate_text(policy, tok, [r["text"] for r in examples],
                                               args.max_new_tokens, greedy=True)
    start_acc, acc = figures["start_accuracy"], figures["final_accuracy"]
    start_pass, final_pass = figures["start_pass_at_k"], figures["final_pass_at_k"]
    summary = log.summary({
        "script": "grpo",
        "start_accuracy": start_acc,
        "final_accuracy": acc,
        "start_pass_at_k": start_pass,  # {"k", "pass_at_1", "pass_at_k"} or None
        "final_pass_at_k": final_pass,
        "steps": args.steps,
        "completions": figures["completions"],  # every completion sampled (more with --dynamic-sampling)
        "completions_per_step": figures["completions"] / args.steps,
        "sample_rounds_capped_steps": figures["sample_rounds_capped_steps"],
        "model_dir": model_dir,
        **harness.run_facts(args, device, t_start, train_seconds, load_seconds),
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
    harness.main(Args, train, __doc__)
