"""REINFORCE: the policy gradient itself, with every Ψ_t of the notes, on a verifiable task (RLVR).

Notes: `000_e75205f5b80b652d.txt` and `001_f61164bbf1e6de76.txt`, "Policy gradient" (the
log-derivative trick, the estimator ĝ, and the loss with "THERE IS NO MEANING");
`002_53ad65790e79eb4c.txt` §4.4, "Variants of the Basic Policy Gradient" (the choices of Ψ_t);
`004_e77bb721393eb42b.txt`, "Policy Gradient Algorithm" (reward-to-go by causality, "Why is the
Baseline Unbiased?"), "REINFORCE" (its variance), and "PPO's Advantage Estimator" (the per-token
RLHF reward with the sequence's reward added at the terminal token).

State s_t = the prompt x and the tokens generated so far y_<t; action a_t = the next token y_t; the
episode ends with EOS (or at --max-new-tokens). Every token earns a reward:

    r_t = −β (log π_θ(y_t|s_t) − log π_ref(y_t|s_t))      on every completion token (KL shaping)
        + score(x, y)                                     on the last completion token only

The task's score (1 if the answer is exactly right, else 0) lands on the LAST completion token,
t = |y| − 1: the EOS when there is one, i.e. the action that ends the episode, since the score
depends on the whole of y. A completion cut off at the token limit has no EOS and scores 0, so
only its KL terms remain. The KL terms are rewards like any other: computed from the sampled
tokens, with no gradient through them. The estimator stays unbiased for ∇(−β·KL) all the same:
the term this leaves out, −β·E[∇log π], is 0 (the argument of "Why is the Baseline Unbiased?").

    for step = 1 .. steps:
        draw `prompts_per_step` prompts x; sample K completions y ~ π_θ(·|x) of each       (KV cache)
        r_t as above (π_ref is loaded and run only when β > 0)                             [B, T]
        G_t  = Σ_{k=t}^{|y|−1} γ^{k−t} r_k                  reward-to-go
        R(τ) = Σ_t γ^t r_t = G_0                            return
        Ψ_t  = R(τ) − b   (--psi return)   or   G_t − b   (--psi reward-to-go)
               b = 0 (--baseline none),  mean of R over the batch (mean),
                   or (Σ_j R_j − R_i)/(K−1) over the K samples of the same prompt (rloo),
                   or b(s_t) = V_ψ(s_t), a learned value of the state (value; reward-to-go only)
        L    = −1/|D| Σ_τ Σ_t log π_θ(a_t|s_t) Ψ_t            the pseudo-loss: ∇_θ L = −ĝ
        L_V  = mean_t (V_ψ(s_t) − G_t)²                       (value only: the critic's MSE)
        θ ← θ − lr ∇_θ L;   ψ ← ψ − value_lr ∇_ψ L_V                                     (AdamW)
        every `eval_every` steps: held-out greedy accuracy

γ, the discount. The episode is at most --max-new-tokens long, so γ = 1 (the default, the notes'
finite-horizon return) is well defined, and then `return` and `reward-to-go` have the same
expected gradient: the terms they differ by, ∇log π(a_t|s_t)·r_k for k < t, average to 0
(causality). With γ < 1, the score reaches token t only as γ^{|y|−1−t}·score, so early tokens of
long answers get less credit; and the two Ψ no longer estimate the same thing: `return` is the
unbiased gradient of J_γ = E[Σ_t γ^t r_t], while G_t as the notes write it (and as most code does)
drops the factor γ^t that ∇J_γ puts on step t (Thomas, 2014; Nota and Thomas, 2020).

Variance. Every Ψ_t above gives the same expected gradient (the batch mean up to a factor
(1 − 1/B), since b then includes each sample's own return); they differ in the variance of ĝ.
Each step logs `policy/grad_var`, an estimate of tr Cov(ĝ) from the gradients of the two halves of
the batch (nearly free: the backward pass is only split in two), and `psi/second_moment`, E[Ψ²].
E[Ψ²] is the usual cheap proxy, but tr Cov(ĝ) = (E‖Σ_t ∇log π(a_t|s_t) Ψ_t‖² − ‖∇J‖²)/|D|
(independent samples), which E[Ψ²] tracks only when ‖∇log π‖ does not depend on Ψ. Here it does: wrong answers tend to contain unlikely tokens, whose
‖∇log π‖ is large, and with a 0/1 score `return` gives them Ψ = 0 while a baseline gives them −b.
So a baseline can lower E[Ψ²] and raise tr Cov(ĝ); bench/bench_reinforce.py measures both.

The learned baseline (--baseline value): b(s_t) = V_ψ(s_t), the notes' "reward-to-go minus a
baseline b(s_t)" with the baseline that 004 names, "typically the state-value function V(s_t)";
REINFORCE with a learned baseline, or the A2C critic fitted to Monte Carlo targets (no
bootstrapping). The choices, the plainest and cheapest that work on a CPU:
  - V_ψ(s_t) = w·h_t + c, a linear head on the policy's final hidden state h_t at the column that
    chooses y_t (the state s_t = (x, y_<t)), read by one extra forward pass without gradient. The
    features are detached: the critic's loss never moves θ, and ψ = (w, c) is d + 1 numbers, not a
    second LM (ppo.py's value model is a whole LM; that is the other choice).
  - the target is G_t, by MSE: L_V = mean over completion tokens of (V_ψ(s_t) − G_t)² (notes 000,
    L_VF; 004, "an MSE loss with the actual return"), with no ½.
  - V is read BEFORE this step's ψ update, so V(s_t) depends on s_t and on earlier batches only,
    never on a_t or on the sample's own G_t: E[∇log π(a_t|s_t) V(s_t)] = 0 and ĝ stays unbiased
    (fitting first and then subtracting would leak each sample's own return into its baseline).
  - ψ starts at 0 (V = 0, so step 1 is plain reward-to-go), stays float32, and is stepped by the
    same AdamW as θ, in its own parameter group with --value-lr, under the same schedule, its
    gradient norm clipped on its own.
  - only with --psi reward-to-go: V is fitted to G_t, and R(τ) − V(s_t), though unbiased too,
    would subtract an estimate of a different quantity (R(τ) = Σ_{k<t} γ^k r_k + γ^t G_t).

Run:
    python reinforce.py                                  # embedded `tiny` model, arithmetic, CPU, minutes
    python reinforce.py --psi return --baseline none     # the notes' basic policy gradient, Ψ = R(τ)
    python reinforce.py --baseline mean                  # reward-to-go minus the batch mean
    python reinforce.py --baseline value                 # reward-to-go minus a learned V_ψ(s_t)
    python reinforce.py --beta 0                         # no KL shaping, no reference model
    python reinforce.py --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --chat-template \\
        --max-new-tokens 256 --prompts-per-step 8 --samples-per-prompt 8 --lr 1e-6 \\
        --micro-batch 16 --no-grad-var                   # one GPU
    python reinforce.py --save-every 100 --out-dir runs/x  # a checkpoint every 100 steps; stopped by
    python reinforce.py --resume runs/x                    # Ctrl-C, it goes on from the last one
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

import common
import harness
import tasks
from common import check, masked_mean, masked_sum

PSI = ("return", "reward-to-go")
BASELINES = ("none", "mean", "rloo", "value")


@dataclass
class Args:
    model: str = "tiny"
    """--model NAME_OR_PATH: a Hugging Face causal LM folder (or hub name, if cached), or `tiny`,
    the embedded default (the folder models/tiny)"""
    data: Optional[str] = None
    """JSONL file with {"prompt", "answer"} lines (the prompt a string, or a list of {"role",
    "content"} messages, rendered with the chat template), or GSM8K as published ({"question",
    "answer": "<solution> #### 72"}: the number after ####), scored by the last number in the
    completion; default: the built-in arithmetic task, scored strictly"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (for instruct models)"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the final model; default
    runs/reinforce__s<seed>__<time>"""
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
    in float32 (`harness.freeze`), so that π_θ = π_ref exactly at step 0"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass instead of keeping them, in
    the policy: activation memory of one layer instead of all, for about one more forward
    pass per backward; the same gradients up to float rounding (TRL: gradient_checkpointing)"""

    psi: Literal["return", "reward-to-go"] = "reward-to-go"
    """Ψ_t, what multiplies ∇log π(a_t|s_t) (notes 002 §4.4): `return` (the whole R(τ), the same
    for every token) or `reward-to-go` (G_t, the rewards from t on)"""
    baseline: Literal["none", "mean", "rloo", "value"] = "rloo"
    """b, subtracted from Ψ_t: `none`, `mean` (the batch mean of R(τ)), `rloo` (the mean R(τ)
    of the other K−1 samples of the same prompt; needs K ≥ 2), or `value` (b(s_t) = V_ψ(s_t), a
    linear head on the policy's hidden state fitted by MSE to G_t; with --psi reward-to-go only)"""
    value_lr: float = 3e-2
    """learning rate of the value head V_ψ (--baseline value only), in AdamW beside θ, under the
    same warm-up and schedule; the head is d + 1 numbers on fixed features, so it takes a far larger
    rate than the LM (tiny, 150 steps: 1e-2..1e-1 fitted about equally well, 1e-3 and 3e-1 worse)"""
    gamma: float = 1.0
    """γ, the discount in G_t and R(τ), in [0, 1]; 1 is the finite-horizon return (the episode ends
    within --max-new-tokens), < 1 discounts the score for the early tokens of long answers"""
    beta: float = 0.05
    """β, the weight of the per-token KL penalty r_t = −β(log π − log π_ref) (RLHF uses 0.01..0.1);
    0 skips the reference model entirely (TRL: beta; older RLOOConfig: kl_coef)"""

    steps: int = 500
    """number of REINFORCE steps (each: generate, score, one optimiser step) (TRL: max_steps)"""
    prompts_per_step: int = 16
    """prompts x per step; the batch D holds prompts_per_step × K completions (TRL counts the batch
    in completions: prompts_per_step × num_generations)"""
    samples_per_prompt: int = 8
    """K, completions sampled per prompt (≥ 2 for --baseline rloo; the RLOO paper uses 2..4)
    (TRL: num_generations; older RLOOConfig: rloo_k)"""
    max_new_tokens: int = 4
    """completion token limit (4 fits a 3-digit sum and EOS; ~256+ for GSM8K) (TRL:
    max_completion_length; older RLOOConfig: response_length)"""
    temperature: float = 1.0
    """sampling temperature; log-probs (and the KL) are taken of the same tempered distribution
    (TRL: temperature)"""
    lr: float = 3e-4
    """peak learning rate of AdamW (tiny: 3e-4; 1e-3 first drops its accuracy, or collapses it
    into completions that never end; a 0.5B model: ~1e-6) (TRL: learning_rate)"""
    warmup_steps: int = 20
    """steps of linear learning-rate warm-up from 0 (Adam's first steps are sign-like and large)
    (TRL: warmup_steps)"""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """after warm-up: keep the rate (constant) or decay it linearly to 0 at the last step (linear)
    (TRL: lr_scheduler_type)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 disables) (TRL: max_grad_norm)"""
    micro_batch: Optional[int] = None
    """completions per forward/backward pass (gradient accumulation); default: the whole batch"""
    grad_var: bool = True
    """estimate tr Cov(ĝ) each step from the gradients of the two halves of the batch (keeps one
    extra copy of the gradient; --no-grad-var on big models)"""

    eval_every: int = 100
    """steps between held-out greedy evaluations (TRL: eval_steps)"""
    eval_size: int = 500
    """held-out prompts per evaluation"""
    pass_at_k: bool = True
    """before and after training, also measure pass@1 and pass@k on the held-out prompts, with k = K
    samples per prompt at --temperature: what sampling can reach, which RL can then reinforce"""
    log_every: int = 50
    """steps between printed lines (every step is written to metrics.jsonl)"""
    save_model: bool = True
    """save the final policy with save_pretrained into <out-dir>/model"""
    save_every: int = 0
    """steps between checkpoints, <out-dir>/checkpoint-<step>/: the policy (save_pretrained), the
    value head, the optimiser, the scheduler, the RNG states and the step, all that --resume needs
    to continue exactly; 0: none (TRL: save_steps)"""
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
    ModelConfig: 16); π_ref (--beta > 0) is the base with the adapters off, not a second copy; the value
    head (--baseline value) is trained whole; <out-dir>/model holds the adapter as peft saves it
    (AutoPeftModelForCausalLM loads it) (TRL: peft_config)"""
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
#####  the maths: rewards, Ψ_t and the pseudo-loss (pure functions, no state, only torch)
#####################################################################################################


def per_token_rewards(scores: torch.Tensor, mask: torch.Tensor, log_ratio: torch.Tensor | None = None,
                      beta: float = 0.0) -> torch.Tensor:
    """The reward of every completion token (notes 004, "PPO's Advantage Estimator").  -> [B, T]

    scores: [B], the task's score of each completion. mask: [B, T], 1 on completion tokens up to and
    including the first EOS. log_ratio: [B, T], log π_θ(y_t|s_t) − log π_ref(y_t|s_t) of the sampled
    tokens (no gradient), or None when β = 0.
        r_t  = −β (log π_θ(y_t|s_t) − log π_ref(y_t|s_t))       for t < |y|
        r_t += score(x, y)                                      at t = |y| − 1 (the EOS, if any)
    Positions outside the mask are 0.
    """
    mask = mask.bool()
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)  # [B, T]
    if log_ratio is not None and beta != 0.0:
        rewards = -beta * log_ratio.detach().to(scores.dtype)  # r_t = −β log(π/π_ref)   [B, T]
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))  # [B, T]
    last = (mask.sum(dim=1) - 1).clamp(min=0)  # index of the last completion token   [B]
    rewards[torch.arange(len(scores), device=scores.device), last] += scores  # + score at |y|−1
    return rewards  # [B, T]


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{k=t}^{T−1} γ^{k−t} r_k, the discounted rewards from t on (notes 004, "REINFORCE";
    002 §4.4, "Reward-to-Go").  rewards, mask: [B, T] -> [B, T], 0 where mask is 0.

    Rewards outside the mask are ignored. G_0 is the return R(τ) = Σ_t γ^t r_t. For example, one
    row r = [1, 2, 3] with mask [1, 1, 0]: γ = 1 gives [3, 2, 0]; γ = 0.5 gives [2, 2, 0].
    """
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))  # [B, T]
    G = torch.zeros_like(r)  # [B, T]
    running = torch.zeros_like(r[:, 0])  # G_{t+1}   [B]
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running  # G_t = r_t + γ G_{t+1}   [B]
        G[:, t] = running
    return torch.where(mask.bool(), G, torch.zeros_like(G))  # [B, T]


def rloo_baseline(rewards: torch.Tensor, k: int | None) -> torch.Tensor:
    """Leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024): for each sample, the mean
    reward of the other K−1 samples of the same prompt.  rewards: [B], one number per sample (this
    script passes the returns R(τ)), B = n_prompts × K with the K samples of a prompt consecutive.
        b_i = (Σ_j r_j − r_i) / (K − 1)                                                     -> [B]
    b_i does not depend on sample i at all, so it is a baseline in the notes' sense (it does not
    depend on the action) and E[∇log π · b_i] = 0 exactly. [1, 0, 0, 0] -> [0, 1/3, 1/3, 1/3].
    """
    if k is None or k < 2:
        raise ValueError(f"the leave-one-out baseline needs K ≥ 2 samples per prompt (got {k})")
    if rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of K = {k}")
    r = rewards.view(-1, k)  # [n, K]
    b = (r.sum(dim=1, keepdim=True) - r) / (k - 1)  # b_i = (Σ_j r_j − r_i) / (K − 1)   [n, K]
    return b.reshape(-1)  # [B]


def psi_values(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, psi: str = "reward-to-go",
               baseline: str = "none", k: int | None = None,
               values: torch.Tensor | None = None) -> torch.Tensor:
    """Ψ_t, the weight of ∇log π(a_t|s_t) in ĝ (notes 002 §4.4).  rewards, mask: [B, T] -> [B, T]

        psi="return":        Ψ_t = R(τ) − b  for every t, R(τ) = Σ_t γ^t r_t = G_0
        psi="reward-to-go":  Ψ_t = G_t − b
        baseline="none": b = 0;  "mean": b = mean_j R_j over the whole batch;
        "rloo": b_i = (Σ_{j in i's group} R_j − R_i)/(K−1), groups of K consecutive rows;
        "value": b(s_t) = V(s_t), `values` [B, T] (detached here: Ψ is a constant), reward-to-go only
    The first three are one number per completion, computed from returns, and subtracted at every
    token; "value" is one number per token. Positions outside the mask are 0.
    """
    G = reward_to_go(rewards, mask, gamma)  # G_t   [B, T]
    R = G[:, 0]  # R(τ) = G_0   [B]
    if baseline == "value":
        if psi != "reward-to-go":
            raise ValueError("the value baseline V(s_t) is fitted to the reward-to-go G_t, so it pairs "
                             f"with psi='reward-to-go' only (got psi={psi!r})")
        if values is None or values.shape != G.shape:
            raise ValueError(f"baseline='value' needs values V(s_t) of shape {tuple(G.shape)} "
                             f"(got {None if values is None else tuple(values.shape)})")
        out = G - values.detach().to(G.dtype)  # Ψ_t = G_t − V(s_t)   [B, T]
        return torch.where(mask.bool(), out, torch.zeros_like(out))  # [B, T]
    if psi == "return":
        out = R.unsqueeze(1).expand_as(G)  # Ψ_t = R(τ)   [B, T]
    elif psi == "reward-to-go":
        out = G  # Ψ_t = G_t   [B, T]
    else:
        raise ValueError(f"unknown psi {psi!r}: expected one of {', '.join(PSI)}")
    if baseline == "mean":
        b = R.mean().expand_as(R)  # b = 1/B Σ_j R_j   [B]
    elif baseline == "rloo":
        b = rloo_baseline(R, k)  # b_i = (Σ_j R_j − R_i)/(K−1)   [B]
    elif baseline == "none":
        b = torch.zeros_like(R)  # [B]
    else:
        raise ValueError(f"unknown baseline {baseline!r}: expected one of {', '.join(BASELINES)}")
    out = out - b.unsqueeze(1)  # Ψ_t − b   [B, T]
    return torch.where(mask.bool(), out, torch.zeros_like(out))  # [B, T]


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The critic's regression (notes 000, L_VF = E_s[(V_φ(s) − R(s))²]; 004, "an MSE loss with the
    actual return"), over the completion tokens:
        L_V = Σ_t m_t (V_ψ(s_t) − G_t)² / Σ_t m_t
    values: [B, T], V_ψ(s_t) with gradient; returns: [B, T], G_t (a target: no gradient); mask:
    [B, T]. No ½ (the notes have none; ppo.py's clipped loss has the ½ of OpenAI's code).
    """
    err = (values - returns.detach()) ** 2  # (V_ψ(s_t) − G_t)²   [B, T]
    return masked_mean(err, mask)  # mean over completion tokens


def reinforce_loss(logp: torch.Tensor, psi: torch.Tensor, mask: torch.Tensor):
    """The policy-gradient pseudo-loss (notes 000/001, "Policy gradient"; its sign flipped, to
    minimise):
        L = −1/|D| Σ_{τ∈D} Σ_t log π_θ(a_t|s_t) Ψ_t,      so that   −∇_θ L = ĝ
    logp: [B, T], log π_θ of the sampled tokens (with gradient); psi: [B, T], Ψ_t (treated as a
    constant); mask: [B, T]. |D| = B, the number of completions.

    Which normaliser. `000` writes ĝ = 1/|D| Σ_τ Σ_t (a sum over each trajectory's steps, a mean over
    trajectories), `004` writes ĝ = Ê_t[...] (a mean over all the batch's timesteps, which is
    1/Σ_τ|τ| Σ_τ Σ_t). The code takes `000`'s: it is the unbiased estimate of ∇J = E_τ[Σ_t ...].
    `004`'s Ê_t differs by the factor |D|/Σ_τ|τ|: within a batch the same direction, but a step
    that shrinks when the batch's completions are long; it is PPO's token mean (ppo.py) and DAPO's
    `token-mean` (grpo.py).

    THERE IS NO MEANING in the value of L (the notes' warning): it is not a performance measure,
    it changes when a baseline is subtracted although the expected gradient does not, and it can
    fall while the policy gets worse. Only its gradient, the estimator ĝ, means anything.
    Returns (loss, metrics): E[Ψ] and E[Ψ²] over the completion tokens (detached).
    """
    psi = psi.detach()  # Ψ is a number given by the samples, not a function of θ   [B, T]
    per_seq = masked_sum(logp * psi, mask, dim=1)  # Σ_t log π(a_t|s_t) Ψ_t   [B]
    loss = -per_seq.mean()  # −1/|D| Σ_τ, 000's normaliser (not 004's Ê_t; see above); its value means nothing
    with torch.no_grad():
        metrics = {"psi_mean": masked_mean(psi, mask), "psi_second_moment": masked_mean(psi ** 2, mask)}
    return loss, metrics


def split_half_variance(g1: torch.Tensor, g2: torch.Tensor, n1: int, n2: int) -> float:
    """tr Cov(ĝ) of the full-batch estimator ĝ = (n1 ĝ_1 + n2 ĝ_2)/n, from the estimates ĝ_1, ĝ_2
    of two disjoint parts of n1 and n2 independent prompts (flat vectors).
        Cov(ĝ_j) = Σ/n_j  =>  E‖ĝ_1 − ĝ_2‖² = tr Σ (1/n1 + 1/n2),   tr Cov(ĝ) = tr Σ / n
        =>  tr Cov(ĝ) ≈ ‖ĝ_1 − ĝ_2‖² · n1 n2 / n²          (n1 = n2: ‖ĝ_1 − ĝ_2‖² / 4)
    One step gives an unbiased but noisy estimate; average it over steps.
    """
    n = n1 + n2
    return float(((g1 - g2) ** 2).sum()) * n1 * n2 / n ** 2


#####################################################################################################
#####  the learned baseline: a linear value head on the policy's hidden state
#####################################################################################################


@torch.no_grad()
def state_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   n_completion: int) -> torch.Tensor:
    """h_t, the final hidden state of the column that chooses y_t (state s_t = (x, y_<t)), for the
    last n_completion tokens; no gradient, so the critic never moves the policy.  -> [B, T, d]

    input_ids, attention_mask: [B, L] = [left-padded prompt | right-padded completion]. The column
    before y_t is the one whose logits predict y_t, so h_t lines up with `common.token_logprobs`.
    Position ids come from the attention mask, as there. Rows at padding are finite and meaningless.
    """
    T = n_completion
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    h = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # [B, L, d]
    return h[:, -(T + 1):-1].float()  # h_t for y_1..y_T, in float32   [B, T, d]


def value_head(d: int, device) -> torch.nn.Linear:
    """V_ψ(s_t) = w·h_t + c, float32, started at 0 (V = 0: the first step is plain reward-to-go).
    skip_init draws no random numbers, so a seed samples the same completions for every baseline."""
    head = torch.nn.utils.skip_init(torch.nn.Linear, d, 1, device=device, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


#####################################################################################################
#####  training
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
    check(args.psi in PSI, f"--psi {args.psi!r}: expected one of {', '.join(PSI)}")
    check(args.baseline in BASELINES, f"--baseline {args.baseline!r}: expected one of {', '.join(BASELINES)}")
    check(args.baseline != "rloo" or args.samples_per_prompt >= 2,
          f"--samples-per-prompt (K) must be ≥ 2 with --baseline rloo (got {args.samples_per_prompt}): "
          "the leave-one-out baseline of a sample is the mean return of the other K−1")
    check(args.baseline != "value" or args.psi == "reward-to-go",
          f"--baseline value needs --psi reward-to-go (got --psi {args.psi}): V(s_t) is fitted to the "
          "reward-to-go G_t, so R(τ) − V(s_t) would subtract an estimate of a different quantity")
    check(args.value_lr > 0, f"--value-lr must be > 0 (got {args.value_lr})")
    check(0.0 <= args.gamma <= 1.0, f"--gamma must be in [0, 1] (got {args.gamma}): it is a discount")
    check(args.beta >= 0, f"--beta must be ≥ 0 (got {args.beta}): it weights a KL penalty")
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "eval_every",
                 "eval_size", "log_every"):
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(args, name)})")
    check(args.temperature > 0, f"--temperature must be > 0 (got {args.temperature})")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.lr_schedule in ("constant", "linear"),
          f"--lr-schedule {args.lr_schedule!r}: expected constant or linear")
    check(args.grad_clip >= 0, f"--grad-clip must be ≥ 0 (got {args.grad_clip}; 0 disables it)")
    check(args.micro_batch is None or args.micro_batch >= 1, "--micro-batch must be ≥ 1")
    harness.check_lr(args.lr)
    harness.check_lr(args.value_lr, "--value-lr")
    harness.check_idle_flags(args, {"value_lr": (args.baseline == "value", "without --baseline value")})


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """The accumulated .grad of `params` as one float32 vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


def train(args: Args) -> dict:
    args, ckpt = harness.resume_run(args)  # --resume RUN_DIR: the run's own config and last checkpoint
    validate(args)
    t_start = time.time()
    harness.seed_everything(args.seed)
    device = harness.pick_device(args.device)
    prec = harness.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    train_rows, heldout = tasks.load_task(args.data)
    heldout = heldout[: args.eval_size]
    strict = args.data is None  # the built-in task is scored strictly, a --data file by its last number

    ##### models: the policy π_θ, the frozen reference π_ref (β > 0 only), V_ψ (--baseline value only)
    policy, ref, tok = load_models(args, ckpt, device, prec)
    tasks.check_chat_template(tok, args.model, args.chat_template, train_rows + heldout)
    # every prompt + --max-new-tokens within the model's positions (row i of train + held out: line of --data)
    tasks.check_context(tok, policy, [tasks.chat_prompt(tok, r["prompt"], args.chat_template)
                                      for r in train_rows + heldout], args.max_new_tokens, args.data)
    params = [p for p in policy.parameters() if p.requires_grad]
    head = new_value_head(policy, ckpt, device) if args.baseline == "value" else None  # V_ψ(s_t), or None
    groups = [{"params": params}] + ([] if head is None else [{"params": list(head.parameters()),
                                                               "lr": args.value_lr}])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)  # the schedule scales both groups
    harness.set_threads(args.threads, device, policy)  # CPU: 1 thread for a small model (see --threads)
    # the run folder is made only once the flags, the data and the model have all been accepted
    out = harness.prepare_run_dir(args.out_dir or harness.default_run_dir("reinforce", args.seed),
                                 args.overwrite, resume=ckpt)
    sched = harness.lr_scheduler(opt, args.warmup_steps, args.steps, args.lr_schedule)  # harness.lr_factor
    load_seconds = time.time() - t_start
    evaluate, evaluate_pass_at_k = evaluators(policy, tok, heldout, args, strict, prec)
    log = harness.RunLogger(out, total_steps=args.steps)
    print_header(out, device, prec, args, policy, ref)
    rng = np.random.default_rng(args.seed)  # the prompts of each step
    if ckpt is None:  # the start model, at step 0
        start_acc, start_pass = evaluate_start(evaluate, evaluate_pass_at_k, log, len(heldout))
        acc, final_pass = start_acc, None
    else:  # --resume: the figures of the run so far, and the state at the end of the checkpoint's step
        start_acc, start_pass, acc, final_pass = resume(ckpt, rng, opt, sched, prec)

    K, n = args.samples_per_prompt, args.prompts_per_step
    B = n * K
    mb = args.micro_batch or B
    chunks = [slice(i, i + mb) for i in range(0, B, mb)]  # the micro-batches of the passes without gradient
    parts = split_halves(n, K, args.grad_var)  # row ranges whose gradients ĝ_1, ĝ_2 give policy/grad_var
    t_train = time.time()
    for step in range((ckpt.step if ckpt else 0) + 1, args.steps + 1):
        t0 = time.time()
        ##### 1. sample K completions of each prompt from π_θ
        rows = [train_rows[i] for i in rng.choice(len(train_rows), n, replace=n > len(train_rows))]
        prompts = [tasks.chat_prompt(tok, r["prompt"], args.chat_template)
                   for r in rows for _ in range(K)]  # the K samples of x are consecutive
        answers = [r["answer"] for r in rows for _ in range(K)]
        with prec.autocast():
            p_ids, p_mask, c_ids, c_mask, texts, finished = common.generate_text(
                policy, tok, prompts, args.max_new_tokens, args.temperature)  # c_ids, c_mask: [B, T]
        t_gen = time.time() - t0
        ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
        T = c_ids.shape[1]

        ##### 2. per-token rewards r_t and Ψ_t (no gradient)
        scores = torch.tensor([tasks.score(c, a, f, strict, tok)  # scored from the ids, as generated
                               for c, a, f in zip(c_ids.tolist(), answers, finished)],
                              device=device)  # [B]
        log_ratio = None
        if ref is not None:
            with torch.no_grad(), prec.autocast():
                logp_s = torch.cat([common.token_logprobs(policy, ids[c], mask[c], T, args.temperature)[0]
                                    for c in chunks])  # log π_θ(y_t|s_t)   [B, T]
                ref_logp = torch.cat([common.token_logprobs(ref, ids[c], mask[c], T, args.temperature)[0]
                                      for c in chunks])  # log π_ref(y_t|s_t)   [B, T]
            log_ratio = logp_s - ref_logp  # log(π_θ/π_ref), the per-token KL sample (k1)   [B, T]
        rewards = per_token_rewards(scores, c_mask, log_ratio, args.beta)  # r_t   [B, T]
        values, v_stats = (None, {}) if head is None else value_baseline(  # V_ψ(s_t), and ∇_ψ L_V
            head, policy, ids, mask, T, chunks, rewards, c_mask, args.gamma, prec)  # [B, T]
        psi = psi_values(rewards, c_mask, args.gamma, args.psi, args.baseline, K, values)  # Ψ_t   [B, T]

        ##### 3. ĝ = −∇L, accumulated over micro-batches, part by part
        stats = {"loss": 0.0, "psi_mean": 0.0, "psi_second_moment": 0.0, "entropy": 0.0}
        n_tokens = c_mask.sum()
        part_grads = []
        for lo, hi in parts:
            for i in range(lo, hi, mb):
                sl = slice(i, min(i + mb, hi))
                with prec.autocast():
                    logp, ent = common.token_logprobs(policy, ids[sl], mask[sl], T, args.temperature,
                                                      with_entropy=True)  # log π_θ(a_t|s_t), H_t   [b, T]
                loss, m = reinforce_loss(logp, psi[sl], c_mask[sl])
                w = logp.shape[0] / B  # this micro-batch's share of 1/|D| Σ_τ
                prec.backward(loss * w)
                stats["loss"] += loss.item() * w
                w_tok = float(c_mask[sl].sum() / n_tokens)  # token-mean metrics, weighted by tokens
                stats["psi_mean"] += float(m["psi_mean"]) * w_tok
                stats["psi_second_moment"] += float(m["psi_second_moment"]) * w_tok
                stats["entropy"] += float(masked_mean(ent, c_mask[sl])) * w_tok
            if len(parts) == 2:  # the split-half probe: the gradient so far, (n1/n) ĝ_1 and then ĝ
                part_grads.append(flat_grad(params) / prec.grad_scale())
        grad_var = split_half_grad_var(part_grads, parts, K)  # ≈ tr Cov(ĝ), or None
        prec.unscale_(opt)  # float16 only: .grad back to the true gradient, before clipping
        grad_norm = common.clip_grad_norm(params, args.grad_clip)  # g ← g·min(1, c/‖g‖)
        if head is not None:  # θ and ψ clipped each on its own, one AdamW step for both
            v_stats["value/grad_norm"] = common.clip_grad_norm(head.parameters(), args.grad_clip)
        prec.step(opt)  # AdamW: θ ← θ − lr·Adam(g)
        opt.zero_grad(set_to_none=True)
        sched.step()

        ##### 4. log
        metrics = step_metrics(scores, rewards, c_mask, finished, log_ratio, stats, grad_norm, grad_var,
                               v_stats, opt.param_groups[0]["lr"], args.gamma, K, t0, t_gen)
        if step % args.eval_every == 0 or step == args.steps:
            acc = metrics["eval/accuracy"] = evaluate()
        if step == args.steps:
            final_pass = evaluate_pass_at_k()
            metrics.update(tasks.pass_metrics(final_pass))
        keys = ["reward/mean", "kl/ref", "psi/second_moment", "policy/grad_var", "policy/entropy",
                "value/explained_variance", "completions/mean_length", "eval/accuracy"]
        log.log(step, metrics, keys if (step % args.log_every == 0 or step == args.steps
                                        or "eval/accuracy" in metrics) else [])
        if args.save_every and step % args.save_every == 0:  ##### --save-every: what step + 1 needs
            save_checkpoint(out, step, args, policy, head, tok, opt, sched, prec, rng,
                            start_acc=start_acc, start_pass=start_pass, acc=acc, final_pass=final_pass)

    ##### 5. save and summarise
    train_seconds = time.time() - t_train
    model_dir = save_models(policy, head, tok, out, args.save_model)  # <out-dir>/model (+ value_head.pt)
    return summarise(log, out, args, policy, tok, heldout, prec, model_dir, start_acc, acc, start_pass,
                     final_pass, device, t_start, train_seconds, load_seconds)


#####################################################################################################
#####  beside the default path: the value baseline, the variance probe (a diagnostic), resume, saving
#####################################################################################################


def new_value_head(policy, ckpt, device) -> torch.nn.Linear:
    """V_ψ for --baseline value: a float32 linear head on the policy's detached hidden state, at 0,
    or with the checkpoint's weights on --resume."""
    head = value_head(policy.config.hidden_size, device)
    if ckpt:
        harness.load_weights(head, ckpt.path / "value_head.pt")
    return head


def value_baseline(head, policy, ids, mask, T: int, chunks: list[slice], rewards, c_mask, gamma: float,
                   prec) -> tuple[torch.Tensor, dict]:
    """--baseline value: V_ψ(s_t) with the head as it is BEFORE this step (so Ψ stays unbiased), and
    the gradient of the critic's MSE to G_t, which lands on ψ alone (the features are detached).
    ids, mask: [B, P+T]; rewards, c_mask: [B, T].  -> (values [B, T], the value/ metrics)."""
    with prec.autocast():
        lm = harness.unwrap(policy)  # --lora-r: the transformers model inside peft's, adapters on
        feats = torch.cat([state_features(lm, ids[c], mask[c], T) for c in chunks])  # h_t   [B, T, d]
    values = head(feats).squeeze(-1)  # V_ψ(s_t) = w·h_t + c (float32, grad to ψ only)   [B, T]
    G = reward_to_go(rewards, c_mask, gamma)  # G_t, the target   [B, T]
    vf_loss = value_loss(values, G, c_mask)  # L_V = mean_t (V_ψ(s_t) − G_t)²
    prec.backward(vf_loss)
    with torch.no_grad():
        var_g = masked_mean((G - masked_mean(G, c_mask)) ** 2, c_mask)  # Var[G_t]
        resid = G - values  # [B, T]
        var_r = masked_mean((resid - masked_mean(resid, c_mask)) ** 2, c_mask)  # Var[G_t − V]
    v_stats = {"value/loss": vf_loss.item(), "value/mean": float(masked_mean(values.detach(), c_mask))}
    if var_g > 0:  # 1 − Var[G − V]/Var[G]: 0 for V = mean, 1 for V = G (undefined if G is constant)
        v_stats["value/explained_variance"] = float(1 - var_r / var_g)
    return values, v_stats


def split_halves(n: int, K: int, grad_var: bool) -> list[tuple[int, int]]:
    """The rows of the batch, in parts whose gradients are taken one after the other: two halves of
    whole prompt groups, [0, n1·K) and [n1·K, n·K), for the split-half variance probe; one part,
    the whole batch, with --no-grad-var or a single prompt."""
    n1 = n // 2 if (grad_var and n >= 2) else n
    return [(0, n1 * K), (n1 * K, n * K)] if n1 < n else [(0, n * K)]


def split_half_grad_var(part_grads: list[torch.Tensor], parts: list[tuple[int, int]], K: int) -> float | None:
    """policy/grad_var, ≈ tr Cov(ĝ), from the cumulative gradients after each of the two `parts`:
    (n1/n) ĝ_1, then ĝ. None with one part, or when float16 gradients overflowed (the step is skipped)."""
    if len(part_grads) != 2:
        return None
    n1, n = parts[0][1] // K, parts[1][1] // K
    g_first, g_all = part_grads  # [P], [P]
    g1 = g_first * (n / n1)  # ĝ_1 over the first n1 prompts   [P]
    g2 = (g_all - g_first) * (n / (n - n1))  # ĝ_2 over the other n − n1 prompts   [P]
    grad_var = split_half_variance(g1, g2, n1, n - n1)  # ≈ tr Cov(ĝ)
    return grad_var if math.isfinite(grad_var) else None


def resume(ckpt, rng, opt, sched, prec) -> tuple:
    """--resume: the state at the end of the checkpoint's step (the global RNGs last).
    -> the figures of the run so far: (start_acc, start_pass, acc, final_pass)."""
    rng.bit_generator.state = ckpt.state["data_rng"]
    harness.restore_training_state(ckpt.state, opt, sched, prec)
    return tuple(ckpt.state[k] for k in ("start_acc", "start_pass", "acc", "final_pass"))


def save_models(policy, head, tok, out, enabled: bool) -> str | None:
    """The final policy (save_pretrained) into <out>/model, and V_ψ beside it, if any, as
    <out>/value_head.pt: {"weight": [1, d], "bias": [1]}.  -> the model folder, or None."""
    model_dir = harness.save_policy(policy, tok, out, enabled)
    if head is not None and enabled:
        torch.save(head.state_dict(), out / "value_head.pt")
    return model_dir


def save_checkpoint(out, step: int, args: Args, policy, head, tok, opt, sched, prec, rng, **figures) -> None:
    """--save-every: <out>/checkpoint-<step>/, all that step + 1 needs (the value head too, if any)."""
    models = {"model": policy, **({"value_head": head} if head is not None else {})}
    harness.save_checkpoint(out, step, args, models, {
        **harness.training_state(opt, sched, prec), "data_rng": rng.bit_generator.state, **figures}, tok)


#####################################################################################################
#####  bookkeeping: models, evaluation, metrics, the summary
#####################################################################################################


def load_models(args: Args, ckpt, device, prec):
    """The policy π_θ (from the checkpoint on --resume), in eval mode (no dropout: the log-probs of
    the loss are those of the policy that sampled), with --gradient-checkpointing if given, and π_ref
    only when β > 0, at the compute precision (`harness.freeze`).  -> (policy, ref, tok)"""
    print(f"loading --model {args.model}" + (" (the policy, and a frozen copy as π_ref)" * (args.beta > 0))
          + " …", flush=True)
    policy, tok = common.load_model(harness.start_weights(ckpt, args.model, args), device)  # float32
    policy.eval()
    harness.gradient_checkpointing(policy, args.gradient_checkpointing)  # --gradient-checkpointing
    policy = harness.apply_lora(policy, args, ckpt)  # --lora-r: adapters on the frozen base, only they trained
    # a frozen copy of the start model (--lora-r: the policy with its adapters off, no copy)
    ref = harness.reference_of(policy, args, args.model, device, prec) if args.beta > 0 else None
    return policy, ref, tok


def evaluators(policy, tok, heldout: list[dict], args: Args, strict: bool, prec):
    """Two closures over the held-out prompts: the greedy accuracy, and pass@1 and pass@K at the
    sampling temperature with a fixed seed (None with --no-pass-at-k)."""
    eval_rows = [{"prompt": tasks.chat_prompt(tok, r["prompt"], args.chat_template), "answer": r["answer"]}
                 for r in heldout]  # messages: the chat template

    def evaluate():
        with prec.autocast():
            return tasks.greedy_accuracy(policy, tok, eval_rows, args.max_new_tokens, strict)

    def evaluate_pass_at_k():
        if not args.pass_at_k:
            return None
        with prec.autocast():
            return tasks.pass_at_k(policy, tok, eval_rows, args.samples_per_prompt, args.max_new_tokens,
                                   strict, args.temperature)
    return evaluate, evaluate_pass_at_k


def evaluate_start(evaluate, evaluate_pass_at_k, log, n_heldout: int) -> tuple:
    """The start model's figures, logged at step 0 and printed.  -> (accuracy, pass@k or None)"""
    print(f"evaluating the start model on {n_heldout} held-out prompts …", flush=True)
    start_acc, start_pass = evaluate(), evaluate_pass_at_k()
    log.log(0, {"eval/accuracy": start_acc, **tasks.pass_metrics(start_pass)})
    print(f"held-out greedy accuracy before training: {start_acc:.3f} ({n_heldout} prompts)"
          + tasks.pass_text(start_pass))
    return start_acc, start_pass


def print_header(out, device, prec, args: Args, policy, ref) -> None:
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} "
          f"({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters)  |  "
          f"Ψ = {'R(τ)' if args.psi == 'return' else 'G_t'} − b[{args.baseline}], γ = {args.gamma}, "
          f"β = {args.beta}{'' if ref is not None else ' (no reference model)'}")


def step_metrics(scores, rewards, c_mask, finished, log_ratio, stats: dict, grad_norm: float,
                 grad_var: float | None, v_stats: dict, lr: float, gamma: float, K: int, t0: float,
                 t_gen: float) -> dict:
    """One step's metrics.jsonl line (before any evaluation)."""
    B = len(scores)
    returns = reward_to_go(rewards, c_mask, gamma)[:, 0]  # R(τ) = G_0   [B]
    metrics = {
        "reward/mean": float(scores.mean()),  # the task's score, before any KL shaping
        "reward/std": float(scores.std()) if B > 1 else 0.0,
        "reward/return_mean": float(returns.mean()),  # R(τ), with the KL terms
        "reward/frac_zero_std_groups": (float((scores.view(-1, K).std(1) == 0).float().mean()) if K > 1
                                        else 1.0),
        "loss/pseudo": stats["loss"],  # logged for completeness: its value has no meaning
        "psi/mean": stats["psi_mean"],
        "psi/second_moment": stats["psi_second_moment"],
        "policy/grad_norm": float(grad_norm),
        "policy/entropy": stats["entropy"],
        "charts/lr": lr,
        "completions/mean_length": float(c_mask.sum(1).float().mean()),
        "completions/no_eos_frac": 1.0 - float(np.mean(finished)),
        "time/step_seconds": time.time() - t0,
        "time/generate_seconds": t_gen,
        "charts/completions_per_second": B / (time.time() - t0),
    }
    if grad_var is not None:
        metrics["policy/grad_var"] = grad_var  # ≈ tr Cov(ĝ), before clipping
    metrics.update(v_stats)  # value/loss, value/mean, value/explained_variance, value/grad_norm
    if log_ratio is not None:
        metrics["kl/ref"] = float(masked_mean(log_ratio, c_mask))  # per token
        metrics["kl/ref_seq"] = float(masked_sum(log_ratio, c_mask, dim=1).mean())  # per completion
    return metrics


def summarise(log, out, args: Args, policy, tok, heldout: list[dict], prec, model_dir, start_acc: float,
              acc: float, start_pass, final_pass, device, t_start: float, train_seconds: float,
              load_seconds: float) -> dict:
    """summary.json, and the printed summary with a few greedy answers."""
    examples = heldout[:4]
    with prec.autocast():
        *_, ex_texts, _ = common.generate_text(
            policy, tok, [tasks.chat_prompt(tok, r["prompt"], args.chat_template) for r in examples],
            args.max_new_tokens, greedy=True)
    summary = log.summary({
        "script": "reinforce",
        "start_accuracy": start_acc,
        "final_accuracy": acc,
        "start_pass_at_k": start_pass,  # {"k", "pass_at_1", "pass_at_k"} or None
        "final_pass_at_k": final_pass,
        "steps": args.steps,
        "completions": args.steps * args.prompts_per_step * args.samples_per_prompt,
        "model_dir": model_dir,
        **harness.run_facts(args, device, t_start, train_seconds, load_seconds),
    })
    log.close()
    print(f"\n=== REINFORCE summary ({out})")
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
