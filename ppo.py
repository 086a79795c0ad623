"""RLHF with PPO: the InstructGPT pipeline (reward model, value model, KL-shaped reward, GAE, PPO-clip,
adaptive KL control, PPO-ptx).

Notes: `000_e75205f5b80b652d.txt`, "GAE", "PPO" and "RLHF + PPO" (R(x, y) = r_φ(x, y) − β log π/π_ref);
`003_0bc5d2784dac14e1.txt`, the objective with its KL and LM (pretraining) terms;
`004_e77bb721393eb42b.txt`, "GAE", "PPO - CLIP", "PPO - Penalty" (the adaptive β rule) and
"PPO's Advantage Estimator" (the per-token reward and the critic fitted by MSE to the returns).

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
        repeat ppo_epochs times, for each mini-batch:
            ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t)
            L_clip = −mean_t min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t)
            L_V    = ½ mean_t max((V_ψ(s_t) − R_t)², (clip(V_ψ, V_old ± ε_v) − R_t)²)
            L_ptx  = mean over SFT text of −log π_θ(y|x)                  (PPO-ptx, if λ_ptx > 0)
            (θ, ψ) ← AdamW step on L_clip + c_V L_V + λ_ptx L_ptx
        β ← KL controller(β, KL of this rollout to π_ref)          (fixed, adaptive, proportional)
        every `eval_every` steps: held-out prompts: gold reward, score and KL to π_ref of samples

Which position gets the score: the last token of the completion, i.e. its EOS when it finished,
otherwise its last sampled token (the token limit). The reward model reads its head at that same
token (the last real token of prompt + completion), so the score is the value of the whole text,
and it enters the return of every earlier token through GAE.

On the built-in task (common.py, "the preference task") the reward model was fitted to noisy labels
of a hidden gold reward, so a sample's gold reward tells how good it really is: the score (the
proxy) can be gamed, the gold reward cannot. It is logged, never used in training.

Run:
    python ppo.py                                        # built-in task, `tiny-pref`, CPU, minutes
    python ppo.py --kl-control adaptive --target-kl 2    # the notes' PPO-penalty rule for β
    python ppo.py --beta 0 --steps 600                   # no KL penalty: watch the proxy get gamed
    python ppo.py --ptx-coef 0.5                         # PPO-ptx: keep the SFT likelihood up
    python ppo.py --model PATH/sft --reward-model runs/reward_model__s1__.../model --data pairs.jsonl \\
        --batch-size 64 --mini-batches 4 --micro-batch 8 --lr 1e-6 --max-new-tokens 128   # one GPU
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

import common
import reward_model as rm_lib
from common import check, masked_mean


@dataclass
class Args:
    model: str = "tiny-pref"
    """--model NAME_OR_PATH: the SFT policy to start from, also the reference π_ref (a Hugging Face
    causal LM folder, or hub name if cached), or `tiny-pref`, the embedded SFT policy"""
    reward_model: Optional[str] = None
    """folder saved by reward_model.py (`<its run>/model`), or `tiny-pref-rm`, the shipped one of the
    built-in task; default: `tiny-pref-rm` for the built-in task, else train one first with
    reward_model.py's defaults on the same --model and --data"""
    data: Optional[str] = None
    """JSONL preference pairs {"prompt", "chosen", "rejected"}: their prompts are PPO's prompts, their
    chosen texts the PPO-ptx data (and the reward model's data when it is trained here); default:
    the built-in task"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the final policy; default runs/ppo__s<seed>__<time>"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""
    seed: int = 1
    """seed of Python's random, numpy and torch (sampling included); the evaluation uses seed+1"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; default: CUDA when present, else the CPU"""
    dtype: str = "auto"
    """compute dtype of the forward passes (autocast): auto (bfloat16 on a GPU that supports it,
    else float32), float32, bfloat16 or float16 (with loss scaling); every model's weights stay
    float32, the frozen ones too, so that π_θ = π_ref exactly at step 0"""

    steps: int = 150
    """PPO steps; each is one rollout batch and ppo_epochs passes over it"""
    batch_size: int = 64
    """prompts per rollout, one completion each"""
    mini_batches: int = 4
    """mini-batches per rollout batch: one optimiser step each (batch_size must divide evenly)"""
    ppo_epochs: int = 4
    """passes over each rollout batch (TRL's default: 4)"""
    micro_batch: Optional[int] = None
    """sequences per forward/backward pass inside a mini-batch (gradient accumulation); default:
    the whole mini-batch"""
    max_new_tokens: int = 20
    """completion token limit (20 fits the built-in task; ~128+ for a real model)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken of the same tempered distribution"""
    lr: float = 3e-4
    """learning rate of AdamW, for the policy and the value model (tiny-pref: 1e-4..1e-3; a 0.5B+
    model: ~1e-6 for the policy)"""
    warmup_steps: int = 5
    """PPO steps of linear learning-rate warm-up from 0; then constant"""
    grad_clip: float = 1.0
    """clip the gradient norm of the policy and of the value model, each on its own (0 disables)"""

    epsilon: float = 0.2
    """ε, the policy's clip range: ρ is clipped to [1−ε, 1+ε]"""
    gamma: float = 1.0
    """γ, the discount in GAE, in [0, 1] (RLHF: 1, the episode is one short completion)"""
    lam: float = 0.95
    """λ of GAE, in [0, 1]: 0 is the one-step TD residual, 1 the Monte Carlo return minus V"""
    whiten_advantages: bool = True
    """whiten Â over the batch's completion tokens (masked, Bessel std) before the loss"""
    whiten_scores: bool = False
    """whiten the reward model's scores over the batch before they enter r_t"""
    vf_coef: float = 0.1
    """c_V, the value loss weight in the summed loss (TRL: 0.1); with Adam and separate clipping
    it mostly sets the value model's step size relative to its gradient noise"""
    cliprange_value: float = 0.2
    """ε_v: the new value is clipped to V_old ± ε_v in the clipped value loss (0 disables clipping)"""
    value_init: Literal["reward", "policy"] = "reward"
    """start the value model from the reward model (InstructGPT, TRL) or from the SFT policy with a
    zero head (V = 0 at the start)"""

    beta: float = 0.05
    """β, the initial KL penalty coefficient in r_t = −β (log π − log π_ref) (InstructGPT: 0.02)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL in the reward: k1 = log π − log π_ref (InstructGPT, TRL's default; can be
    negative per token), k3 = ρ_ref − 1 − log ρ_ref with ρ_ref = π_ref/π (never negative)"""
    kl_control: Literal["fixed", "adaptive", "proportional"] = "fixed"
    """fixed β; adaptive: the notes' PPO-penalty rule (halve β if d < d_targ/1.5, double it if
    d > 1.5·d_targ); proportional: Ziegler et al. 2019, β ← β(1 + clip(d/d_targ − 1, ±0.2)·n/horizon)"""
    target_kl: float = 2.0
    """d_targ in nats per completion, for the adaptive and proportional controllers"""
    kl_horizon: int = 10000
    """the proportional controller's horizon in completions (Ziegler et al.: 10,000)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a completion that hit the token limit without EOS (the 'EOS
    trick'; TRL's missing_eos_penalty); 0 disables"""

    ptx_coef: float = 0.0
    """λ of PPO-ptx: weight of the SFT language-model loss mean −log π_θ(y|x) added to every
    optimiser step (InstructGPT's γ; 0 is plain PPO)"""
    ptx_batch: int = 16
    """SFT examples per optimiser step for the PPO-ptx term"""

    eval_every: int = 25
    """steps between evaluations (held-out prompts: gold reward, score and KL to π_ref of samples)"""
    eval_samples: int = 500
    """completions sampled per evaluation (held-out prompts, temperature 1, the same seed every time)"""
    log_every: int = 10
    """steps between printed lines (every step is written to metrics.jsonl)"""
    save_model: bool = True
    """save the final policy with save_pretrained into <out-dir>/model (the value model into
    <out-dir>/value_model)"""


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

    kl_estimator "k1": log π − log π_ref, unbiased for the KL when y ~ π, negative on some tokens.
    "k3": e^x − 1 − x with x = log π_ref − log π, also unbiased, never negative, lower variance.
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
        R_t = Â_t + V(s_t)                  (the value model's regression target)

    rewards, values, mask: [B, T].  -> (advantages [B, T], returns [B, T]), 0 at padding.
    The episode ends at each row's last masked token, so V(s_{t+1}) = 0 there (terminal: nothing is
    earned after the EOS) and the sum stops: a padded position never reaches a real one, whatever
    values or rewards the padding holds. λ = 0 gives the TD residual δ_t; λ = 1 (with γ = 1) gives
    Σ_{l≥0} r_{t+l} − V(s_t), the Monte Carlo return minus the value.
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
    smaller); approx_kl, the k3 estimate of D_KL(π_old ‖ π_θ) = mean(ρ − 1 − log ρ), the quantity
    the notes' PPO-penalty calls d.
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
    from R is paid in full. clip ≤ 0 gives the plain MSE ½ mean (V − R)², the notes' critic loss.
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

    The notes apply it to d = KL(π_old, π_θ) of the penalised PPO objective. Here, as in RLHF
    practice, d is the rollout's KL to π_ref in nats per completion and β the coefficient of the
    KL-shaped reward: the same rule, steering the distance that the RLHF objective penalises.
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over the mask (population variances): 1 is a perfect critic, 0 one
    that does no better than the mean return, < 0 worse than that. NaN when Var[R] = 0."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


#####################################################################################################
#####  the value model: an LM with a scalar head on every position
#####################################################################################################


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
#####  set-up helpers: the reward model (trained here when none is given), the prompts, SFT data
#####################################################################################################


def default_reward_model(args: Args, out: Path | None) -> Path:
    """No --reward-model: for the built-in task (tiny-pref, no --data), the shipped reward model
    `models/tiny-pref-rm` (reward_model.py's defaults on the shipped tiny-pref, seed 1). Otherwise
    train one with reward_model.py's defaults (seed 1) on --model and --data, into
    <out-dir>/reward_model. Returns the folder of the reward model."""
    if args.model == "tiny-pref" and args.data is None:
        path = Path(common.resolve_model_path("tiny-pref-rm"))
        print(f"no --reward-model given: using the shipped one of the built-in task ({path})")
        return path
    print("no --reward-model given: training one first (reward_model.py, its defaults, seed 1, "
          f"--model {args.model}" + (f", --data {args.data}" if args.data else "") + ")", flush=True)
    run = out / "reward_model"
    summary = rm_lib.train(rm_lib.Args(model=args.model, data=args.data, out_dir=str(run),
                                       overwrite=True, seed=1, device=args.device, dtype=args.dtype))
    print(f"reward model trained: held-out pair accuracy {summary['heldout_accuracy']:.3f}; "
          f"saved in {run / 'model'}")
    return run / "model"


def check_same_vocab(tok, rm_tok, where: str) -> None:
    """PPO hands the policy's token ids to the reward model, so both must use one vocabulary."""
    v1, v2 = tok.get_vocab(), rm_tok.get_vocab()
    check(v1 == v2, f"--reward-model {where}: its tokenizer's vocabulary ({len(v2)} tokens) differs "
                    f"from --model's ({len(v1)} tokens); PPO scores the policy's token ids directly, "
                    "so train the reward model on the same tokenizer (reward_model.py --model <SFT policy>)")


def sft_batches(args: Args, train_pairs: list[dict], seed: int):
    """An endless stream of (prompts, completions) for the PPO-ptx term: the SFT policy's own
    training distribution (the grammar of `common.sample_review`) for the built-in task, else the
    chosen completions of the --data pairs."""
    rng = np.random.default_rng(seed)
    while True:
        if args.data is None:
            prompts, comps = zip(*(common.sample_review(rng) for _ in range(args.ptx_batch)))
        else:
            rows = [train_pairs[i] for i in rng.integers(len(train_pairs), size=args.ptx_batch)]
            prompts, comps = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
        yield list(prompts), list(comps)


#####################################################################################################
#####  training
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
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
    check(args.epsilon > 0, f"--epsilon must be > 0 (got {args.epsilon})")
    check(args.cliprange_value >= 0, f"--cliprange-value must be ≥ 0 (got {args.cliprange_value})")
    check(args.vf_coef > 0, f"--vf-coef must be > 0 (got {args.vf_coef}): the value model must learn")
    check(args.ptx_coef >= 0, f"--ptx-coef must be ≥ 0 (got {args.ptx_coef})")
    check(args.missing_eos_penalty >= 0, f"--missing-eos-penalty must be ≥ 0 (got {args.missing_eos_penalty})")
    check(args.temperature > 0, f"--temperature must be > 0 (got {args.temperature})")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.batch_size >= 2 or not args.whiten_scores,
          "--whiten-scores needs --batch-size ≥ 2: the std of a single score is undefined")
    if args.reward_model is not None:
        folder = Path(common.resolve_model_path(args.reward_model)).expanduser()
        check(folder.is_dir(), f"--reward-model {args.reward_model}: no such folder (give the `model` "
                               "folder of a reward_model.py run, or leave the flag out to train one)")
        check((folder / rm_lib.HEAD_FILE).is_file(),
              f"--reward-model {args.reward_model}: no {rm_lib.HEAD_FILE} in this folder, so it is not a "
              "reward model saved by reward_model.py (give the `model` folder inside its run folder)")


def train(args: Args) -> dict:
    validate(args)
    t_start = time.time()
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    prec = common.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    train_pairs, heldout = common.load_preferences(args.data)
    gold = args.data is None  # the hidden gold reward exists only for the built-in task
    prompts_all = [p["prompt"] for p in train_pairs]
    eval_prompts = [heldout[i % len(heldout)]["prompt"] for i in range(args.eval_samples)]

    ##### the four models
    path = common.resolve_model_path(args.model)
    policy, tok = common.load_model(path, device)  # π_θ, float32 weights
    policy.eval()  # no dropout: ρ must be exactly 1 on the first mini-batch
    ref = common.load_model(path, device, trainable=False)[0]  # π_ref, frozen, float32: = π_θ at step 0
    out = common.prepare_run_dir(args.out_dir or common.default_run_dir("ppo", args.seed), args.overwrite)
    rm_path = (Path(common.resolve_model_path(args.reward_model)).expanduser() if args.reward_model
               else default_reward_model(args, out))
    rm, rm_tok = rm_lib.load_reward_model(rm_path, device)  # r_φ, frozen
    check_same_vocab(tok, rm_tok, str(rm_path))
    if args.value_init == "reward":
        value = value_model_from_reward_model(rm)  # V_ψ = r_φ's head on every prefix
    else:
        value = ValueModel(copy.deepcopy(policy))  # the SFT policy's LM, head = 0
    value.eval()  # no dropout in the value model either
    common.seed_everything(args.seed)  # the same rollouts whether or not a reward model was trained
    params = [{"params": list(policy.parameters())}, {"params": list(value.parameters())}]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))  # s counts PPO steps from 0
    ptx_data = sft_batches(args, train_pairs, args.seed + 2) if args.ptx_coef > 0 else None
    load_seconds = time.time() - t_start

    @torch.no_grad()
    def score(ids, mask, finished):
        """r_φ at the last real token, minus the EOS-trick penalty where the completion did not end."""
        with prec.autocast():
            s = rm(ids, mask).float()  # [b]
        return s - args.missing_eos_penalty * (~finished).float()  # [b]

    def evaluate() -> dict:
        """Samples for the held-out prompts (fixed seed): gold reward, score, KL to π_ref and length,
        by the same function as dpo.py's evaluation, so that the two compare."""
        with prec.autocast():
            s = common.sample_and_score(policy, ref, tok, eval_prompts, args.max_new_tokens, args.seed + 1,
                                        gold, score_fn=score)
        return {"eval/gold_reward": s["gold_reward"], "eval/score": s["score"],
                "eval/kl_to_ref": s["kl_to_ref"], "eval/mean_length": s["mean_length"], "texts": s["texts"]}

    log = common.RunLogger(out)
    n_params = sum(p.numel() for p in policy.parameters()) / 1e6
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} ({n_params:.2f}M "
          f"parameters)  |  reward model {rm_path}  |  value model from the {args.value_init}")
    start = evaluate()
    start_texts = start.pop("texts")
    log.log(0, {**start, "objective/beta": args.beta})
    print(f"before training: score {start['eval/score']:+.3f}"
          + (f", gold reward {start['eval/gold_reward']:+.3f}" if gold else "") + " of samples")

    beta, B = args.beta, args.batch_size
    mb_size = B // args.mini_batches
    micro = min(args.micro_batch or mb_size, mb_size)
    rng = np.random.default_rng(args.seed)
    ev, final_texts, t_train = dict(start), start_texts, time.time()
    for step in range(1, args.steps + 1):
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
                   for c in chunks]
            old_logp = torch.cat([o[0] for o in old])  # log π_old(y_t|s_t)   [B, T]
            entropy = masked_mean(torch.cat([o[1] for o in old]), c_mask)  # mean H(π_old(·|s_t))
            ref_logp = torch.cat([common.token_logprobs(ref, ids[c], mask[c], T, args.temperature)[0]
                                  for c in chunks])  # log π_ref(y_t|s_t)   [B, T]
            old_values = torch.cat([value(ids[c], mask[c], T) for c in chunks]).float()  # V_old(s_t) [B, T]
            scores = torch.cat([score(ids[c], mask[c], finished[c]) for c in chunks])  # s   [B]

        ##### 3. rewards, GAE, returns
        with torch.no_grad():
            s = scores
            if args.whiten_scores:
                s = (scores - scores.mean()) / (scores.std() + 1e-8)  # Bessel std, over the batch
            rewards, kl = kl_shaped_rewards(s, old_logp, ref_logp, c_mask, beta, args.kl_estimator)  # [B, T]
            adv, returns = gae(rewards, old_values, c_mask, args.gamma, args.lam)  # Â_t, R_t   [B, T]
            if args.whiten_advantages:
                adv = common.masked_whiten(adv, c_mask)  # (Â − mean) / std over the batch's tokens
            seq_kl = kl.sum(1)  # Σ_t KL_t, nats per completion   [B]
            ev_value = explained_variance(old_values, returns, c_mask)

        ##### 4. ppo_epochs passes over shuffled mini-batches; each mini-batch is one optimiser step
        stats: dict[str, list[float]] = {}
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
                        logp = common.token_logprobs(policy, ids[sub], mask[sub], T, args.temperature)[0]
                        v = value(ids[sub], mask[sub], T)  # V_ψ(s_t)   [b, T]
                    pg_loss, pm = ppo_clip_loss(logp, old_logp[sub], adv[sub], c_mask[sub], args.epsilon)
                    vf_loss, vm = clipped_value_loss(v, old_values[sub], returns[sub], c_mask[sub],
                                                     args.cliprange_value)
                    loss = pg_loss + args.vf_coef * vf_loss  # L_clip + c_V L_V
                    prec.backward(loss * w)
                    for name, val in (("loss/policy", pg_loss), ("loss/value", vf_loss), *pm.items(), *vm.items()):
                        acc[name] = acc.get(name, 0.0) + float(val.detach()) * w
                if ptx_data is not None:  # PPO-ptx: λ · mean −log π_θ(y|x) on SFT text
                    px, py = next(ptx_data)
                    p_ids2, p_mask2, p_cmask, Tp = common.encode_prompt_completion(tok, px, py, device)
                    with prec.autocast():
                        lp = common.token_logprobs(policy, p_ids2, p_mask2, Tp)[0]  # [b, Tp]
                    ptx_loss = -masked_mean(lp, p_cmask)  # next-token NLL of the SFT completions
                    prec.backward(args.ptx_coef * ptx_loss)
                    acc["loss/ptx"] = float(ptx_loss.detach())
                acc["policy/grad_norm"], acc["value/grad_norm"] = prec.step(
                    opt, policy.parameters(), value.parameters(), max_norm=args.grad_clip)  # each clipped
                opt.zero_grad(set_to_none=True)
                for name, val in acc.items():
                    stats.setdefault(name, []).append(val)
        sched.step()

        ##### 5. KL control: β for the next rollout, from this rollout's KL to π_ref
        d = float(seq_kl.mean())
        beta_used = beta
        if args.kl_control == "adaptive":
            beta = adaptive_beta(beta, d, args.target_kl)
        elif args.kl_control == "proportional":
            beta = proportional_beta(beta, d, args.target_kl, B, args.kl_horizon)

        ##### 6. log
        non_score = float((-beta_used * kl).sum(1).mean())  # mean −β Σ_t KL_t
        metrics = {
            "objective/scores": float(scores.mean()),
            "objective/kl": d,
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": float(scores.mean()) + non_score,
            "objective/beta": beta_used,
            "policy/entropy": float(entropy),
            "policy/approx_kl": float(np.mean(stats["approx_kl"])),
            "policy/clipfrac": float(np.mean(stats["clipfrac"])),
            "policy/ratio_mean": float(np.mean(stats["ratio_mean"])),
            "loss/policy": float(np.mean(stats["loss/policy"])),
            "loss/value": float(np.mean(stats["loss/value"])),
            "value/clipfrac": float(np.mean(stats["vf_clipfrac"])),
            "value/explained_variance": ev_value,
            "value/mean": float(masked_mean(old_values, c_mask)),
            "value/returns_mean": float(masked_mean(returns, c_mask)),
            "policy/grad_norm": float(np.mean(stats["policy/grad_norm"])),
            "value/grad_norm": float(np.mean(stats["value/grad_norm"])),
            "completions/mean_length": float(c_mask.sum(1).float().mean()),
            "completions/no_eos_frac": 1.0 - float(finished.float().mean()),
            "charts/lr": opt.param_groups[0]["lr"],
            "time/step_seconds": time.time() - t0,
            "time/generate_seconds": t_gen,
        }
        if gold:
            metrics["objective/gold_reward"] = float(np.mean([common.gold_reward(t) for t in texts]))
        if ptx_data is not None:
            metrics["loss/ptx"] = float(np.mean(stats["loss/ptx"]))
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate()
            final_texts = ev.pop("texts")
            metrics.update(ev)
        keys = ["objective/scores", "objective/gold_reward", "objective/kl", "objective/beta",
                "policy/clipfrac", "value/explained_variance", "completions/mean_length",
                "eval/score", "eval/gold_reward", "eval/kl_to_ref"]
        log.log(step, metrics, keys if (step % args.log_every == 0 or step == args.steps
                                        or "eval/score" in metrics) else [])
    train_seconds = time.time() - t_train

    ##### 7. save and summarise
    model_dir = common.save_policy(policy, tok, out, args.save_model)
    if args.save_model:  # the value model too: its LM folder and its head
        value.lm.save_pretrained(out / "value_model")
        torch.save({"weight": value.head.weight.detach().cpu().reshape(-1),
                    "bias": value.head.bias.detach().cpu().reshape(())}, out / "value_model" / "value_head.pt")
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
        "reward_model": str(rm_path),
        "eval_samples": args.eval_samples,
        "examples_before": start_texts[:4],
        "examples_after": final_texts[:4],
        "steps": args.steps,
        "model_dir": model_dir,
        **common.run_facts(args, device, t_start, train_seconds, load_seconds),
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
    common.main(Args, train, __doc__)
