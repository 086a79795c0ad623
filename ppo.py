"""RLHF with PPO: the InstructGPT pipeline (reward model, value model, KL-shaped reward, GAE, PPO-clip,
adaptive KL control, PPO-ptx), and the two policy updates the notes build PPO from: PPO-penalty and TRPO.

Notes: `000_e75205f5b80b652d.txt`, "GAE", "PPO" and "RLHF + PPO" (R(x, y) = r_φ(x, y) − β log π/π_ref);
`003_0bc5d2784dac14e1.txt`, the objective with its KL and LM (pretraining) terms;
`004_e77bb721393eb42b.txt`, "GAE", "TRPO", "PPO - CLIP", "PPO - Penalty" (the adaptive β rule) and
"PPO's Advantage Estimator" (the per-token reward and the critic fitted by MSE to the returns);
`000`, "TRPO" and "PPO-Penalty"; `003`, "Attempt 2" (TRPO) and "Attempt 3" (PPO).

State s_t = the prompt x and the tokens y_<t generated so far; action a_t = the next token y_t. An
episode is one completion; it ends at the completion's EOS (or at the token limit). Four models:

    π_θ      the policy, trained                            (starts as the SFT policy)
    V_ψ      the value model: an LM with a scalar head on every position, trained
             (starts as the reward model, or as the SFT policy with a zero head: --value-init)
    r_φ      the reward model from reward_model.py, frozen   (trained first if none is given)
    π_ref    the SFT policy, frozen

    for step = 1 .. steps:
        x ~ prompts (batch_size of them);  y ~ π_θ(·|x), temperature τ              (rollout, KV cache)
        cache log π_old(y_t|s_t) (= π_θ now), log π_ref(y_t|s_t), V_old(s_t)
        score s = r_φ(x, y) at the completion's last token;  s ← s − penalty if y has no EOS
        r_t = −β (log π_old(y_t|s_t) − log π_ref(y_t|s_t))  +  s · 1[t = last token of y]
        δ_t = r_t + γ V_old(s_{t+1}) − V_old(s_t)        (V = 0 after the last token: terminal)
        Â_t = Σ_l (γλ)^l δ_{t+l};   R_t = Â_t + V_old(s_t);   Â ← whiten(Â) over the batch
              (R_t is the λ-return, the critic's target; it is the notes' return r_t + ... + r_T,
               the Monte Carlo return, only at λ = 1: the default λ = 0.95 mixes in V_old)
        repeat ppo_epochs times, for each mini-batch:
            ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t)
            L_π    = −mean_t min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t)              (--policy-loss clip)
                     −mean_t (ρ_t Â_t − β_pen KL_t)                              (--policy-loss kl-penalty)
                     0: the policy is not in this loop                           (--policy-loss trpo)
            L_V    = ½ mean_t max((V_ψ(s_t) − R_t)², (clip(V_ψ, V_old ± ε_v) − R_t)²)
                     (the ½ and the clip are OpenAI's baselines / lm-human-preferences and TRL's;
                      the notes' critic loss is the plain mean (V − R)²)
            L_ptx  = −mean_t log π_θ(y_t | x, y_<t), a token mean over the completions (EOS
                     included) of ptx_batch (prompt, completion) texts     (PPO-ptx, if λ_ptx > 0;
                     `003` writes E[−log π_θ(y|x)] over pretraining data)
            (θ, ψ) ← AdamW step on L_π + c_V L_V + λ_ptx L_ptx
        trpo only: one natural-gradient step of θ on the whole batch (run before that loop):
            g   = ∇_θ L(θ) at θ_old,   L(θ) = (1/N) Σ_t ρ_t Â_t                  (the surrogate)
            F v = ∇_θ ((∇_θ D̄_KL) · v) at θ_old,   D̄_KL = mean_t KL_t               (double backward)
            x   ≈ (F + λI)⁻¹ g by k steps of conjugate gradient;   s = √(2δ / xᵀ(F + λI)x) · x
            θ   ← θ_old + α^j s for the first j = 0, 1, ... with D̄_KL ≤ δ and L(θ) > L(θ_old);
                  θ_old if no j qualifies (logged: trpo/line_search_failed = 1)
        d = mean_t KL_t at the new θ          (policy/kl_old; clip: its k3 estimate, policy/kl_old_k3)
        kl-penalty only: β_pen ← β_pen / 2 if d < d_targ / 1.5;  β_pen × 2 if d > 1.5 d_targ
                         (--penalty-kl-control fixed: β_pen stays, the notes' plain form)
        β ← KL controller(β, KL of this rollout to π_ref)          (fixed, adaptive, proportional)
        every `eval_every` steps: held-out prompts: gold reward, score and KL to π_ref of samples

with KL_t = KL(π_old(·|s_t) ‖ π_θ(·|s_t)) = Σ_a π_old(a|s_t) log(π_old(a|s_t) / π_θ(a|s_t)), exact over
the vocabulary (`policy_kl`), masked-averaged over the batch's completion tokens. Two different KLs
and two different βs are at work: β and --kl-control act on the KL to π_ref in the *reward* (per
completion, nats); β_pen and --penalty-target-kl act on the KL to π_old in the *loss* (per token).

A bandit, or a token MDP. `000` ("RLHF + PPO") and `003` call RLHF a contextual bandit: the prompt is
the context, the whole completion one action, and R(x, y) its one reward. This file makes every token
a step, as `000` does for GRPO (state s_t = (x, y_<t), action y_t), so that a value per prefix and GAE
can give credit inside the completion; the per-token KL reward is `003`'s reward shaping. The two
views meet: log π(y|x) = Σ_t log π(y_t|s_t), and with β = 0, γ = λ = 1 and the score on the last token,
Â_t = s − V(s_t), the return minus a baseline of the state, so Σ_t ∇log π(y_t|s_t) Â_t has the
bandit's expected gradient E_y[s ∇log π(y|x)], for any V (tests/test_bandit_and_token_mdp.py
enumerates every completion). The default λ = 0.95 leaves the bandit on purpose: bootstrapping from
V(s_{t+1}) costs a bias while V ≠ V^π and buys less variance; and the loss's token mean divides by
the batch's number of tokens, not of completions (README, the table of normalisers).

Which way round the KL goes. The notes disagree: `000` ("TRPO") writes D̄_KL(θ | θ_old) with
D_KL(π_θ ‖ π_old), `004` ("TRPO", "PPO - Penalty") writes KL[π_old, π_θ]. The code uses
KL(π_old ‖ π_θ), the TRPO paper's: its constraint is an expectation over states *and* actions of the
old policy, E_{s∼π_old}[Σ_a π_old(a|s) log π_old(a|s)/π_θ(a|s)], which the rollout samples as they
are, and its Hessian at θ = θ_old is the Fisher matrix F = E[∇log π ∇log πᵀ]. At θ = θ_old both
directions have the value 0, the gradient 0 and the same Hessian F, so the quadratic model, the CG
solve and the step size are the same either way; they part only beyond second order, in the value
that the line search checks against δ, and there the code follows the paper.

Memory: nothing of size [B, T, V] is kept for the batch. PPO-clip needs only log π_old(y_t|s_t)
[B, T] of the sampled tokens, and logs d as the k3 estimate from them (policy/kl_old_k3, see
`kl_to_old`). kl-penalty and TRPO need π_old's whole distribution: they keep a frozen snapshot of
θ_old (a copy of the weights at the compute precision) and recompute log π_old(·|s_t) per
micro-batch from it (`old_vocab_logprobs`), where a cache of it would be [B, T, V] float32, ~5 GB
at V ≈ 150k and B·T ≈ 8k tokens. TRPO's g, F v and line search are sums over micro-batches
(--micro-batch), so F v is accumulated chunk by chunk; the TRPO paper also computes F v on a 10%
subsample of the batch, which this code does not do.

Which position gets the score: the last token of the completion, i.e. its EOS when it finished,
otherwise its last sampled token (the token limit). The reward model reads its head at that same
token (the last real token of prompt + completion), so the score is the value of the whole text,
and it enters the return of every earlier token through GAE. On chat-formatted rows (--chat-template,
or rows of messages) a finished completion is read as reward_model.py and TRL train on such rows, and
as transformers' AutoModelForSequenceClassification reads `apply_chat_template(conversation)`: after
the template's trailing tokens (Qwen's turns end "<|im_end|>\n": the head reads the "\n"); the
score still enters r_t at the EOS.

On the built-in task (common.py, "the preference task") the reward model was fitted to noisy labels
of a hidden gold reward, so a sample's gold reward tells how good it really is: the score (the
proxy) can be gamed, the gold reward cannot. It is logged, never used in training.

Run:
    python ppo.py                                        # built-in task, `tiny-pref`, CPU, minutes
    python ppo.py --kl-control adaptive --target-kl 2    # the notes' PPO-penalty rule for β
    python ppo.py --beta 0 --steps 600                   # no KL penalty: watch the proxy get gamed
    python ppo.py --ptx-coef 0.5                         # PPO-ptx: keep the SFT likelihood up
    python ppo.py --policy-loss kl-penalty               # the notes' PPO-penalty, β_pen adapted on d
    python ppo.py --policy-loss kl-penalty --penalty-kl-control fixed   # ... with a fixed β_pen
    python ppo.py --policy-loss trpo                     # TRPO: one natural-gradient step per rollout
    python ppo.py --model PATH/sft --reward-model runs/reward_model__s1__.../model --data pairs.jsonl \\
        --batch-size 64 --mini-batches 4 --micro-batch 4 --gradient-checkpointing --lr 1e-6 \\
        --max-new-tokens 128                                     # one GPU (24 GB at 0.5B)
    python ppo.py --save-every 100 --out-dir runs/x    # a checkpoint every 100 steps; stopped by
    python ppo.py --resume runs/x                      # Ctrl-C, it goes on from the last one
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import harness
import tasks
from common import check, masked_mean


@dataclass
class Args:
    model: str = "tiny-pref"
    """--model NAME_OR_PATH: the SFT policy to start from, also the reference π_ref (a Hugging Face
    causal LM folder, or hub name if cached), or `tiny-pref`, the embedded SFT policy (TRL:
    sft_model_path)"""
    reward_model: Optional[str] = None
    """folder saved by reward_model.py (`<its run>/model`), or `tiny-pref-rm`, the shipped one of the
    built-in task; default: `tiny-pref-rm` for the built-in task, else train one first with
    reward_model.py's defaults on the same --model and --data (TRL: reward_model_path)"""
    data: Optional[str] = None
    """JSONL preference pairs {"prompt", "chosen", "rejected"}: their prompts are PPO's prompts, their
    chosen texts the PPO-ptx data unless --ptx-data is given (and the reward model's data when it is
    trained here); text, or TRL's conversational lists of {"role", "content"} messages, rendered with
    the chat template; default: the built-in task"""
    chat_template: bool = False
    """render text pairs as a user message and an assistant reply with the tokenizer's chat template
    (for instruct models), as reward_model.py --chat-template and dpo.py --chat-template do; rows of
    messages always use it. The reward model then reads each completion as it was trained on such
    rows: after the EOS and the template's trailing tokens (Qwen: "<|im_end|>" then "\n")"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the final policy; default runs/ppo__s<seed>__<time>
    (TRL: output_dir)"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""
    seed: int = 1
    """seed of Python's random, numpy and torch (sampling included); the evaluation uses seed+1 (TRL: seed)"""
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
    in float32 (`harness.freeze`), so that π_θ = π_ref exactly at step 0 (TRL: bf16 / fp16)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass instead of keeping them, in
    the policy and the value model: activation memory of one layer instead of all, for about one
    more forward pass per backward; the same gradients up to float rounding (TRL: gradient_checkpointing)"""

    steps: int = 150
    """PPO steps; each is one rollout batch and ppo_epochs passes over it (TRL counts
    total_episodes = steps × batch_size)"""
    batch_size: int = 64
    """prompts per rollout, one completion each (TRL: batch_size = per_device_train_batch_size ×
    gradient_accumulation_steps × GPUs)"""
    mini_batches: int = 4
    """mini-batches per rollout batch: one optimiser step each (batch_size must divide evenly)
    (TRL: num_mini_batches)"""
    ppo_epochs: int = 4
    """passes over each rollout batch (TRL: num_ppo_epochs, default 4)"""
    micro_batch: Optional[int] = None
    """sequences per forward/backward pass inside a mini-batch (gradient accumulation); default:
    the whole mini-batch (TRL: per_device_train_batch_size)"""
    max_new_tokens: int = 20
    """completion token limit (20 fits the built-in task; ~128+ for a real model) (TRL: response_length)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken of the same tempered distribution (TRL:
    temperature, default 0.7)"""
    lr: float = 3e-4
    """learning rate of AdamW, for the policy and the value model (tiny-pref: 1e-4..1e-3; a 0.5B+
    model: ~1e-6 for the policy); with --policy-loss trpo, for the value model only (TRPO's step
    size comes from δ, so --lr, --warmup-steps and --grad-clip do not touch the policy) (TRL:
    learning_rate)"""
    warmup_steps: int = 5
    """PPO steps of linear learning-rate warm-up from 0; then constant (TRL: warmup_steps, also
    counted in rollout batches; TRL's default schedule then decays linearly)"""
    grad_clip: float = 1.0
    """clip the gradient norm of the policy and of the value model, each on its own (0 disables)"""

    policy_loss: Literal["clip", "kl-penalty", "trpo"] = "clip"
    """the policy update: clip (PPO-clip, notes 004 "PPO - CLIP"); kl-penalty (notes 004 "PPO -
    Penalty": −mean(ρÂ − β_pen KL(π_old‖π_θ)), β_pen adapted on d, or fixed: --penalty-kl-control);
    trpo (notes 004 "TRPO": one natural-gradient step per rollout, conjugate gradient and a line
    search on KL ≤ δ). The rollout, reward, value model and GAE are the same for all three"""
    epsilon: float = 0.2
    """ε, the policy's clip range: ρ is clipped to [1−ε, 1+ε] (--policy-loss clip) (TRL: cliprange)"""
    penalty_beta: float = 1.0
    """β_pen at the first update, the weight of KL(π_old‖π_θ) in the kl-penalty loss; then adapted
    on d after every rollout. 1, the middle of the PPO paper's fixed-β runs (0.3, 1, 3, 10;
    Schulman et al. 2017), which notes that the start value of the adaptive β matters little because
    the ×2 / ÷2 rule moves it quickly"""
    penalty_kl_control: Literal["fixed", "adaptive"] = "adaptive"
    """β_pen of kl-penalty: fixed keeps --penalty-beta for every update (the notes' plain
    L^KLPEN, the PPO paper's fixed-β runs); adaptive halves or doubles it on d after every rollout
    (the notes' rule; --penalty-target-kl)"""
    penalty_target_kl: float = 0.01
    """d_targ of kl-penalty, in nats per token: β_pen halves when d < d_targ/1.5, doubles when
    d > 1.5·d_targ, d = mean_t KL(π_old‖π_θ) after the rollout's epochs (--penalty-kl-control adaptive).
    0.01 is the best of the PPO paper's adaptive runs (0.003, 0.01, 0.03) and TRPO's δ below, so the
    two aim at one step size"""
    trpo_delta: float = 0.01
    """δ, TRPO's trust region: the largest mean_t KL(π_old‖π_θ) per step, nats per token (the TRPO
    paper's experiments and Spinning Up: 0.01)"""
    trpo_cg_iters: int = 10
    """k, conjugate-gradient iterations for x ≈ F⁻¹g (Spinning Up: 10; k = n solves an n-dim system
    exactly, k ≪ n gives the usual truncated natural gradient)"""
    trpo_damping: float = 0.1
    """λ, added to the Fisher matrix in CG and in the step size: (F + λI)x = g (Spinning Up: 0.1;
    Schulman's modular_rl: 1e-3); it keeps CG stable where F is nearly singular, and shortens the step"""
    trpo_backtrack: float = 0.8
    """α, the line search's shrink factor: it tries θ_old + α^j s for j = 0, 1, ... (Spinning Up:
    0.8; modular_rl: 0.5), in (0, 1)"""
    trpo_backtrack_steps: int = 10
    """the most steps the line search tries (j = 0 .. this − 1) before it keeps θ_old (Spinning Up: 10)"""
    gamma: float = 1.0
    """γ, the discount in GAE, in [0, 1] (RLHF: 1, the episode is one short completion) (TRL: gamma)"""
    lam: float = 0.95
    """λ of GAE, in [0, 1]: 0 is the one-step TD residual, 1 the Monte Carlo return minus V; the
    critic's target R = Â + V_old is the λ-return, the Monte Carlo return only at 1 (TRL: lam)"""
    whiten_advantages: bool = True
    """whiten Â over the batch's completion tokens (masked, Bessel std) before the loss (TRL
    always does; no flag)"""
    whiten_scores: bool = False
    """whiten the reward model's scores s over the batch, (s − mean) / std (mean shifted, Bessel
    std), before they enter r_t: the scores only, the KL term keeps its nats. Not TRL's (nor
    lm-human-preferences') whiten_rewards, which divides the per-token rewards r_t, KL included,
    by their std over the batch's tokens and keeps their mean (shift_mean=False); no TRL equivalent"""
    vf_coef: float = 0.1
    """c_V, the value loss weight in the summed loss (TRL: vf_coef, default 0.1); with Adam and
    separate clipping it mostly sets the value model's step size relative to its gradient noise"""
    cliprange_value: float = 0.2
    """ε_v: the new value is clipped to V_old ± ε_v in the clipped value loss (0 disables clipping)
    (TRL: cliprange_value)"""
    value_init: Literal["reward", "policy"] = "reward"
    """start the value model from the reward model (InstructGPT, TRL) or from the SFT policy with a
    zero head (V = 0 at the start) (TRL: the value_model it is given)"""

    beta: float = 0.05
    """β, the initial KL penalty coefficient in r_t = −β (log π − log π_ref) (InstructGPT: 0.02)
    (TRL: kl_coef)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL in the reward, on tokens sampled from π_old: k1 = log π_old − log π_ref
    (InstructGPT, TRL's default; can be negative per token), k3 = ρ_ref − 1 − log ρ_ref with
    ρ_ref = π_ref/π_old (never negative). Both estimate KL(π_old ‖ π_ref) without bias, but as a
    reward only k1 pulls the right way: its expected policy gradient is exactly −∇KL(π ‖ π_ref),
    while k3's is −(∇KL(π ‖ π_ref) − ∇KL(π_ref ‖ π)), almost zero near π_ref (Tang & Munos 2025;
    tests/test_kl_reward.py) (TRL: kl_estimator)"""
    kl_control: Literal["fixed", "adaptive", "proportional"] = "fixed"
    """fixed β; adaptive: the notes' PPO-penalty rule (halve β if d < d_targ/1.5, double it if
    d > 1.5·d_targ), with d here the rollout's KL to π_ref per completion (objective/kl, nats), not
    the notes' d (KL to π_old per token, policy/kl_old); proportional: Ziegler et al. 2019,
    β ← β(1 + clip(d/d_targ − 1, ±0.2)·n/horizon) on the same d (TRL's current PPOTrainer: fixed only)"""
    target_kl: float = 2.0
    """d_targ in nats per completion, for the adaptive and proportional controllers"""
    kl_horizon: int = 10000
    """the proportional controller's horizon in completions (Ziegler et al.: 10,000)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a completion that hit the token limit without EOS (the 'EOS
    trick'; TRL's missing_eos_penalty); 0 disables"""

    ptx_coef: float = 0.0
    """λ of PPO-ptx: weight of the language-model loss −mean_t log π_θ(y_t | x, y_<t), a token
    mean over the completions of --ptx-batch texts (from --ptx-data, else SFT text), added to every
    optimiser step (InstructGPT's γ, whose LM loss is on pretraining data, as in `003`; 0 is plain
    PPO)"""
    ptx_batch: int = 16
    """(prompt, completion) texts per optimiser step for the PPO-ptx term"""
    ptx_data: Optional[str] = None
    """JSONL {"prompt", "completion"} rows (TRL's prompt-completion format) for the PPO-ptx term: the
    loss is on the completion's tokens, given its prompt (for pretraining text, put its first words
    in "prompt"); default: the chosen texts of --data, or the built-in task's SFT grammar"""

    eval_every: int = 25
    """steps between evaluations (held-out prompts: gold reward, score and KL to π_ref of samples)"""
    eval_samples: int = 500
    """completions sampled per evaluation (held-out prompts, temperature 1, the same seed every time)"""
    log_every: int = 10
    """steps between printed lines (every step is written to metrics.jsonl)"""
    save_model: bool = True
    """save the final policy with save_pretrained into <out-dir>/model (the value model into
    <out-dir>/value_model)"""
    save_every: int = 0
    """PPO steps between checkpoints, <out-dir>/checkpoint-<step>/: the policy and the value model
    (save_pretrained), the optimiser, the scheduler, the RNG states, β and β_pen, and the step, all
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
    ModelConfig: 16); π_ref is the base with the adapters off, not a second copy; the value model is trained
    whole, as TRL's PPOTrainer does with a peft_config; <out-dir>/model holds the adapter as peft saves it
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
#####  the maths: KL-shaped reward, GAE, the two clipped losses, KL control (pure functions, torch)
#####################################################################################################


def kl_shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                      mask: torch.Tensor, beta: float, kl_estimator: str = "k1"):
    """The per-token RLHF reward (notes 004, "PPO's Advantage Estimator"; notes 000, R(x, y)):

        r_t = −β KL_t + s · 1[t = last completion token],   KL_t = log π_old(y_t|s_t) − log π_ref(y_t|s_t)

    scores: [B]; logp, ref_logp, mask: [B, T] (mask: 1 on completion tokens up to and including the
    first EOS, right-padded).  -> (rewards [B, T], kl [B, T]), both 0 at padding.

    The score lands on the last masked token: the EOS when the completion finished, else its last
    sampled token. A row with an empty mask gets no reward at all. Summed over t, the rewards are
    s − β Σ_t KL_t = r_φ(x, y) − β log π(y|x)/π_ref(y|x) (with k1), the notes' R(x, y). Notes 004
    write the per-token part as β log π_ref(a_t|s_t) alone; the −β log π(a_t|s_t) half is what
    turns it into a KL (the other half is an entropy bonus), as in InstructGPT and Ziegler et al.

    kl_estimator "k1": log π_old − log π_ref, negative on some tokens. "k3": e^x − 1 − x with
    x = log π_ref − log π_old, never negative, lower variance. Both are unbiased estimates of the
    value KL(π_old ‖ π_ref), because the tokens were sampled from π_old (the policy of the rollout);
    they differ as rewards. The policy gradient treats −β KL_t as a fixed reward, and its expected
    gradient is −β E_{a~π}[∇log π(a) · KL_t(a)]:
        k1:  E[∇log π · (log π − log π_ref)]          = ∇KL(π ‖ π_ref), exactly the penalty's gradient;
        k3:  E[∇log π · (π_ref/π − 1 − log(π_ref/π))] = ∇KL(π ‖ π_ref) − ∇KL(π_ref ‖ π),
    which is second order in π − π_ref, so near π_ref the k3 reward barely pulls the policy back
    (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"; checked by
    exact enumeration in tests/test_kl_reward.py). TRL offers both; k1 is the default here and there.
    """
    if kl_estimator == "k1":
        kl = logp - ref_logp  # log π_old − log π_ref   [B, T]
    elif kl_estimator == "k3":
        x = ref_logp - logp  # log (π_ref / π_old)   [B, T]
        kl = torch.expm1(x) - x  # e^x − 1 − x   [B, T]
    else:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}: expected k1 or k3")
    m = mask.bool()  # [B, T]
    kl = torch.where(m, kl, torch.zeros_like(kl))  # [B, T]
    rewards = -beta * kl  # −β KL_t   [B, T]
    length = m.sum(1)  # [B]
    last = (length - 1).clamp(min=0)  # index of the last completion token   [B]
    at_last = torch.nn.functional.one_hot(last, mask.shape[1]).bool() & (length > 0)[:, None]  # [B, T]
    rewards = rewards + torch.where(at_last, scores[:, None].to(rewards.dtype), torch.zeros_like(rewards))
    return rewards, kl  # r_t [B, T], KL_t [B, T]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (notes 004 and 000, "GAE"), on right-padded rows.

        δ_t = r_t + γ V(s_{t+1}) − V(s_t)
        Â_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l}      computed backwards:  Â_t = δ_t + γλ Â_{t+1}
        R_t = Â_t + V(s_t)                  (the value model's regression target: the λ-return,
                                             R_t = r_t + γ((1−λ) V(s_{t+1}) + λ R_{t+1}))

    rewards, values, mask: [B, T].  -> (advantages [B, T], returns [B, T]), 0 at padding.
    The episode ends at each row's last masked token, so V(s_{t+1}) = 0 there (terminal: nothing is
    earned after the EOS) and the sum stops: a padded position never reaches a real one, whatever
    values or rewards the padding holds. λ = 0 gives the TD residual δ_t; λ = 1 (with γ = 1) gives
    Σ_{l≥0} r_{t+l} − V(s_t), the Monte Carlo return minus the value, and then R_t is the notes'
    return r_t + ... + r_T (004, "PPO's Advantage Estimator"); at λ < 1 it is not.
    """
    m = mask.bool()  # [B, T]
    r = torch.where(m, rewards, torch.zeros_like(rewards))  # [B, T]
    v = torch.where(m, values, torch.zeros_like(values))  # [B, T]  V = 0 past the end: terminal
    B, T = r.shape
    adv = torch.zeros_like(r)  # [B, T]
    running = torch.zeros(B, dtype=r.dtype, device=r.device)  # Â_{t+1}   [B]
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)  # V(s_{t+1})   [B]
        delta = r[:, t] + gamma * next_v - v[:, t]  # δ_t   [B]
        running = torch.where(m[:, t], delta + gamma * lam * running, torch.zeros_like(running))  # Â_t
        adv[:, t] = running
    returns = torch.where(m, adv + v, torch.zeros_like(adv))  # R_t = Â_t + V(s_t)   [B, T]
    return adv, returns


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, epsilon: float = 0.2):
    """PPO-clip (notes 004, "PPO - CLIP"), to minimise, as a mean over the mask's tokens:

        ρ_t = exp(log π_θ − log π_old)
        L   = −mean_t min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t)

    logp, old_logp, advantages, mask: [B, T].  -> (loss, metrics). With Â > 0 the min caps the
    gain once ρ > 1+ε; with Â < 0 once ρ < 1−ε: in those two cases the clipped term is the smaller
    one and it does not depend on θ, so the token's gradient is exactly 0.
    metrics (detached): clipfrac, the fraction of tokens where the clipped term is taken (strictly
    smaller); approx_kl, mean(ρ − 1 − log ρ), the k3 estimate from the sampled tokens of
    mean_t KL(π_old ‖ π_θ), averaged over the mini-batches as θ moves. The notes' PPO-penalty d is
    that same KL at the final θ (`kl_to_old`: for clip the same k3 estimate, policy/kl_old_k3; for
    kl-penalty and TRPO exact over the vocabulary, policy/kl_old); --kl-control adaptive uses
    neither, but the KL to π_ref per completion (objective/kl).
    """
    log_ratio = logp - old_logp  # log ρ_t   [B, T]
    ratio = torch.exp(log_ratio)  # ρ_t   [B, T]
    surr1 = ratio * advantages  # ρ Â   [B, T]
    surr2 = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages  # clip(ρ, 1−ε, 1+ε) Â   [B, T]
    loss = -masked_mean(torch.min(surr1, surr2), mask)  # −mean_t min(·, ·)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((surr2 < surr1).float(), mask),
                   "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                   "ratio_mean": masked_mean(ratio, mask)}
    return loss, metrics


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2):
    """The clipped value loss of PPO implementations (OpenAI baselines, Ziegler et al.'s
    lm-human-preferences, TRL):

        V_clip = V_old + clip(V − V_old, −ε_v, +ε_v)
        L_V    = ½ mean_t max((V − R)², (V_clip − R)²)

    values (V_ψ, with gradient), old_values (V_old, from the rollout), returns (R), mask: [B, T].
    The max makes it pessimistic: a move of V past V_old ± ε_v towards R earns nothing, a move away
    from R is paid in full. clip ≤ 0 gives ½ mean (V − R)², which is the notes' critic loss
    (000, L_VF = E[(V − R)²]; 004, an MSE to the return) up to two things:
      - the ½, which the notes do not have: it comes from OpenAI baselines' ppo2 and
        lm-human-preferences (`vf_loss = .5 * mean(max(...))`), kept by TRL; it makes ∂L/∂V = V − R
        and is the same as halving c_V;
      - the target: ppo.py passes R = Â + V_old, the λ-return (`gae`), the notes' Monte Carlo
        return r_t + ... + r_T only at λ = 1.
    -> (loss, metrics) with vf_clipfrac, the fraction of tokens where the clipped term is larger.
    """
    err = (values - returns) ** 2  # (V − R)²   [B, T]
    if clip <= 0:
        return 0.5 * masked_mean(err, mask), {"vf_clipfrac": torch.zeros(())}
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)  # [B, T]
    err_clip = (v_clip - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.max(err, err_clip), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((err_clip > err).float(), mask)}
    return loss, metrics


def adaptive_beta(beta: float, d: float, d_targ: float) -> float:
    """The notes' PPO-penalty rule (004, "PPO - Penalty"), one update:

        d < d_targ / 1.5  ->  β / 2          (too close: loosen the penalty)
        d > d_targ × 1.5  ->  β × 2          (too far: tighten it)
        otherwise         ->  β

    ppo.py runs it on two different pairs (d, β):
      - --policy-loss kl-penalty: the notes' own use, d = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t)) after
        the rollout's epochs (nats per token) and β = β_pen, the weight of that KL in the loss;
      - --kl-control adaptive, as in RLHF practice (Ziegler et al.): d = the rollout's KL to π_ref
        in nats per completion and β the coefficient of the KL-shaped reward, the same rule
        steering the distance that the RLHF objective penalises.
    """
    if d < d_targ / 1.5:
        return beta / 2
    if d > d_targ * 1.5:
        return beta * 2
    return beta


def proportional_beta(beta: float, d: float, d_targ: float, n: int, horizon: int = 10000) -> float:
    """The proportional controller of Ziegler et al. 2019 (TRL's AdaptiveKLController):

        e = clip(d / d_targ − 1, −0.2, 0.2);     β ← β (1 + e · n / horizon)

    with n the completions in the batch that measured d. At e = ±0.2 and n/horizon = 64/10,000 the
    step is ±0.13%: a slow, smooth correction, unlike the PPO-penalty rule's ×2 and ÷2.
    """
    e = min(max(d / d_targ - 1.0, -0.2), 0.2)  # proportional error, clipped
    return beta * (1.0 + e * n / horizon)


def penalty_kl_control(kind: str, beta_pen: float, d: float, d_targ: float) -> float:
    """β_pen for the next rollout's kl-penalty loss, from d = mean_t KL(π_old‖π_θ) after this
    rollout's epochs: --penalty-kl-control fixed keeps β_pen (the notes' L^KLPEN with a constant β);
    adaptive is `adaptive_beta` (the notes' ×2 / ÷2 rule)."""
    if kind == "adaptive":
        return adaptive_beta(beta_pen, d, d_targ)
    if kind == "fixed":
        return beta_pen
    raise ValueError(f"unknown penalty KL control {kind!r}: expected fixed or adaptive")


def kl_control(kind: str, beta: float, d: float, d_targ: float, n: int, horizon: int = 10000) -> float:
    """β for the next rollout, from d = this rollout's KL to π_ref (nats per completion): --kl-control
    fixed keeps β; adaptive is `adaptive_beta` (the notes' PPO-penalty rule), proportional is
    `proportional_beta` (Ziegler et al. 2019), n the completions that measured d."""
    if kind == "adaptive":
        return adaptive_beta(beta, d, d_targ)
    if kind == "proportional":
        return proportional_beta(beta, d, d_targ, n, horizon)
    return beta


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over the mask (population variances): 1 is a perfect critic, 0 one
    that does no better than the mean return, < 0 worse than that. NaN when Var[R] = 0."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


#####################################################################################################
#####  the maths of PPO-penalty and TRPO: the exact KL to π_old, the penalised loss, conjugate
#####  gradient, the Fisher-vector product and the TRPO step (pure functions, torch)
#####################################################################################################


def policy_kl(old_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """The exact per-token KL from π_old to π_θ, summed over the vocabulary (notes 004, "TRPO" and
    "PPO - Penalty", KL[π_old(·|s_t), π_θ(·|s_t)]):

        KL_t = Σ_a π_old(a|s_t) (log π_old(a|s_t) − log π_θ(a|s_t))

    old_logits, new_logits: [B, T, V], logits or log-probs (they are log-softmaxed here, so either
    works), already divided by the temperature; computed in float32 (or float64 if given).
    -> [B, T], ≥ 0 up to rounding, not masked (mask the padding with `masked_mean`).
    π_old is a constant of the update: old_logits is detached, so the
    gradient flows into new_logits only, ∂KL_t/∂z_θ = π_θ − π_old. A word with π_old(a) = 0 (a logit
    of −inf) adds 0, not NaN. This is not an estimate from the sampled token (k1, k3): it needs the
    whole distribution, which is why kl-penalty and TRPO recompute π_old's [b, T, V] per micro-batch
    from a snapshot of θ_old (`old_vocab_logprobs`).
    """
    dtype = torch.promote_types(new_logits.dtype, torch.float32)  # float32 at least (float64 stays)
    old_lp = torch.log_softmax(old_logits.detach().to(dtype), dim=-1)  # log π_old(·|s_t)   [B, T, V]
    new_lp = torch.log_softmax(new_logits.to(dtype), dim=-1)  # log π_θ(·|s_t)   [B, T, V]
    p_old = old_lp.exp()  # π_old(·|s_t)   [B, T, V]
    terms = torch.where(p_old > 0, p_old * (old_lp - new_lp), torch.zeros_like(p_old))  # [B, T, V]
    return terms.sum(-1)  # KL_t = Σ_a π_old (log π_old − log π_θ)   [B, T]


def ppo_penalty_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                     kl: torch.Tensor, mask: torch.Tensor, beta: float):
    """PPO-penalty (notes 004, "PPO - Penalty"; 000, "PPO-Penalty"), to minimise, as a mean over the
    mask's tokens:

        ρ_t   = exp(log π_θ(y_t|s_t) − log π_old(y_t|s_t))
        L_KLPEN = −mean_t (ρ_t Â_t − β KL_t),     KL_t = KL(π_old(·|s_t) ‖ π_θ(·|s_t))

    logp (with gradient), old_logp, advantages, mask: [B, T]; kl: [B, T] from `policy_kl` (with
    gradient, exact over the vocabulary); beta: β_pen, a float (adapted outside, by `adaptive_beta`
    on d). -> (loss, metrics). Nothing is clipped: the KL term alone holds π_θ near π_old, and its
    pull grows with the distance (∂KL_t/∂z_θ = π_θ − π_old, 0 at θ = θ_old, so the first epoch's
    first step is the plain policy gradient).
    metrics (detached): kl, mean_t KL_t (the penalised KL); surrogate, mean_t ρ_t Â_t; approx_kl,
    the k3 estimate mean(ρ − 1 − log ρ), as in `ppo_clip_loss`; ratio_mean.
    """
    log_ratio = logp - old_logp  # log ρ_t   [B, T]
    ratio = torch.exp(log_ratio)  # ρ_t   [B, T]
    surrogate = ratio * advantages  # ρ_t Â_t   [B, T]
    loss = -masked_mean(surrogate - beta * kl, mask)  # −mean_t (ρ_t Â_t − β KL_t)
    with torch.no_grad():
        metrics = {"kl": masked_mean(kl, mask), "surrogate": masked_mean(surrogate, mask),
                   "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                   "ratio_mean": masked_mean(ratio, mask)}
    return loss, metrics


def conjugate_gradient(fvp, b: torch.Tensor, iters: int, damping: float = 0.0) -> torch.Tensor:
    """Solve (F + λI) x = b for x by conjugate gradient, touching F only through products F·v
    (TRPO paper, appendix C; Nocedal & Wright, algorithm 5.2). F must be symmetric positive
    (semi-)definite, as a Fisher matrix is.

        x_0 = 0,  r_0 = b,  p_0 = b
        α_k = r_kᵀr_k / p_kᵀ(F + λI)p_k;   x_{k+1} = x_k + α_k p_k;   r_{k+1} = r_k − α_k (F + λI)p_k
        p_{k+1} = r_{k+1} + (r_{k+1}ᵀr_{k+1} / r_kᵀr_k) p_k

    fvp: a callable v ↦ F·v, flat [n] -> [n]; b: [n]; iters: k, the most iterations (each calls fvp
    once); damping: λ ≥ 0.  -> x [n]. In exact arithmetic k = n iterations solve the system exactly
    (a 2×2 system in 2); TRPO stops far earlier (k = 10 for 10⁵+ parameters), which gives an
    approximate natural gradient. Edge cases: it stops early once ‖r‖ ≤ 1e-10‖b‖ (solved; b = 0 gives
    x = 0), and when pᵀ(F + λI)p ≤ 0 (no curvature along p, so no step along it), returning the x
    it has.
    """
    x = torch.zeros_like(b)  # x_0 = 0   [n]
    r = b.clone()  # r_0 = b − (F + λI) x_0 = b   [n]
    p = b.clone()  # p_0 = r_0   [n]
    rr = torch.dot(r, r)  # r_kᵀ r_k
    tol = 1e-20 * rr  # ‖r‖² ≤ (1e-10 ‖b‖)²
    for _ in range(iters):
        if rr <= tol:
            break  # solved (to rounding)
        Ap = fvp(p) + damping * p  # (F + λI) p_k   [n]
        pAp = torch.dot(p, Ap)  # p_kᵀ (F + λI) p_k
        if not pAp > 0:
            break  # no positive curvature along p_k (or NaN): keep x_k
        alpha = rr / pAp  # α_k
        x = x + alpha * p  # x_{k+1}
        r = r - alpha * Ap  # r_{k+1}
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p  # p_{k+1}
        rr = rr_new
    return x


def fisher_vector_product(kl: torch.Tensor, params: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """F·v, the Hessian of the mean KL at θ_old times v, by double backward (TRPO paper, appendix C:
    "the Fisher-vector product"), without ever forming F (n² numbers for n parameters):

        F v = ∇_θ ( (∇_θ D̄_KL(θ_old, θ)) · v )  at θ = θ_old,     D̄_KL = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t))

    kl: the scalar D̄_KL, computed from `params` with its graph (π_old detached, π_θ = the model at
    θ_old), so its value and its gradient are 0 but its Hessian is F = E_t[Σ_a π_old ∇log π ∇log πᵀ],
    the Fisher matrix; params: the tensors θ (the same list, in the same order, as the flat v);
    v: [n], n = Σ numel(params).  -> F v, [n]. The graph of kl is kept (retain_graph), so one kl can
    serve every call of a conjugate-gradient solve. Each call is one backward with create_graph and
    one backward through it. A parameter that kl does not depend on gets 0.
    """
    grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)  # ∇_θ D̄_KL, with graph
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])  # [n]   (0 at θ_old, but not its derivative)
    gv = torch.dot(flat, v)  # (∇_θ D̄_KL) · v, a scalar
    hv = torch.autograd.grad(gv, params, retain_graph=True, allow_unused=True)  # ∇_θ (∇D̄_KL · v) = F v
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                      for h, p in zip(hv, params)])  # F v   [n]


def trpo_step(theta_old: torch.Tensor, g: torch.Tensor, fvp, evaluate, delta: float = 0.01,
              cg_iters: int = 10, damping: float = 0.1, backtrack: float = 0.8,
              max_backtracks: int = 10):
    """One TRPO update (notes 004, "TRPO"; 000, "TRPO"): maximise the surrogate subject to the
    trust region, with the natural-gradient direction and a backtracking line search.

        maximise  L(θ) = (1/N) Σ_t ρ_t Â_t     subject to   D̄_KL(θ_old, θ) = mean_t KL(π_old ‖ π_θ) ≤ δ

    Around θ_old, L ≈ gᵀΔ and D̄_KL ≈ ½ ΔᵀFΔ; the maximiser of that model is Δ = √(2δ / xᵀFx) x with
    x = F⁻¹g (its KL under the model is exactly δ). Then:

        x   ≈ (F + λI)⁻¹ g                 conjugate_gradient(fvp, g, cg_iters, damping)
        s   = √(2δ / xᵀ(F + λI)x) · x      the full step
        for j = 0 .. max_backtracks − 1:   θ_j = θ_old + α^j s
            accept the first θ_j with D̄_KL(θ_old, θ_j) ≤ δ and L(θ_j) > L(θ_old)
        none accepted: θ_old, unchanged

    theta_old: [n], the flat parameters; g: [n], ∇L at θ_old; fvp: v ↦ F v at θ_old; evaluate: a
    callable θ [n] -> (L(θ), D̄_KL(θ_old, θ)), two floats, the true surrogate and KL (not the model).
    The caller's model may be left at the last θ evaluate saw: write the returned θ back. fvp is
    called (cg_iters + 1 times at most) before evaluate is first called.
    -> (theta_new [n], info), info of floats: step_fraction (α^j of the accepted step, 0 when none),
    line_search_failed (1 when θ_old was kept, else 0), backtracks (j, or max_backtracks), kl and
    surrogate_gain (at the accepted θ, 0 when none), expected_gain (gᵀs, the model's gain of the full
    step), full_step_kl (the true KL of the full step j = 0: δ when the quadratic model is exact and
    λ = 0, δ − ½λ‖s‖² with damping, so full_step_kl / δ says how far the model is off), xFx (xᵀ(F + λI)x), grad_norm (‖g‖), step_norm
    (‖s‖ before backtracking). The check is strict, KL ≤ δ: a full step that lands exactly on the
    boundary (an exactly quadratic KL) is accepted or shrunk once as rounding falls.
    Edge cases: xᵀ(F + λI)x ≤ 0 or not finite (g = 0, or a broken F) takes no step and counts as a
    failed line search; a non-finite L or KL of a trial step rejects that step.
    """
    info = {"step_fraction": 0.0, "line_search_failed": 1.0, "backtracks": float(max_backtracks),
            "kl": 0.0, "surrogate_gain": 0.0, "expected_gain": 0.0, "full_step_kl": 0.0, "xFx": 0.0,
            "grad_norm": float(g.norm()), "step_norm": 0.0}
    x = conjugate_gradient(fvp, g, cg_iters, damping)  # x ≈ (F + λI)⁻¹ g   [n]
    xFx = float(torch.dot(x, fvp(x) + damping * x))  # xᵀ (F + λI) x
    info["xFx"] = xFx
    if not (xFx > 0 and np.isfinite(xFx)):
        return theta_old, info  # no curvature (or no gradient): no step
    step = np.sqrt(2 * delta / xFx) * x  # s = √(2δ / xᵀFx) x:  ½ sᵀ(F + λI)s = δ   [n]
    info["step_norm"], info["expected_gain"] = float(step.norm()), float(torch.dot(g, step))  # gᵀ s
    surr_old, _ = evaluate(theta_old)  # L(θ_old) (= mean_t Â_t: ρ = 1)
    for j in range(max_backtracks):
        frac = backtrack ** j  # α^j
        theta = theta_old + frac * step  # θ_j   [n]
        surr, kl = evaluate(theta)  # L(θ_j), D̄_KL(θ_old, θ_j)
        if j == 0:
            info["full_step_kl"] = kl
        if np.isfinite(surr) and np.isfinite(kl) and kl <= delta and surr > surr_old:
            info.update(step_fraction=frac, line_search_failed=0.0, backtracks=float(j), kl=kl,
                        surrogate_gain=surr - surr_old)
            return theta, info
    return theta_old, info  # no step qualified: the policy stays θ_old


#####################################################################################################
#####  the score s = r_φ(x, y), and the value model V_ψ: an LM with a scalar head on every position
#####################################################################################################


@torch.no_grad()
def score(rm, ids: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor, missing_eos_penalty: float = 0.0,
          autocast=contextlib.nullcontext, suffix: list[int] | None = None) -> torch.Tensor:
    """The score of each completion (notes 000, "RLHF + PPO": r_φ(x, y)), with the 'EOS trick':

        s = r_φ(x, y) − penalty · 1[y ended at the token limit, without EOS]

    rm: the frozen reward model, read at the last real token of prompt + completion; ids, mask:
    [b, P+T]; finished: [b] bool; autocast: the context of the forward pass.  -> s [b], float32.
    suffix (chat-formatted rows): the template's trailing tokens, written after the EOS of each
    finished completion before r_φ reads it, so that it reads the text `apply_chat_template` writes
    for the conversation, as it was trained (`tasks.chat_suffix`); None for plain-text rows.
    """
    ids, mask = tasks.append_after_last(ids, mask, suffix, finished)  # [b, P+T(+S)]
    with autocast():
        s = rm(ids, mask).float()  # r_φ(x, y)   [b]
    return s - missing_eos_penalty * (~finished).float()  # [b]


class ValueModel(torch.nn.Module):
    """V_ψ(s_t): a causal LM's transformer and a linear head d -> 1, read at every position.

    V(s_t), the value of the state in which y_t is chosen, is read at the column that precedes
    y_t (the one whose logits predict y_t), so values line up with `common.token_logprobs`.
    Started from the reward model (--value-init reward), V is the reward model's head applied to
    every prefix, (w · h_t + b − μ) / s, folded into one linear map; from the policy, the head is 0.
    """

    def __init__(self, lm, weight: torch.Tensor | None = None, bias: float = 0.0):
        super().__init__()
        self.lm = lm  # the whole causal LM, so that it saves with save_pretrained
        d = lm.config.hidden_size
        self.head = torch.nn.Linear(d, 1, device=lm.device, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.copy_(weight.reshape(1, d) if weight is not None else torch.zeros(1, d))
            self.head.bias.fill_(bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int):
        """input_ids, attention_mask: [B, L] = [left-padded prompt | right-padded completion].
        -> V(s_t) for the last n_completion tokens, [B, T] (float32; padding is not masked here)."""
        T = n_completion
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state  # [B, L, d]
        h = h[:, -(T + 1):-1]  # the columns that choose y_1..y_T   [B, T, d]
        with torch.autocast(device_type=h.device.type, enabled=False):  # the head in float32
            return self.head(h.float()).squeeze(-1)  # V(s_t)   [B, T]


def value_model_from_reward_model(rm) -> ValueModel:
    """A trainable copy of the reward model's LM, with the head (w/s, (b − μ)/s): at the start V(s_t)
    is the (normalised) reward model's score of the prefix up to y_<t."""
    s = rm.reward_std.item()
    w = rm.head.weight.detach().float().reshape(-1) / s  # w / s   [d]
    b = (rm.head.bias.detach().float().item() - rm.reward_mean.item()) / s  # (b − μ) / s
    lm = copy.deepcopy(rm.lm).float().requires_grad_(True)
    return ValueModel(lm, w, b)


#####################################################################################################
#####  the variants' updates, one call each in train(): PPO-penalty's loss, PPO-ptx's LM term, TRPO's
#####  natural-gradient step (the model side of the pure functions above)
#####################################################################################################


def old_vocab_logprobs(old_policy, ids, mask, T: int, temperature: float = 1.0,
                       autocast=contextlib.nullcontext) -> torch.Tensor:
    """log π_old(·|s_t) over the whole vocabulary for one micro-batch, [b, T, V], recomputed from
    θ_old, the frozen snapshot of the policy taken at the rollout (no gradient).

    Why recompute and not cache: the cache would be [B, T, V] for the whole batch, ~5 GB in float32 at
    B·T = 8k tokens and V = 152k, which alone would fill a fifth of a 24 GB GPU. The snapshot costs a
    copy of the weights instead (at the compute precision, `harness.freeze`: 1.3 GB for a 0.5B model
    under bf16, 2 GB in float32), and one more forward pass per micro-batch that needs it; only
    kl-penalty and TRPO need it, PPO-clip reads the sampled tokens' log-probs. Bit for bit the numbers of the cache: the
    same weights (as autocast rounds them), and a row's log-probs do not depend on which rows share
    its micro-batch.
    """
    with torch.no_grad(), autocast():
        return common.vocab_logprobs(old_policy, ids, mask, T, temperature)  # log π_old(·|s_t)   [b, T, V]


def kl_to_old(policy, old_policy, ids, mask, c_mask, T: int, old_logp, chunks, temperature: float = 1.0,
              autocast=contextlib.nullcontext) -> float:
    """d = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t)) at the updated θ, nats per token, micro-batch by
    micro-batch (`chunks`, slices of the batch): exact over the vocabulary (`policy_kl`) when θ_old is
    given (kl-penalty adapts β_pen on it, TRPO checks it against δ), and for PPO-clip (old_policy None)
    the k3 estimate from the sampled tokens, mean_t (ρ_t − 1 − log ρ_t) with ρ_t = π_θ(y_t|s_t) /
    π_old(y_t|s_t): unbiased, since y_t was drawn from π_old (E[ρ] = 1), and ≥ 0 per token. It is
    logged as policy/kl_old_k3, so that it is not read as the exact one. ids, mask: [B, P+T];
    c_mask, old_logp: [B, T].
    """
    with torch.no_grad(), autocast():
        if old_policy is not None:
            kl = torch.cat([policy_kl(old_vocab_logprobs(old_policy, ids[c], mask[c], T, temperature, autocast),
                                      common.vocab_logprobs(policy, ids[c], mask[c], T, temperature))
                            for c in chunks])  # KL(π_old(·|s_t) ‖ π_θ(·|s_t))   [B, T]
        else:
            logp = torch.cat([common.token_logprobs(policy, ids[c], mask[c], T, temperature)[0]
                              for c in chunks])  # log π_θ(y_t|s_t)   [B, T]
            log_ratio = logp - old_logp  # log ρ_t   [B, T]
            kl = torch.expm1(log_ratio) - log_ratio  # k3 = ρ_t − 1 − log ρ_t   [B, T]
    return float(masked_mean(kl, c_mask))


def penalty_policy_loss(policy, ids, mask, c_mask, T: int, old_policy, old_logp, adv, beta_pen: float,
                        temperature: float = 1.0, autocast=contextlib.nullcontext):
    """--policy-loss kl-penalty on one micro-batch: L_KLPEN = −mean_t (ρ_t Â_t − β_pen KL_t), with the exact
    KL_t = KL(π_old(·|s_t) ‖ π_θ(·|s_t)) over the vocabulary (so π_θ's whole distribution, not only the
    sampled token's log-prob that PPO-clip needs). β_pen is adapted on d after the epochs (`adaptive_beta`).

    ids, mask: [b, P+T]; c_mask, old_logp, adv: [b, T]; old_policy: the frozen snapshot of π_old, whose
    whole distribution is recomputed here (`old_vocab_logprobs`); autocast: the context of the forward
    passes. -> (loss, metrics), as `ppo_penalty_loss`, its "kl" renamed "penalty/kl" (logged beside β_pen).
    """
    old_lp_all = old_vocab_logprobs(old_policy, ids, mask, T, temperature, autocast)  # log π_old(·|s_t)  [b, T, V]
    with autocast():
        lp_all = common.vocab_logprobs(policy, ids, mask, T, temperature)  # log π_θ(·|s_t)   [b, T, V]
        logp = common.pick_token_logprobs(lp_all, ids, mask)  # log π_θ(y_t|s_t)   [b, T]
    kl_tok = policy_kl(old_lp_all, lp_all)  # KL(π_old(·|s_t) ‖ π_θ(·|s_t))   [b, T]
    loss, metrics = ppo_penalty_loss(logp, old_logp, adv, kl_tok, c_mask, beta_pen)  # L_KLPEN
    return loss, {("penalty/kl" if k == "kl" else k): val for k, val in metrics.items()}


def ptx_backward(policy, tok, texts, ptx_coef: float, prec, device) -> float:
    """PPO-ptx (notes 003, the LM term of the objective): backward of λ_ptx · L_ptx on one batch of
    (prompts, completions) texts, into the .grad of the same optimiser step as L_π + c_V L_V.

        L_ptx = −mean_t log π_θ(y_t | x, y_<t)     a token mean over the completions (EOS included)

    -> L_ptx, a float (logged as loss/ptx).
    """
    prompts, completions = texts
    ids, mask, c_mask, T = common.encode_prompt_completion(tok, prompts, completions, device)
    with prec.autocast():
        logp = common.token_logprobs(policy, ids, mask, T)[0]  # log π_θ(y_t | x, y_<t)   [b, T]
    ptx_loss = -masked_mean(logp, c_mask)  # a token mean: −Σ log π over all tokens / #tokens
    prec.backward(ptx_coef * ptx_loss)
    return float(ptx_loss.detach())


def trpo_update(policy, ids, mask, c_mask, T: int, old_policy, old_logp, adv, temperature: float = 1.0,
                micro_batch: int | None = None, delta: float = 0.01, cg_iters: int = 10, damping: float = 0.1,
                backtrack: float = 0.8, max_backtracks: int = 10, autocast=contextlib.nullcontext) -> dict:
    """--policy-loss trpo: one TRPO step of the policy on the whole rollout batch, in place. It builds
    what `trpo_step` needs from the model, calls it, and writes the θ it returns into the policy:

        g        = ∇_θ L(θ) at θ_old,  L(θ) = (1/N) Σ_t ρ_t Â_t            (the surrogate)
        fvp(v)   = F v at θ_old, by `fisher_vector_product` on D̄_KL = mean_t KL(π_old ‖ π_θ)
        evaluate = θ ↦ (L(θ), D̄_KL(θ_old, θ)), the policy set to θ and run
        θ        ← trpo_step(θ_old, g, fvp, evaluate, δ, k, λ, α, j_max)  (CG, step size, line search)

    ids, mask: [B, P+T]; c_mask, old_logp, adv: [B, T]; old_policy: the frozen snapshot of π_old, whose
    log π_old(·|s_t) [b, T, V] is recomputed per micro-batch (`old_vocab_logprobs`); temperature: τ of
    the rollout; delta, cg_iters, damping, backtrack, max_backtracks: δ, k, λ, α and the line search's
    most steps (`trpo_step`); autocast: the context of the forward passes. θ is every trainable
    float32 weight of the policy, flattened ([n], n = 136,256 for tiny-pref, tied embeddings counted
    once); the step is written into them with `copy_`, in float32.
    Sums over the batch go micro-batch by micro-batch (micro_batch sequences; None: the whole batch),
    each weighted by its share of the N completion tokens, so g, F v, L and D̄_KL are the whole batch's
    token means. The forward passes that F v differentiates twice use PyTorch's math attention kernel:
    the fused kernels (flash, memory-efficient, and the CPU's flash) have no double backward.
    -> trpo_step's info.
    """
    params = [p for p in policy.parameters() if p.requires_grad]  # θ (tied weights once)
    theta_old = torch.nn.utils.parameters_to_vector(params).detach().clone()  # θ_old   [n]
    size = micro_batch or ids.shape[0]
    chunks = [slice(i, i + size) for i in range(0, ids.shape[0], size)]
    n_tok = c_mask.sum().clamp(min=1)
    share = [float(c_mask[c].sum() / n_tok) for c in chunks]  # each micro-batch's share of the N tokens

    def logprobs(c):
        with autocast():
            return common.vocab_logprobs(policy, ids[c], mask[c], T, temperature)  # log π_θ(·|s_t) [b, T, V]

    def surrogate(c, lp_all):
        logp = common.pick_token_logprobs(lp_all, ids[c], mask[c])  # log π_θ(y_t|s_t)   [b, T]
        return masked_mean(torch.exp(logp - old_logp[c]) * adv[c], c_mask[c])  # (1/N_c) Σ_t ρ_t Â_t

    # g = ∇_θ L(θ) at θ_old, L = (1/N) Σ_t ρ_t Â_t (= the policy gradient: ρ = 1 here)
    g = torch.zeros_like(theta_old)  # [n]
    for c, w in zip(chunks, share):
        grads = torch.autograd.grad(surrogate(c, logprobs(c)), params, allow_unused=True)
        g += w * torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                            for x, p in zip(grads, params)])  # [n]

    def fvp(v):  # F v = Σ_c w_c ∇_θ(∇_θ D̄_KL,c · v), at θ_old (trpo_step calls it before evaluate)
        out = torch.zeros_like(v)  # [n]
        for c, w in zip(chunks, share):
            old_lp_all = old_vocab_logprobs(old_policy, ids[c], mask[c], T, temperature, autocast)  # [b, T, V]
            # a kernel with a double backward, also while --gradient-checkpointing recomputes the layers
            with sdpa_kernel(SDPBackend.MATH):
                lp_all = logprobs(c)  # [b, T, V]
                kl = masked_mean(policy_kl(old_lp_all, lp_all), c_mask[c])  # D̄_KL,c (= 0, with graph)
                out += w * fisher_vector_product(kl, params, v)
        return out

    @torch.no_grad()
    def evaluate(theta):  # θ -> (L(θ), D̄_KL(θ_old, θ)): the policy is set to θ and run
        set_flat(params, theta)
        surr = kl = 0.0
        for c, w in zip(chunks, share):
            lp_all = logprobs(c)  # [b, T, V]
            surr += w * float(surrogate(c, lp_all))  # L(θ)
            old_lp_all = old_vocab_logprobs(old_policy, ids[c], mask[c], T, temperature, autocast)  # [b, T, V]
            kl += w * float(masked_mean(policy_kl(old_lp_all, lp_all), c_mask[c]))  # D̄_KL(θ_old, θ)
        return surr, kl

    theta_new, info = trpo_step(theta_old, g, fvp, evaluate, delta, cg_iters, damping, backtrack,
                                max_backtracks)  # CG, the step size, the line search
    set_flat(params, theta_new)  # the accepted θ, or θ_old when the line search failed
    return info


def set_flat(params: list[torch.Tensor], theta: torch.Tensor) -> None:
    """Write the flat vector theta [n] into params in place (copy_, so the tensors, their storage and
    tied weights stay what they are; the inverse of `parameters_to_vector`)."""
    with torch.no_grad():
        i = 0
        for p in params:
            p.copy_(theta[i:i + p.numel()].view_as(p))
            i += p.numel()


#####################################################################################################
#####  training
#####################################################################################################


def train(args: Args) -> dict:
    args, ckpt = harness.resume_run(args)  # --resume RUN_DIR: the run's own config and last checkpoint
    validate(args)
    t_start = time.time()
    harness.seed_everything(args.seed)
    device = harness.pick_device(args.device)
    prec = harness.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    ##### the four models (π_θ, π_ref, r_φ, V_ψ), the prompts and the PPO-ptx texts (`setup`, below train)
    (policy, ref, rm, rm_suffix, value, tok, out, rm_path, gold, prompts_all, eval_prompts, ptx_data,
     ptx_rng) = setup(args, ckpt, device, prec)  # rm_suffix: chat rows' trailing tokens, read after EOS
    harness.seed_everything(args.seed)  # the same rollouts whether or not a reward model was trained
    params = [{"params": list(policy.parameters())}, {"params": list(value.parameters())}]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, eps=1e-5)  # one AdamW, θ and ψ
    old_policy = (harness.freeze(copy.deepcopy(policy), prec)  # θ_old, for π_old's whole distribution
                  if args.policy_loss in ("kl-penalty", "trpo") else None)  # (`old_vocab_logprobs`)
    sched = harness.lr_scheduler(opt, args.warmup_steps, args.steps, "constant")  # warm-up, then flat
    load_seconds = time.time() - t_start
    evaluate, log, start, start_texts, ev, final_texts = begin_run(  # held-out samples: the start, the latest
        args, ckpt, out, policy, ref, rm, rm_suffix, tok, eval_prompts, gold, device, prec, rm_path)
    beta, beta_pen, trpo_failures = args.beta, args.penalty_beta, 0  # β of r_t, β_pen of L_KLPEN
    B, mb_size = args.batch_size, args.batch_size // args.mini_batches
    micro = min(args.micro_batch or mb_size, mb_size)  # sequences per forward/backward pass
    rng = np.random.default_rng(args.seed)  # the rollouts' prompts
    t_train = time.time()
    if ckpt:  # --resume: the state at the end of the checkpoint's step (the global RNGs last)
        beta, beta_pen, trpo_failures = resume(ckpt.state, rng, ptx_rng, opt, sched, prec)
    for step in range((ckpt.step if ckpt else 0) + 1, args.steps + 1):
        t0 = time.time()
        ##### 1. rollout: one completion per prompt from π_old (= π_θ now)
        prompts = [prompts_all[i] for i in rng.integers(len(prompts_all), size=B)]
        with prec.autocast():
            p_ids, p_mask, c_ids, c_mask, texts, finished = common.generate_text(
                policy, tok, prompts, args.max_new_tokens, args.temperature)  # c_ids, c_mask: [B, T]
        finished = torch.tensor(finished, device=device)  # [B]
        ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
        T = c_ids.shape[1]
        t_gen = time.time() - t0
        ##### 2. cache log π_old, log π_ref, V_old and the score (no gradient)
        with torch.no_grad(), prec.autocast():
            chunks = [slice(i, i + micro) for i in range(0, B, micro)]
            old = [common.token_logprobs(policy, ids[c], mask[c], T, args.temperature, with_entropy=True)
                   for c in chunks]  # (log π_old(y_t|s_t), H(π_old(·|s_t))) per micro-batch, [b, T] each
            old_logp = torch.cat([lp for lp, _ in old])  # log π_old(y_t|s_t)   [B, T]
            entropy = masked_mean(torch.cat([h for _, h in old]), c_mask)  # mean_t H(π_old(·|s_t))
            ref_logp = torch.cat([common.token_logprobs(ref, ids[c], mask[c], T, args.temperature)[0]
                                  for c in chunks])  # log π_ref(y_t|s_t)   [B, T]
            old_values = torch.cat([value(ids[c], mask[c], T) for c in chunks]).float()  # V_old(s_t) [B, T]
            scores = torch.cat([score(rm, ids[c], mask[c], finished[c], args.missing_eos_penalty,
                                      prec.autocast, rm_suffix)
                                for c in chunks])  # s = r_φ(x, y) − penalty·1[no EOS]   [B]
        if old_policy is not None:  # kl-penalty, TRPO: the whole π_old(·|s_t), recomputed per micro-batch
            old_policy.load_state_dict(policy.state_dict())  # the frozen snapshot: θ_old ← θ
        ##### 3. rewards, GAE, returns (of the tensors cached without gradient)
        s = (scores - scores.mean()) / (scores.std() + 1e-8) if args.whiten_scores else scores  # [B]
        rewards, kl = kl_shaped_rewards(s, old_logp, ref_logp, c_mask, beta, args.kl_estimator)  # [B, T]
        adv, returns = gae(rewards, old_values, c_mask, args.gamma, args.lam)  # Â_t, R_t   [B, T]
        if args.whiten_advantages:
            adv = common.masked_whiten(adv, c_mask)  # (Â − mean) / std over the batch's tokens   [B, T]
        ##### 4. ppo_epochs passes over shuffled mini-batches, one AdamW step of θ and ψ on each
        stats, trpo_info = {}, None  # stats: name -> the mini-batches' values
        if args.policy_loss == "trpo":  # TRPO: θ's natural-gradient step, on the whole batch
            trpo_info = trpo_update(policy, ids, mask, c_mask, T, old_policy, old_logp, adv, args.temperature,
                                    args.micro_batch, args.trpo_delta, args.trpo_cg_iters, args.trpo_damping,
                                    args.trpo_backtrack, args.trpo_backtrack_steps, prec.autocast)
            trpo_failures += trpo_failed(step, trpo_info, args.trpo_delta)  # +1 (and a line) if θ stayed
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(B, device=device)
            for j in range(0, B, mb_size):
                idx = order[j:j + mb_size]
                n_tok = c_mask[idx].sum().clamp(min=1)
                acc: dict[str, float] = {}
                for k in range(0, mb_size, micro):
                    sub = idx[k:k + micro]
                    w = float(c_mask[sub].sum() / n_tok)  # this micro-batch's share of the tokens
                    with prec.autocast():
                        v = value(ids[sub], mask[sub], T)  # V_ψ(s_t)   [b, T]
                    vf_loss, vm = clipped_value_loss(v, old_values[sub], returns[sub], c_mask[sub],
                                                     args.cliprange_value)  # L_V
                    if args.policy_loss == "clip":  # L_π = L_clip, the default
                        with prec.autocast():
                            logp = common.token_logprobs(policy, ids[sub], mask[sub], T, args.temperature)[0]
                        pg_loss, pm = ppo_clip_loss(logp, old_logp[sub], adv[sub], c_mask[sub], args.epsilon)
                    elif args.policy_loss == "kl-penalty":  # L_π = L_KLPEN
                        pg_loss, pm = penalty_policy_loss(policy, ids[sub], mask[sub], c_mask[sub], T,
                                                          old_policy, old_logp[sub], adv[sub], beta_pen,
                                                          args.temperature, prec.autocast)
                    else:  # trpo: θ took its step above, ψ alone here
                        pg_loss, pm = None, {}
                    loss = args.vf_coef * vf_loss if pg_loss is None else pg_loss + args.vf_coef * vf_loss
                    prec.backward(loss * w)  # ∇(L_π + c_V L_V), this micro-batch's share
                    add_stats(acc, w, vf_loss, vm, pg_loss, pm)
                if ptx_data is not None:  # PPO-ptx: + λ_ptx L_ptx, the LM loss on SFT text
                    acc["loss/ptx"] = ptx_backward(policy, tok, next(ptx_data), args.ptx_coef, prec, device)
                prec.unscale_(opt)  # float16 only: .grad back to the true gradient, before clipping
                if args.policy_loss != "trpo":  # ‖g_θ‖; clipped (TRPO: θ has no .grad, AdamW skips it)
                    acc["policy/grad_norm"] = common.clip_grad_norm(policy.parameters(), args.grad_clip)  # g ← g·min(1, c/‖g‖)
                acc["value/grad_norm"] = common.clip_grad_norm(value.parameters(), args.grad_clip)  # g_ψ: its own
                prec.step(opt)  # AdamW: θ, ψ ← θ, ψ − lr·Adam(g)
                opt.zero_grad(set_to_none=True)
                for name, val in acc.items():
                    stats.setdefault(name, []).append(val)
        sched.step()
        ##### 5. d = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t)) at the updated θ; kl-penalty's rule on it
        d_old = kl_to_old(policy, old_policy, ids, mask, c_mask, T, old_logp, chunks, args.temperature,
                          prec.autocast)  # the notes' d, nats per token: exact, or k3 for clip
        beta_pen_used = beta_pen
        if args.policy_loss == "kl-penalty":  # PPO-penalty: β_pen ÷2 below the band, ×2 above (fixed: stays)
            beta_pen = penalty_kl_control(args.penalty_kl_control, beta_pen, d_old, args.penalty_target_kl)
        ##### 6. KL control: β for the next rollout, from this rollout's KL to π_ref
        d, beta_used = float(kl.sum(1).mean()), beta  # mean_x Σ_t KL_t, nats per completion
        beta = kl_control(args.kl_control, beta, d, args.target_kl, B, args.kl_horizon)  # fixed: β stays
        ##### 7. log; every eval_every steps, held-out samples: gold reward, score and KL to π_ref
        metrics = step_metrics(args, scores, kl, d, beta_used, entropy, d_old, stats, old_values, returns,
                               c_mask, finished, texts, gold, beta_pen_used, trpo_info, opt, t0, t_gen)
        if step % args.eval_every == 0 or step == args.steps:
            ev, final_texts = evaluate()
            metrics.update(ev)
        log.log(step, metrics, printed_keys(step, args, metrics))
        if args.save_every and step % args.save_every == 0:  ##### --save-every: what step + 1 needs
            save_checkpoint(out, step, args, policy, value, tok, opt, sched, prec, rng, ptx_rng, beta,
                            beta_pen, trpo_failures, start, start_texts, ev, final_texts)
    ##### 8. save and summarise
    return save_and_summarise(args, out, policy, value, tok, log, start, start_texts, ev, final_texts, beta,
                              beta_pen, trpo_failures, rm_path, eval_prompts, gold, device, t_start,
                              time.time() - t_train, load_seconds)


#####################################################################################################
#####  set-up and bookkeeping (not algorithm steps): flags, models, data, the reward model trained
#####  first, the evaluation, resume, metrics, checkpoints, the summary
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
    check(args.grad_clip >= 0, f"--grad-clip must be ≥ 0 (got {args.grad_clip}; 0 disables it)")
    for name in ("steps", "batch_size", "mini_batches", "ppo_epochs", "max_new_tokens", "eval_every",
                 "eval_samples", "log_every", "ptx_batch", "kl_horizon"):
        value = getattr(args, name)
        check(value >= 1, f"--{name.replace('_', '-')} must be ≥ 1 (got {value})")
    check(args.batch_size % args.mini_batches == 0,
          f"--batch-size {args.batch_size} must be a multiple of --mini-batches {args.mini_batches}")
    check(args.micro_batch is None or args.micro_batch >= 1, f"--micro-batch must be ≥ 1 (got {args.micro_batch})")
    check(0 <= args.gamma <= 1, f"--gamma must be in [0, 1] (got {args.gamma}): it is a discount")
    check(0 <= args.lam <= 1, f"--lam must be in [0, 1] (got {args.lam}): it mixes n-step estimates")
    check(args.beta >= 0, f"--beta must be ≥ 0 (got {args.beta}): it weights a KL penalty")
    check(args.kl_control in ("fixed", "adaptive", "proportional"),
          f"--kl-control {args.kl_control!r}: expected fixed, adaptive or proportional")
    check(args.kl_control == "fixed" or args.beta > 0,
          f"--kl-control {args.kl_control} scales β, so it needs --beta > 0 (got {args.beta})")
    check(args.kl_estimator in ("k1", "k3"), f"--kl-estimator {args.kl_estimator!r}: expected k1 or k3")
    check(args.target_kl > 0, f"--target-kl must be > 0 (got {args.target_kl})")
    check(args.value_init in ("reward", "policy"), f"--value-init {args.value_init!r}: expected reward or policy")
    check(0 < args.epsilon < 1, f"--epsilon must be in (0, 1) (got {args.epsilon}): the lower clip bound "
                                "1 − ε must stay above 0")
    check(args.policy_loss in ("clip", "kl-penalty", "trpo"),
          f"--policy-loss {args.policy_loss!r}: expected clip, kl-penalty or trpo")
    check(args.penalty_kl_control in ("fixed", "adaptive"),
          f"--penalty-kl-control {args.penalty_kl_control!r}: expected fixed or adaptive")
    check(args.penalty_beta > 0, f"--penalty-beta must be > 0 (got {args.penalty_beta}): the rule only "
                                 "doubles and halves it, so 0 would stay 0")
    check(args.penalty_target_kl > 0, f"--penalty-target-kl must be > 0 (got {args.penalty_target_kl})")
    check(args.trpo_delta > 0, f"--trpo-delta must be > 0 (got {args.trpo_delta}): it is the largest KL per step")
    check(args.trpo_cg_iters >= 1, f"--trpo-cg-iters must be ≥ 1 (got {args.trpo_cg_iters})")
    check(args.trpo_damping >= 0, f"--trpo-damping must be ≥ 0 (got {args.trpo_damping})")
    check(0 < args.trpo_backtrack < 1, f"--trpo-backtrack must be in (0, 1) (got {args.trpo_backtrack}): "
                                       "each try shrinks the step by it")
    check(args.trpo_backtrack_steps >= 1, f"--trpo-backtrack-steps must be ≥ 1 (got {args.trpo_backtrack_steps})")
    check(args.policy_loss != "trpo" or args.ptx_coef == 0,
          f"--ptx-coef {args.ptx_coef} needs --policy-loss clip or kl-penalty: TRPO's policy step is the "
          "natural-gradient step alone, with no optimiser step to add the LM loss to")
    check(args.policy_loss != "trpo" or args.dtype != "float16",
          "--dtype float16 with --policy-loss trpo: TRPO's gradients are not loss-scaled; use bfloat16 or float32")
    check(args.cliprange_value >= 0, f"--cliprange-value must be ≥ 0 (got {args.cliprange_value})")
    check(args.vf_coef > 0, f"--vf-coef must be > 0 (got {args.vf_coef}): the value model must learn")
    check(args.ptx_coef >= 0, f"--ptx-coef must be ≥ 0 (got {args.ptx_coef})")
    check(args.ptx_data is None or args.ptx_coef > 0,
          f"--ptx-data {args.ptx_data} needs --ptx-coef > 0: with λ = 0 the PPO-ptx term is off")
    check(args.missing_eos_penalty >= 0, f"--missing-eos-penalty must be ≥ 0 (got {args.missing_eos_penalty})")
    check(args.temperature > 0, f"--temperature must be > 0 (got {args.temperature})")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.batch_size >= 2 or not args.whiten_scores,
          "--whiten-scores needs --batch-size ≥ 2: the std of a single score is undefined")
    harness.check_lr(args.lr)
    trpo, penalty = args.policy_loss == "trpo", args.policy_loss == "kl-penalty"
    harness.check_idle_flags(args, {  # each flag set where it does nothing: one line
        "epsilon": (args.policy_loss == "clip", f"with --policy-loss {args.policy_loss} (it clips L_clip's ratio)"),
        "target_kl": (args.kl_control != "fixed", "with --kl-control fixed (β stays; adaptive and "
                                                  "proportional steer it to the target)"),
        "kl_horizon": (args.kl_control == "proportional", "without --kl-control proportional"),
        "penalty_beta": (penalty, "without --policy-loss kl-penalty"),
        "penalty_target_kl": (penalty, "without --policy-loss kl-penalty"),
        **{name: (trpo, "without --policy-loss trpo") for name in (
            "trpo_delta", "trpo_cg_iters", "trpo_damping", "trpo_backtrack", "trpo_backtrack_steps")},
        "ptx_batch": (args.ptx_coef > 0, "with --ptx-coef 0 (PPO-ptx is off)"),
    })
    if args.beta == 0 and args.kl_estimator != Args.kl_estimator:
        print(f"note: with --beta 0 the KL is no part of the reward; --kl-estimator {args.kl_estimator} "
              "changes only the logged KL to π_ref (objective/kl)")
    if trpo and (args.ppo_epochs, args.mini_batches) != (Args.ppo_epochs, Args.mini_batches):
        print("note: with --policy-loss trpo, --ppo-epochs and --mini-batches set the value model's passes "
              "only; the policy takes one natural-gradient step on the whole batch")
    if args.reward_model is not None:
        folder = Path(common.resolve_model_path(args.reward_model)).expanduser()
        check(folder.is_dir(), f"--reward-model {args.reward_model}: no such folder (give the `model` "
                               "folder of a reward_model.py run, or leave the flag out to train one)")
        check((folder / tasks.HEAD_FILE).is_file() or tasks.hf_score_weight(folder) is not None,
              f"--reward-model {args.reward_model}: no {tasks.HEAD_FILE} and no one-label `score.weight` in "
              "this folder, so it is neither a reward model saved by reward_model.py nor one saved by TRL "
              "(give the `model` folder inside its run folder)")
    elif not (args.model == "tiny-pref" and args.data is None) and not (
            args.resume and (Path(args.resume).expanduser() / "reward_model" / "model").is_dir()):
        script = Path(__file__).resolve().parent / "reward_model.py"  # default_reward_model trains one with it
        check(script.is_file(), f"no --reward-model given, and no {script} to train one with: pass "
                                "--reward-model FOLDER (the `model` folder of a reward_model.py run)")


def setup(args: Args, ckpt, device, prec):
    """Everything train() needs before its first step, in this order: the data, the policy π_θ and the
    frozen π_ref (float32 weights), the run folder, the reward model r_φ (trained first when none is
    given), the value model V_ψ (from r_φ or from the policy; on --resume, the checkpoint's weights),
    and the stream of PPO-ptx texts. -> (policy, ref, rm, value, tok, out, rm_path, gold, prompts_all,
    eval_prompts, ptx_data, ptx_rng); ptx_data is None when λ_ptx = 0."""
    check(args.policy_loss != "trpo" or prec.dtype != torch.float16,
          f"--dtype {args.dtype} picked float16 on {prec.device}, and TRPO's gradients are not loss-scaled: "
          "pass --dtype float32 (or bfloat16 where the GPU has it) with --policy-loss trpo")
    train_pairs, heldout = tasks.load_preferences(args.data)
    ptx_rows = read_ptx_data(args.ptx_data) if args.ptx_data is not None else None
    gold = args.data is None  # the hidden gold reward exists only for the built-in task
    path = common.resolve_model_path(args.model)
    print(f"loading --model {args.model} (the policy, a frozen copy as π_ref), then the reward and value "
          "models …", flush=True)
    policy, tok = common.load_model(harness.start_weights(ckpt, path, args), device)  # π_θ, float32
    chat = args.chat_template or isinstance(train_pairs[0]["prompt"], list)  # one file: text, or messages
    train_pairs, heldout = (tasks.render_chat(tok, rows, args.chat_template, args.model)
                            for rows in (train_pairs, heldout))  # messages (or --chat-template) -> text
    rm_suffix = tasks.chat_suffix(tok) if chat else None  # read after the EOS, as the RM was trained
    check_reward_model_rows(args, tok, chat, train_pairs, heldout, rm_suffix)  # before the run folder
    prompts_all = [p["prompt"] for p in train_pairs]
    eval_prompts = [heldout[i % len(heldout)]["prompt"] for i in range(args.eval_samples)]
    # every prompt + --max-new-tokens within the model's positions (row i of train + held out: line of --data)
    tasks.check_context(tok, policy, [p["prompt"] for p in train_pairs + heldout], args.max_new_tokens,
                        args.data)
    policy.eval()  # no dropout: ρ must be exactly 1 on the first mini-batch
    policy = harness.apply_lora(policy, args, ckpt)  # --lora-r: adapters on the frozen base, only they trained
    # π_ref, frozen, at the compute precision: = π_θ at step 0 (--lora-r: the policy, adapters off)
    ref = harness.reference_of(policy, args, path, device, prec)
    harness.set_threads(args.threads, device, policy)  # CPU: 1 thread for a small model (see --threads)
    out = harness.prepare_run_dir(args.out_dir or harness.default_run_dir("ppo", args.seed), args.overwrite,
                                  resume=ckpt)
    rm_path = (Path(common.resolve_model_path(args.reward_model)).expanduser() if args.reward_model
               else default_reward_model(args, out, resume=ckpt is not None))
    rm, rm_tok = tasks.load_reward_model(rm_path, device)  # r_φ, frozen
    check_same_vocab(tok, rm_tok, str(rm_path))
    if args.value_init == "reward":
        value = value_model_from_reward_model(rm)  # V_ψ = r_φ's head on every prefix
    else:
        # the SFT policy's LM, head = 0 (--lora-r: a whole copy of it, trained whole, as TRL's PPOTrainer
        # trains the value model it is given beside a peft policy)
        value = ValueModel(harness.merge_lora(copy.deepcopy(policy)).requires_grad_(True))
    if ckpt:
        harness.load_weights(value.lm, ckpt.path / "value_model")
        harness.load_weights(value.head, ckpt.path / "value_head.pt")
    value.eval()  # no dropout in the value model either
    rm.lm = harness.freeze(rm.lm, prec)  # after the value model's copy; the head stays float32
    harness.gradient_checkpointing(policy, args.gradient_checkpointing)  # --gradient-checkpointing
    harness.gradient_checkpointing(value.lm, args.gradient_checkpointing)
    ptx_rng = np.random.default_rng(args.seed + 2)  # the PPO-ptx texts' order
    ptx_data = sft_batches(args, train_pairs, ptx_rng, ptx_rows) if args.ptx_coef > 0 else None
    return (policy, ref, rm, rm_suffix, value, tok, out, rm_path, gold, prompts_all, eval_prompts, ptx_data,
            ptx_rng)


def default_reward_model(args: Args, out: Path | None, resume: bool = False) -> Path:
    """No --reward-model: for the built-in task (tiny-pref, no --data), the shipped reward model
    `models/tiny-pref-rm` (reward_model.py's defaults on the shipped tiny-pref, seed 1). Otherwise
    train one with reward_model.py's defaults (seed 1) on --model and --data, into
    <out-dir>/reward_model (`resume`: the one the run trained there before). Returns the folder of
    the reward model."""
    if args.model == "tiny-pref" and args.data is None:
        path = Path(common.resolve_model_path("tiny-pref-rm"))
        print(f"no --reward-model given: using the shipped one of the built-in task ({path})")
        return path
    if resume and (out / "reward_model" / "model").is_dir():
        print(f"--resume: the reward model this run trained, {out / 'reward_model' / 'model'}")
        return out / "reward_model" / "model"
    script = Path(__file__).resolve().parent / "reward_model.py"  # there: `validate` checked
    print("no --reward-model given: training one first (reward_model.py, its defaults, seed 1, "
          f"--model {args.model}" + (f", --data {args.data}" if args.data else "")
          + (", --chat-template" if args.chat_template else "") + ")", flush=True)
    run = out / "reward_model"
    cmd = [sys.executable, str(script), "--model", args.model, "--out-dir", str(run), "--overwrite",
           "--seed", "1", "--dtype", args.dtype]
    cmd += (["--data", args.data] if args.data else []) + (["--device", args.device] if args.device else [])
    cmd += ["--max-length", str(RM_MAX_LENGTH)] + (["--chat-template"] if args.chat_template else [])
    done = subprocess.run(cmd)  # its own process: no script imports another, and its memory is freed after
    check(done.returncode == 0, f"training the reward model failed (reward_model.py exited with "
                                f"{done.returncode}; its error is above): pass --reward-model FOLDER instead")
    summary = json.loads((run / "summary.json").read_text())
    print(f"reward model trained: held-out pair accuracy {summary['heldout_accuracy']:.3f}; "
          f"saved in {run / 'model'}")
    return run / "model"


RM_MAX_LENGTH = 1024  # --max-length of the reward model trained here (reward_model.py's default, TRL's)


def check_reward_model_rows(args: Args, tok, chat: bool, train_pairs: list[dict], heldout: list[dict],
                            suffix: list[int] | None) -> None:
    """Before the run folder: one line naming ppo.py's flags, not a failure inside reward_model.py.
    With --reward-model: it must have been trained on rows of the kind this run scores (chat-formatted
    or plain text; TRL's folders do not say). Without it, on --data: the reward model trained here
    drops the pairs longer than RM_MAX_LENGTH tokens (prompt + completion + EOS + suffix), so some
    training and some held-out pair must fit."""
    if args.reward_model is not None:
        trained = tasks.reward_model_chat(args.reward_model)  # None: the folder does not say
        check(trained is None or trained == chat, f"--reward-model {args.reward_model} was trained on "
              + ("chat-formatted rows, and this run's rows are plain text: pass --chat-template" if trained
                 else "plain-text rows, and this run renders its rows with the chat template "
                 "(--chat-template or rows of messages): give a reward model trained on such rows"))
        return
    trained_before = args.resume and (Path(args.resume).expanduser() / "reward_model" / "model").is_dir()
    if args.data is None or trained_before:
        return  # the built-in task's shipped reward model, or the one this run trained before
    def n_tokens(texts):
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    for name, rows in (("training", train_pairs), ("held-out", heldout)):
        longest = [len(p) + 1 + len(suffix or []) + max(c, r) for p, c, r in zip(
            common.encode_prompts(tok, [x["prompt"] for x in rows]), n_tokens(x["chosen"] for x in rows),
            n_tokens(x["rejected"] for x in rows))]  # prompt (BOS too) + completion + EOS (+ suffix), the longer one
        check(min(longest) <= RM_MAX_LENGTH,
              f"--data {args.data}: no --reward-model given, and no {name} pair fits in the {RM_MAX_LENGTH} "
              f"tokens of the reward model trained here (its shortest has {min(longest)}): train one with "
              "reward_model.py on these pairs and a larger maximum length, and pass it as "
              "--reward-model FOLDER")


def check_same_vocab(tok, rm_tok, where: str) -> None:
    """PPO hands the policy's token ids to the reward model, so both must use one vocabulary."""
    v1, v2 = tok.get_vocab(), rm_tok.get_vocab()
    check(v1 == v2, f"--reward-model {where}: its tokenizer's vocabulary ({len(v2)} tokens) differs "
                    f"from --model's ({len(v1)} tokens); PPO scores the policy's token ids directly, "
                    "so train the reward model on the same tokenizer (reward_model.py --model <SFT policy>)")


def read_ptx_data(path: str) -> list[dict]:
    """--ptx-data: JSONL {"prompt": str, "completion": str} rows (other keys are ignored), the
    prompt-completion format of TRL's SFT data. A bad line is one error naming FILE:LINE."""
    def why_bad(r):
        for k in ("prompt", "completion"):
            if not isinstance(r[k], str):
                return f"{k!r} must be a string, got {type(r[k]).__name__} (PPO-ptx rows are prompt-completion text)"
            if r[k].strip() == "":
                return (f"{k!r} is empty (the LM loss is on the completion given its prompt; for plain "
                        "pretraining text, put its first words in 'prompt')")
        return None
    rows = tasks.read_jsonl(path, required=("prompt", "completion"), flag="--ptx-data", validate=why_bad)
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def sft_batches(args: Args, train_pairs: list[dict], seed, ptx_rows: list[dict] | None = None):
    """An endless stream of (prompts, completions) for the PPO-ptx term: the --ptx-data rows when
    given; else the SFT policy's own training distribution (the grammar of `tasks.sample_review`)
    for the built-in task, or the chosen completions of the --data pairs. `seed`: an int, or a
    numpy Generator, which is then drawn from (so that a checkpoint can save its state)."""
    rng = np.random.default_rng(seed)  # a Generator comes back as it is
    while True:
        if ptx_rows is not None:
            rows = [ptx_rows[i] for i in rng.integers(len(ptx_rows), size=args.ptx_batch)]
            prompts, comps = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        elif args.data is None:
            prompts, comps = zip(*(tasks.sample_review(rng) for _ in range(args.ptx_batch)))
        else:
            rows = [train_pairs[i] for i in rng.integers(len(train_pairs), size=args.ptx_batch)]
            prompts, comps = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
        yield list(prompts), list(comps)


def begin_run(args: Args, ckpt, out: Path, policy, ref, rm, rm_suffix, tok, eval_prompts: list, gold: bool,
              device, prec, rm_path: Path):
    """The evaluation, the run's logger and first line, and the start policy's evaluation (step 0 of
    metrics.jsonl). -> (evaluate, log, start, start_texts, ev, final_texts): ev and final_texts are the
    latest evaluation, the start's (on --resume, the evaluations the checkpoint kept); evaluate() ->
    ({"eval/gold_reward", "eval/score", "eval/kl_to_ref", "eval/mean_length"}, texts)."""
    def evaluate() -> tuple[dict, list[str]]:
        """Samples for the held-out prompts (fixed seed): gold reward, score, KL to π_ref and length,
        by the same function as dpo.py's evaluation, so that the two compare."""
        def score_fn(ids, mask, finished):  # s = r_φ(x, y) − penalty·1[no EOS], as in the rollouts
            return score(rm, ids, mask, finished, args.missing_eos_penalty, prec.autocast, rm_suffix)
        with prec.autocast():
            s = tasks.sample_and_score(policy, ref, tok, eval_prompts, args.max_new_tokens, args.seed + 1,
                                       gold, score_fn=score_fn)
        return {"eval/gold_reward": s["gold_reward"], "eval/score": s["score"],
                "eval/kl_to_ref": s["kl_to_ref"], "eval/mean_length": s["mean_length"]}, s["texts"]

    log = harness.RunLogger(out, total_steps=args.steps)
    n_params = sum(p.numel() for p in policy.parameters()) / 1e6
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} ({n_params:.2f}M "
          f"parameters)  |  reward model {rm_path}  |  value model from the {args.value_init}")
    if ckpt is not None:
        st = ckpt.state
        return evaluate, log, st["start"], st["start_texts"], st["ev"], st["final_texts"]
    print(f"evaluating the start policy ({args.eval_samples} samples) …", flush=True)
    start, start_texts = evaluate()
    log.log(0, {**start, "objective/beta": args.beta})
    print(f"before training: score {start['eval/score']:+.3f}"
          + (f", gold reward {start['eval/gold_reward']:+.3f}" if gold else "") + " of samples")
    return evaluate, log, start, start_texts, dict(start), start_texts


def resume(state: dict, rng, ptx_rng, opt, sched, prec):
    """--resume: the state at the end of the checkpoint's step (the generators of the prompts and of
    the PPO-ptx texts, the optimiser, the schedule, the loss scale, the global RNGs last), set in
    place. -> (beta, beta_pen, trpo_failures). The evaluations it kept are read by `begin_run`."""
    rng.bit_generator.state, ptx_rng.bit_generator.state = state["data_rng"], state["ptx_rng"]
    harness.restore_training_state(state, opt, sched, prec)
    return state["beta"], state["beta_pen"], state["trpo_failures"]


def trpo_failed(step: int, info: dict, delta: float) -> int:
    """1, and a printed line, when TRPO's line search kept θ_old; else 0."""
    if not info["line_search_failed"]:
        return 0
    print(f"step {step}: TRPO line search found no step with KL ≤ δ = {delta} that improves the surrogate "
          f"(xᵀFx = {info['xFx']:.3g}): the policy is unchanged", flush=True)
    return 1


def add_stats(acc: dict, w: float, vf_loss, vm: dict, pg_loss, pm: dict) -> None:
    """Add one micro-batch's losses and loss metrics, weighted by its share w of the mini-batch's tokens,
    into acc: loss/value, value/clipfrac, then (unless pg_loss is None: trpo) loss/policy and the
    policy loss's metrics under policy/ (a name with a / kept as it is)."""
    terms = [("loss/value", vf_loss), ("value/clipfrac", vm["vf_clipfrac"])]
    if pg_loss is not None:
        terms += [("loss/policy", pg_loss)] + [(k if "/" in k else f"policy/{k}", v) for k, v in pm.items()]
    for name, val in terms:
        acc[name] = acc.get(name, 0.0) + float(val.detach()) * w


def step_metrics(args: Args, scores, kl, d: float, beta_used: float, entropy, d_old: float, stats: dict,
                 old_values, returns, c_mask, finished, texts: list[str], gold: bool, beta_pen_used: float,
                 trpo_info: dict | None, opt, t0: float, t_gen: float) -> dict:
    """The step's row of metrics.jsonl (the evaluation's keys are added by train)."""
    non_score = float((-beta_used * kl).sum(1).mean())  # mean −β Σ_t KL_t
    metrics = {
        "objective/scores": float(scores.mean()),
        "objective/kl": d,
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": float(scores.mean()) + non_score,
        "objective/beta": beta_used,
        "policy/entropy": float(entropy),
        ("policy/kl_old_k3" if args.policy_loss == "clip" else "policy/kl_old"): d_old,  # `kl_to_old`
        **{name: float(np.mean(vals)) for name, vals in stats.items() if name != "loss/ptx"},
        "value/explained_variance": explained_variance(old_values, returns, c_mask),
        "value/mean": float(masked_mean(old_values, c_mask)),
        "value/returns_mean": float(masked_mean(returns, c_mask)),
        "completions/mean_length": float(c_mask.sum(1).float().mean()),
        "completions/no_eos_frac": 1.0 - float(finished.float().mean()),
        "charts/lr": opt.param_groups[0]["lr"],
        "time/step_seconds": time.time() - t0,
        "time/generate_seconds": t_gen,
    }
    if args.policy_loss == "kl-penalty":
        metrics["penalty/beta_pen"] = beta_pen_used  # the β_pen of this rollout's loss
    if trpo_info is not None:
        metrics.update({f"trpo/{k}": v for k, v in trpo_info.items()})
    if gold:
        metrics["objective/gold_reward"] = float(np.mean([tasks.gold_reward(t) for t in texts]))
    if "loss/ptx" in stats:
        metrics["loss/ptx"] = float(np.mean(stats["loss/ptx"]))
    return metrics


def printed_keys(step: int, args: Args, metrics: dict) -> list[str]:
    """The keys of the step's printed line: every log_every steps, the last step and evaluations."""
    if not (step % args.log_every == 0 or step == args.steps or "eval/score" in metrics):
        return []
    return ["objective/scores", "objective/gold_reward", "objective/kl", "objective/beta",
            "policy/kl_old", "policy/kl_old_k3", "policy/clipfrac", "penalty/beta_pen",
            "trpo/step_fraction", "value/explained_variance", "completions/mean_length",
            "eval/score", "eval/gold_reward", "eval/kl_to_ref"]


def save_checkpoint(out: Path, step: int, args: Args, policy, value, tok, opt, sched, prec, rng, ptx_rng,
                    beta: float, beta_pen: float, trpo_failures: int, start: dict, start_texts: list,
                    ev: dict, final_texts: list) -> None:
    """--save-every: what step + 1 needs (the models, the optimiser, the generators, β and β_pen, the
    start and latest evaluations); `resume` reads it back."""
    harness.save_checkpoint(out, step, args, {"model": policy, "value_model": value.lm,
                                             "value_head": value.head}, {
        **harness.training_state(opt, sched, prec), "data_rng": rng.bit_generator.state,
        "ptx_rng": ptx_rng.bit_generator.state, "beta": beta, "beta_pen": beta_pen,
        "trpo_failures": trpo_failures, "start": start, "start_texts": start_texts, "ev": ev,
        "final_texts": final_texts}, tok)


def save_and_summarise(args: Args, out: Path, policy, value, tok, log, start: dict, start_texts: list,
                       ev: dict, final_texts: list, beta: float, beta_pen: float, trpo_failures: int,
                       rm_path: Path, eval_prompts: list, gold: bool, device, t_start: float,
                       train_seconds: float, load_seconds: float) -> dict:
    """Save the policy (and the value model), write summary.json, print the summary; -> the summary."""
    model_dir = harness.save_policy(policy, tok, out, args.save_model)
    if args.save_model:  # the value model too: its LM folder and its head
        value.lm.save_pretrained(out / "value_model")
        torch.save({"weight": value.head.weight.detach().cpu().reshape(-1),
                    "bias": value.head.bias.detach().cpu().reshape(())},
                   out / "value_model" / "value_head.pt")
    summary = log.summary({
        "script": "ppo",
        "start_gold_reward": start["eval/gold_reward"],
        "final_gold_reward": ev["eval/gold_reward"],
        "start_score": start["eval/score"],
        "final_score": ev["eval/score"],
        "kl_to_ref": ev["eval/kl_to_ref"],
        "start_mean_length": start["eval/mean_length"],
        "final_mean_length": ev["eval/mean_length"],
        "final_beta": beta,
        "policy_loss": args.policy_loss,
        **({"final_penalty_beta": beta_pen} if args.policy_loss == "kl-penalty" else {}),
        **({"trpo_line_search_failures": trpo_failures} if args.policy_loss == "trpo" else {}),
        "reward_model": str(rm_path),
        "eval_samples": args.eval_samples,
        "examples_before": start_texts[:4],
        "examples_after": final_texts[:4],
        "steps": args.steps,
        "model_dir": model_dir,
        **harness.run_facts(args, device, t_start, train_seconds, load_seconds),
    })
    log.close()
    print(f"\n=== PPO summary ({out})")
    print(f"score (reward model) of samples: {summary['start_score']:+.3f} -> {summary['final_score']:+.3f}"
          + (f"   gold reward: {summary['start_gold_reward']:+.3f} -> {summary['final_gold_reward']:+.3f}"
             if gold else "")
          + f"   KL to π_ref {summary['kl_to_ref']:.2f} nats, β {beta:.4g}")
    print(f"{args.steps} steps, {summary['wall_seconds']:.0f}s wall ({train_seconds:.0f}s training)")
    for x, a, b in zip(eval_prompts[:4], start_texts[:4], final_texts[:4]):
        print(f"  {x!r:>14}  before: {a!r}\n  {'':>14}  after:  {b!r}")
    return summary


if __name__ == "__main__":
    harness.main(Args, train, __doc__)

