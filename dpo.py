"""DPO: Direct Preference Optimization, and its variants (IPO, hinge, conservative, length-normalised,
reference-free).

Notes: `003_0bc5d2784dac14e1.txt`, "DPO" (the loss and its derivation), "DPO updates are scaled by
the prediction error of the implied reward model" (the gradient weight) and "Variants of DPO";
`000_e75205f5b80b652d.txt`, "Direct Preference Optimization".

The KL-regularised objective max_π E[r(y)] − β D_KL(π ‖ π_ref) is solved by
π*(y|x) = π_ref(y|x) exp(r(y)/β) / Z(x), so r(y) = β log π*(y|x)/π_ref(y|x) + β log Z(x). Put that
into the Bradley–Terry likelihood and Z cancels: the policy is trained on the preference pairs
directly, with the implicit reward β log π_θ/π_ref in place of a reward model. No sampling, no
value network: a supervised loop over fixed pairs.

    log π_ref(y_w|x), log π_ref(y_l|x) for every pair, once, before training      (summed over the
                                                                completion's tokens; prompt excluded)
    for epoch = 1 .. epochs:
        for each batch of pairs (x, y_w, y_l):
            Δ = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]
            L = mean[ −log σ(β Δ) ]                            (or a variant, see `dpo_loss`)
            θ ← θ − lr ∇_θ L          (∇ = −β σ(−βΔ) [∇log π_θ(y_w|x) − ∇log π_θ(y_l|x)],
                                        σ(−βΔ) = σ(r̂(x,y_l) − r̂(x,y_w)) with r̂ = β log π_θ/π_ref)
        every `eval_every` steps: held-out pair accuracy of the implicit reward; samples from π_θ:
                                  their gold reward and the KL to π_ref

On the built-in task (tasks.py, "the preference task") the pairs were labelled by a hidden gold
reward, so the policy's samples can be scored with it before and after: the gold reward is used
only there, never in training.

Run:
    python dpo.py                                     # the built-in task, `tiny-pref`, CPU, ~1 minute
    python dpo.py --beta 0.5                          # stay closer to the reference
    python dpo.py --loss-type ipo --beta 0.5          # IPO;  also: hinge, length_norm, reference_free
    python dpo.py --label-smoothing 0.1               # conservative DPO (labels flipped 10% of the time)
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data pairs.jsonl --chat-template --batch-size 8 \\
        --micro-batch 1 --lr 5e-7 --epochs 1 --max-new-tokens 256 --max-length 1024   # one GPU, your pairs
    python dpo.py --save-every 100 --out-dir runs/x    # a checkpoint every 100 steps; stopped by
    python dpo.py --resume runs/x                      # Ctrl-C, it goes on from the last one
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
from common import check, masked_sum
from tasks import sample_and_score  # the evaluation ppo.py shares

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "length_norm", "reference_free")
PER_TOKEN_AVERAGED = ("ipo", "length_norm")  # these take log-probs averaged over the completion
LOGISTIC = ("sigmoid", "length_norm", "reference_free")  # −log σ(βΔ): label smoothing applies


@dataclass
class Args:
    model: str = "tiny-pref"
    """--model NAME_OR_PATH: the SFT policy to start from, which is also the reference π_ref (a
    Hugging Face causal LM folder, or hub name if cached), or `tiny-pref`, the embedded SFT policy
    (TRL: the model argument; ref_model defaults to it too)"""
    data: Optional[str] = None
    """JSONL file of preference pairs {"prompt", "chosen", "rejected"}: text, or TRL's conversational
    lists of {"role", "content"} messages, with or without "prompt" (the last fifth, at most 1,000
    pairs, is held out); default: the built-in task's pairs, labelled by a hidden gold reward"""
    chat_template: bool = False
    """render text pairs as a user message and an assistant reply with the tokenizer's chat template
    (for instruct models); rows of messages always use it"""
    max_length: Optional[int] = 1024
    """keep the first this many tokens of each prompt + completion + EOS, and drop the pairs whose
    prompt alone has that many, as TRL does (truncation_mode keep_start); the run reports how many
    pairs were cut and dropped (TRL: max_length); none keeps everything"""
    out_dir: Optional[str] = None
    """run folder for metrics.jsonl, summary.json and the final policy; default
    runs/dpo__s<seed>__<time> (TRL: output_dir)"""
    overwrite: bool = False
    """allow --out-dir to name a folder that already holds a run"""
    seed: int = 1
    """seed of Python's random, numpy and torch (data order; the evaluation samples use seed+1)
    (TRL: seed)"""
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
    the policy: activation memory of one layer instead of all, for about one more forward
    pass per backward; the same gradients up to float rounding (TRL: gradient_checkpointing)"""

    beta: float = 0.1
    """β, the strength of the KL regularisation that the implicit reward β log π/π_ref stands for:
    small β lets π_θ move far from π_ref (DPO paper: 0.1..0.5; IPO and length_norm use larger β,
    Tülu 3's length-normalised DPO used 5) (TRL: beta)"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "length_norm", "reference_free"] = "sigmoid"
    """sigmoid: the notes' DPO; ipo: (Δ − 1/(2β))² on per-token-averaged log-ratios; hinge:
    max(0, 1 − βΔ); length_norm: DPO on per-token-averaged log-ratios (Tülu 3); reference_free:
    DPO with log π_ref = 0. See `dpo_loss` (TRL: loss_type sigmoid, ipo, hinge, sigmoid_norm =
    length_norm; TRL 1.16 has no reference_free)"""
    label_smoothing: float = 0.0
    """ε of conservative DPO (cDPO): the probability that a label is flipped, for the logistic
    losses (sigmoid, length_norm, reference_free); 0 is plain DPO, keep it below 0.5 (TRL's
    label_smoothing means this only for its robust/exo losses)"""
    epochs: int = 2
    """passes over the training pairs (DPO papers: 1..3) (TRL: num_train_epochs)"""
    batch_size: int = 32
    """preference pairs per optimiser step (each pair is two sequences) (TRL:
    per_device_train_batch_size × gradient_accumulation_steps × GPUs)"""
    micro_batch: Optional[int] = None
    """preference pairs per forward/backward pass (gradient accumulation), 1..batch_size; default:
    the whole batch. It changes no number but float rounding: the loss of a micro-batch of n pairs
    out of B is weighted n/B, so the summed gradient is the batch mean's. π_ref's log-probs and the
    evaluation take passes of the same size (TRL: per_device_train_batch_size, with
    gradient_accumulation_steps)"""
    lr: float = 3e-4
    """peak learning rate of AdamW (tiny-pref: 1e-4..1e-3, where 1e-3 gains more gold reward at a
    KL several times larger and breaks the grammar; a 0.5B+ model: ~5e-7, as in the DPO paper)
    (TRL: learning_rate)"""
    max_steps: Optional[int] = None
    """stop after this many optimiser steps (for quick runs); default: epochs × pairs / batch size
    (TRL: max_steps)"""
    warmup_steps: int = 10
    """steps of linear learning-rate warm-up from 0; then linear decay to 0 at the last step (TRL:
    warmup_steps, lr_scheduler_type linear)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 disables) (TRL: max_grad_norm)"""

    eval_every: int = 50
    """steps between evaluations (held-out pair accuracy, gold reward and KL of samples) (TRL:
    eval_steps)"""
    eval_size: int = 1000
    """held-out pairs per evaluation of the implicit reward's pair accuracy"""
    eval_samples: int = 500
    """completions sampled from π_θ per evaluation (held-out prompts, temperature 1, the same seed
    every time), for their gold reward and the KL to π_ref"""
    max_new_tokens: int = 20
    """token limit of those samples (20 fits the built-in task; ~256+ for a real model)"""
    log_every: int = 25
    """steps between printed lines (every step is written to metrics.jsonl) (TRL: logging_steps)"""
    save_model: bool = True
    """save the final policy with save_pretrained into <out-dir>/model"""
    save_every: int = 0
    """steps between checkpoints, <out-dir>/checkpoint-<step>/: the policy (save_pretrained), the optimiser, the
    scheduler, the RNG states and the step, all that --resume needs to continue exactly; 0: none
    (TRL: save_steps)"""
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
    ModelConfig: 16); π_ref is the base with the adapters off, not a second copy; <out-dir>/model holds the
    adapter as peft saves it (AutoPeftModelForCausalLM loads it) (TRL: peft_config)"""
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
#####  the maths: sequence log-probs and the DPO losses (pure functions, no state, only torch)
#####################################################################################################


def sequence_logps(token_logps: torch.Tensor, completion_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion's tokens only.  [B, T] -> [B]

    token_logps: [B, T] from `common.token_logprobs`, which scores only the completion columns, so
    the prompt's tokens never count. completion_mask: [B, T], 1 on the completion's tokens and EOS.
    With `average`: (1/|y|) Σ_t, the per-token average (IPO, length-normalised DPO).
    """
    total = masked_sum(token_logps, completion_mask, dim=1)  # Σ_t log π(y_t|x, y_<t)   [B]
    if average:
        return total / completion_mask.sum(dim=1).clamp(min=1)  # (1/|y|) Σ_t   [B]
    return total  # [B]


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (notes `003`, "DPO"), and conservative DPO with label smoothing ε:  [B] -> [B]

        L = −(1 − ε) log σ(β Δ) − ε log σ(−β Δ)

    ε = 0 is the notes' loss −log σ(βΔ): Bradley–Terry with the implicit reward. ε > 0 is the
    expected loss when each label is flipped with probability ε, so the loss no longer goes to 0 as
    Δ grows: its minimum is at βΔ = log((1 − ε)/ε), not at +∞.
    """
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
            - label_smoothing * F.logsigmoid(-beta * delta))  # [B]


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023), with Δ built from per-token-averaged log-ratios:  [B] -> [B]

        L = (Δ − 1/(2β))²

    A squared loss that pulls Δ to a finite target 1/(2β) instead of pushing it to +∞, so it does
    not overfit deterministic preferences. Here β plays the role of IPO's τ.
    """
    return (delta - 1 / (2 * beta)) ** 2  # [B]


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """Hinge (SLiC, Zhao et al. 2023):  [B] -> [B]

        L = max(0, 1 − β Δ)

    Zero once the implicit reward margin βΔ reaches 1; below it, the gradient is a constant −β.
    """
    return torch.relu(1 - beta * delta)  # [B]


def grad_weight(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The weight of a pair in the gradient of the logistic losses, divided by β:  [B] -> [B]

        ∇_θ L = −β · weight · [∇log π_θ(y_w|x) − ∇log π_θ(y_l|x)]
        weight = σ(−βΔ) = σ(r̂(x,y_l) − r̂(x,y_w))                    (notes `003`; ε = 0)
        weight = (1 − ε) σ(−βΔ) − ε σ(βΔ)                              (label smoothing ε)

    It is the implied reward model's error: near 1 when r̂ orders the pair wrongly, near 0 when it
    orders it right by a wide margin. Only the logistic losses (sigmoid, length_norm,
    reference_free) have it: IPO's gradient is 2(Δ − 1/(2β)) and hinge's a step, 1[βΔ < 1].
    """
    return (1 - label_smoothing) * torch.sigmoid(-beta * delta) - label_smoothing * torch.sigmoid(beta * delta)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """The DPO loss per pair, and the implicit rewards.

    policy_chosen_logps, policy_rejected_logps: [B], log π_θ(y_w|x), log π_θ(y_l|x), with gradient
    ref_chosen_logps, ref_rejected_logps:       [B], log π_ref(y_w|x), log π_ref(y_l|x) (ignored,
                                                and may be None, for reference_free)
    Each log-prob is summed over the completion's tokens, except for `ipo` and `length_norm`, whose
    callers pass per-token averages (1/|y|) Σ_t (`sequence_logps(..., average=True)`).

        Δ = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]

        sigmoid         L = −log σ(βΔ)                       the notes' DPO
                            −(1−ε) log σ(βΔ) − ε log σ(−βΔ)  with label_smoothing ε (cDPO)
        ipo             L = (Δ − 1/(2β))²                    Δ of per-token-averaged log-probs
        hinge           L = max(0, 1 − βΔ)                   SLiC
        length_norm     L = −log σ(βΔ)                       Δ of per-token-averaged log-probs
                                                             (Tülu 3's length-normalised DPO)
        reference_free  L = −log σ(β [log π_θ(y_w|x) − log π_θ(y_l|x)])       log π_ref := 0

    For sigmoid, ∂L/∂log π_θ(y_w|x) = −β σ(−βΔ) and ∂L/∂log π_θ(y_l|x) = +β σ(−βΔ): the notes'
    weight κ σ(−κΔ) with κ = β, where σ(−βΔ) = σ(r̂(x,y_l) − r̂(x,y_w)), so the whole weight is
    β σ(r̂_l − r̂_w) (see `grad_weight`): large when the implicit reward orders the pair wrongly,
    small when it already orders it right by a wide margin.

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), where the implicit rewards
    β (log π_θ(y|x) − log π_ref(y|x)) are detached (they are for logging).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if label_smoothing != 0.0 and loss_type not in LOGISTIC:
        raise ValueError(f"label_smoothing applies to {', '.join(LOGISTIC)}, not to {loss_type!r}")
    if loss_type == "reference_free":
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)  # log π_ref := 0   [B]
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)  # [B]
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # log π_θ(y_w|x)/π_ref(y_w|x)   [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # log π_θ(y_l|x)/π_ref(y_l|x)   [B]
    delta = chosen_logratios - rejected_logratios  # Δ   [B]
    if loss_type == "ipo":
        losses = ipo_loss(delta, beta)  # (Δ − 1/(2β))²   [B]
    elif loss_type == "hinge":
        losses = hinge_loss(delta, beta)  # max(0, 1 − βΔ)   [B]
    else:
        losses = sigmoid_loss(delta, beta, label_smoothing)  # −log σ(βΔ)   [B]
    chosen_rewards = beta * chosen_logratios.detach()  # r̂(x, y_w) = β log π_θ/π_ref   [B]
    rejected_rewards = beta * rejected_logratios.detach()  # r̂(x, y_l)   [B]
    return losses, chosen_rewards, rejected_rewards


#####################################################################################################
#####  log-probs of pairs, and the evaluation
#####################################################################################################


def fit_max_length(tokenizer, pairs: list[dict], max_length: int | None) -> tuple[list[dict], int, int]:
    """TRL's DPO rule (truncation_mode keep_start): each prompt + completion + EOS keeps its first
    `max_length` tokens (`common.encode_prompt_completion` cuts them), and a pair whose prompt alone
    has `max_length` tokens or more is dropped, as nothing of its completions would be left. The
    prompt counts as it is encoded, with BOS where the tokenizer adds one (`common.encode_prompts`).
    -> (kept pairs, how many of them get cut, how many were dropped)."""
    if max_length is None or not pairs:
        return pairs, 0, 0
    def n_tokens(key):
        return [len(ids) for ids in tokenizer([p[key] for p in pairs], add_special_tokens=False)["input_ids"]]
    prompt_lengths = [len(ids) for ids in common.encode_prompts(tokenizer, [p["prompt"] for p in pairs])]
    rows = list(zip(pairs, prompt_lengths, n_tokens("chosen"), n_tokens("rejected")))
    kept = [(pair, P, C, R) for pair, P, C, R in rows if P < max_length]
    cut = sum(P + max(C, R) + 1 > max_length for _, P, C, R in kept)  # + 1: the EOS
    if cut:  # do the cut pairs' chosen and rejected still differ in the tokens they keep?
        eos = [tokenizer.eos_token_id]
        same = sum((c + eos)[:max_length - P] == (r + eos)[:max_length - P] for (_, P, _, _), c, r in zip(
            kept, *(tokenizer([k[0][key] for k in kept], add_special_tokens=False)["input_ids"]
                    for key in ("chosen", "rejected"))))
        check(same < len(kept), f"--max-length {max_length} cuts every pair's chosen and rejected to the same "
                                "tokens, so the loss has nothing to compare (it stays at ln 2); raise it")
        if same:
            print(f"note: --max-length {max_length} cuts {same} of {len(kept)} pairs to the same chosen and "
                  "rejected tokens; they carry no preference")
    return [k[0] for k in kept], cut, len(rows) - len(kept)


def pair_logps(model, tokenizer, pairs: list[dict], device, average: bool = False,
               max_length: int | None = None):
    """log π(y_w|x), log π(y_l|x) of a batch of pairs in one forward pass of 2B sequences, each cut
    to its first `max_length` tokens. -> two tensors [B] (with a gradient if the model has one)."""
    B = len(pairs)
    ids, mask, c_mask, T = common.encode_prompt_completion(
        tokenizer, [p["prompt"] for p in pairs] * 2,
        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], device, max_length)  # [2B, P+T], [2B, T]
    logp, _ = common.token_logprobs(model, ids, mask, T)  # log π(y_t|x, y_<t)   [2B, T]
    seq = sequence_logps(logp, c_mask, average)  # log π(y|x)   [2B]
    return seq[:B], seq[B:]  # chosen [B], rejected [B]


@torch.no_grad()
def all_pair_logps(model, tokenizer, pairs: list[dict], device, average: bool, max_length: int | None = None,
                   batch_size: int = 256):
    """`pair_logps` over many pairs, without gradient: two tensors [N]."""
    c, r = zip(*(pair_logps(model, tokenizer, pairs[i:i + batch_size], device, average, max_length)
                 for i in range(0, len(pairs), batch_size)))
    return torch.cat(c), torch.cat(r)  # [N], [N]


def per_pass(args: Args) -> int:
    """Pairs per forward pass without gradient (π_ref's log-probs, evaluation): with --micro-batch,
    no more than a training pass holds, so that the memory the micro-batch fits is not exceeded
    there (at 1,024 tokens and a 152k vocabulary, one pair's logits are 0.3 G numbers); without it,
    256 (the CPU default's numbers depend on it, through float rounding)."""
    return args.micro_batch or 256


def implicit_reward_accuracy(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta: float,
                             loss_type: str) -> float:
    """Held-out pair accuracy of the implicit reward r̂ = β log π_θ/π_ref: the fraction of pairs
    with r̂(y_w) > r̂(y_l), a tie counting ½. So the untrained policy, where r̂ ≡ 0, scores 0.5,
    except with reference_free: there r̂ = β log π_θ, and at the start it scores how often the SFT
    policy itself finds y_w more likely than y_l."""
    _, r_c, r_r = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta, loss_type)
    return float(((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean())


#####################################################################################################
#####  training
#####################################################################################################


def validate(args: Args) -> None:
    """Bad flags get one clear line that names the flag."""
    check(args.grad_clip >= 0, f"--grad-clip must be ≥ 0 (got {args.grad_clip}; 0 disables it)")
    check(args.loss_type in LOSS_TYPES,
          f"--loss-type {args.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    check(args.beta > 0, f"--beta must be > 0 (got {args.beta}): it scales the implicit reward")
    check(0 <= args.label_smoothing < 0.5,
          f"--label-smoothing must be in [0, 0.5) (got {args.label_smoothing}): it is the probability "
          "that a label is wrong")
    check(args.label_smoothing == 0 or args.loss_type in LOGISTIC,
          f"--label-smoothing applies to the logistic losses ({', '.join(LOGISTIC)}), "
          f"not to --loss-type {args.loss_type}")
    for name in ("epochs", "batch_size", "eval_every", "eval_size", "eval_samples", "log_every",
                 "max_new_tokens"):
        value = getattr(args, name)
        check(value >= 1, f"--{name.replace('_', '-')} must be ≥ 1 (got {value})")
    check(args.micro_batch is None or args.micro_batch >= 1, f"--micro-batch must be ≥ 1 (got {args.micro_batch})")
    check(args.micro_batch is None or args.micro_batch <= args.batch_size,
          f"--micro-batch {args.micro_batch} must be ≤ --batch-size {args.batch_size} (pairs per forward pass)")
    check(args.lr > 0, f"--lr must be > 0 (got {args.lr})")
    check(args.warmup_steps >= 0, f"--warmup-steps must be ≥ 0 (got {args.warmup_steps})")
    check(args.max_steps is None or args.max_steps >= 1, f"--max-steps must be ≥ 1 (got {args.max_steps})")
    check(args.max_length is None or args.max_length >= 2, f"--max-length must be ≥ 2 (got {args.max_length})")
    harness.check_lr(args.lr)


def train(args: Args) -> dict:
    args, ckpt = harness.resume_run(args)  # --resume RUN_DIR: the run's own config and last checkpoint
    validate(args)
    t_start = time.time()
    harness.seed_everything(args.seed)
    device = harness.pick_device(args.device)
    prec = harness.MixedPrecision(device, args.dtype)  # fp32 weights, autocast forward passes
    gold = args.data is None  # the hidden gold reward exists only for the built-in task
    average = args.loss_type in PER_TOKEN_AVERAGED  # (1/|y|) Σ_t instead of Σ_t

    ##### models: the policy π_θ and the frozen reference π_ref, both the SFT policy at the start
    policy, ref, tok, train_pairs, heldout, cuts, max_length = load_pairs_and_models(args, ckpt, device, prec)
    eval_prompts = [heldout[i % len(heldout)]["prompt"] for i in range(args.eval_samples)]
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    harness.set_threads(args.threads, device, policy)  # CPU: 1 thread for a small model (see --threads)
    # the run folder is made only once the flags, the data and the model have all been accepted
    out = harness.prepare_run_dir(args.out_dir or harness.default_run_dir("dpo", args.seed), args.overwrite,
                                 resume=ckpt)
    rng = np.random.default_rng(args.seed)
    batches = [(epoch, order[i:i + args.batch_size]) for epoch in range(args.epochs)
               for order in [rng.permutation(len(train_pairs))]
               for i in range(0, len(order), args.batch_size)][: args.max_steps]  # (epoch, pair indices)
    total_steps = len(batches)
    sched = harness.lr_scheduler(opt, args.warmup_steps, total_steps, "linear")  # warm-up, then linear to 0

    ##### the reference log-probs, once, before training (π_ref never changes)
    used = np.unique(np.concatenate([idx for _, idx in batches]))  # the pairs training will see
    ref_c = torch.full((len(train_pairs),), float("nan"), device=device)  # log π_ref(y_w|x)   [N]
    ref_r = torch.full((len(train_pairs),), float("nan"), device=device)  # log π_ref(y_l|x)   [N]
    print(f"log π_ref of {len(used)} train and {len(heldout)} held-out pairs, once …", flush=True)
    with prec.autocast():
        ref_c[used], ref_r[used] = all_pair_logps(ref, tok, [train_pairs[j] for j in used], device, average,
                                                  max_length, per_pass(args))
        ref_hc, ref_hr = all_pair_logps(ref, tok, heldout, device, average, max_length, per_pass(args))  # [M]
    load_seconds = time.time() - t_start

    evaluate = evaluator(policy, ref, tok, heldout, ref_hc, ref_hr, eval_prompts, args, gold, device, prec,
                         max_length)
    log = harness.RunLogger(out, total_steps=total_steps)
    ceiling = tasks.ceiling_accuracy(heldout) if gold else None
    print_header(out, device, prec, args, policy, len(train_pairs), len(heldout), cuts, max_length)
    if ckpt is None:  # the start policy, at step 0
        start, start_texts = evaluate_start(evaluate, log, ceiling, len(heldout), args.eval_samples, gold)
        ev, final_texts, step = dict(start), start_texts, 0
    else:  # --resume: the figures of the run so far, and the state at the end of the checkpoint's step
        start, start_texts, ev, final_texts, step = resume(ckpt, opt, sched, prec)

    t_train = time.time()
    for step, (epoch, idx) in enumerate(batches[step:], step + 1):
        t0 = time.time()
        B, mb = len(idx), args.micro_batch or len(idx)  # pairs per forward/backward pass (--micro-batch)
        opt.zero_grad(set_to_none=True)
        parts = []  # per micro-batch, detached: the loss, r̂(x,y_w), r̂(x,y_l), log π_θ(y_w|x), log π_θ(y_l|x)
        for sub in (idx[i:i + mb] for i in range(0, B, mb)):  # gradient accumulation over micro-batches
            with prec.autocast():
                pc, pr = pair_logps(policy, tok, [train_pairs[j] for j in sub], device, average,
                                    max_length)  # log π_θ(y_w|x), log π_θ(y_l|x)   [b], [b]
            # Δ = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)], −log σ(βΔ)
            losses, r_c, r_r = dpo_loss(pc, pr, ref_c[sub], ref_r[sub], args.beta, args.loss_type,
                                        args.label_smoothing)  # the loss, r̂(x,y_w), r̂(x,y_l)   [b] each
            prec.backward(losses.mean() * (len(sub) / B))  # L = mean over the batch: this part's share b/B
            parts.append((losses.detach(), r_c, r_r, pc.detach(), pr.detach()))
        losses, r_c, r_r, pc, pr = (torch.cat(t) for t in zip(*parts))  # the whole batch's   [B] each
        loss = losses.mean()  # L = mean over the batch
        prec.unscale_(opt)  # float16 only: .grad back to the true gradient, before clipping
        grad_norm = common.clip_grad_norm(policy.parameters(), args.grad_clip)  # ‖g‖; g ← g·min(1, c/‖g‖)
        prec.step(opt)  # AdamW: θ ← θ − lr·Adam(g)
        sched.step()

        with torch.no_grad():
            margins = r_c - r_r  # β Δ   [B]
            metrics = {
                "loss": loss.item(),
                "rewards/chosen": r_c.mean().item(),
                "rewards/rejected": r_r.mean().item(),
                "rewards/accuracies": ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean().item(),
                "rewards/margins": margins.mean().item(),
                "logps/chosen": pc.mean().item(),
                "logps/rejected": pr.mean().item(),
                "policy/grad_norm": float(grad_norm),
                "charts/lr": opt.param_groups[0]["lr"],
                "charts/epoch": epoch + 1,
                "time/step_seconds": time.time() - t0,
            }
            if args.loss_type in LOGISTIC:  # σ(−βΔ) = σ(r̂_l − r̂_w): the notes' weight, ÷ β
                metrics["dpo/grad_weight"] = grad_weight(margins / args.beta, args.beta,
                                                         args.label_smoothing).mean().item()
        if step % args.eval_every == 0 or step == total_steps:
            ev = evaluate()
            final_texts = ev.pop("texts")
            metrics.update(ev)
        keys = ["loss", "rewards/margins", "rewards/accuracies", "eval/heldout_pair_accuracy",
                "eval/gold_reward", "eval/kl_to_ref"]
        log.log(step, metrics, keys if (step % args.log_every == 0 or step == total_steps
                                        or "eval/gold_reward" in metrics) else [])
        if args.save_every and step % args.save_every == 0:  ##### --save-every: what step + 1 needs
            save_checkpoint(out, step, args, policy, tok, opt, sched, prec,
                            start=start, start_texts=start_texts, ev=ev, final_texts=final_texts)
    train_seconds = time.time() - t_train

    ##### save and summarise
    model_dir = harness.save_policy(policy, tok, out, args.save_model)
    return summarise(log, out, args, start, ev, ceiling, cuts, eval_prompts, start_texts, final_texts, step,
                     model_dir, gold, device, t_start, train_seconds, load_seconds)


#####################################################################################################
#####  bookkeeping: models and data, evaluation, resume and checkpoints, the summary
#####################################################################################################


def load_pairs_and_models(args: Args, ckpt, device, prec):
    """The preference pairs, rendered with the chat template and fitted to --max-length (capped at
    the model's context), and the two models: π_θ (from the checkpoint on --resume; in eval mode: no
    dropout, so that at the start π_θ equals π_ref exactly; float32) and π_ref (at the compute
    precision, `harness.freeze`).
    -> (policy, ref, tok, train pairs, held-out pairs, the --max-length counts for the summary, the
    --max-length in force)"""
    train_pairs, heldout = tasks.load_preferences(args.data)
    path = common.resolve_model_path(args.model)
    print(f"loading --model {args.model} (the policy, and a frozen copy as π_ref) …", flush=True)
    policy, tok = common.load_model(harness.start_weights(ckpt, path, args), device)  # float32 weights
    max_length = tasks.cap_max_length(args.max_length, policy)  # --max-length ≤ the model's positions
    # rows of messages (or, with --chat-template, of text) -> text, by the tokenizer's chat template
    train_pairs, heldout = (tasks.render_chat(tok, rows, args.chat_template, args.model)
                            for rows in (train_pairs, heldout))
    (train_pairs, cut_train, dropped_train), (heldout, cut_heldout, dropped_heldout) = (
        fit_max_length(tok, rows, max_length) for rows in (train_pairs, heldout))
    check(train_pairs and heldout, f"--max-length {max_length}: every training or every held-out "
          "prompt is that long; raise it (or pass --max-length none)")
    heldout = heldout[: args.eval_size]
    # the evaluation samples --max-new-tokens after the first --eval-samples held-out prompts
    tasks.check_context(tok, policy, [p["prompt"] for p in heldout[: args.eval_samples]], args.max_new_tokens)
    policy.eval()
    harness.gradient_checkpointing(policy, args.gradient_checkpointing)  # --gradient-checkpointing
    policy = harness.apply_lora(policy, args, ckpt)  # --lora-r: adapters on the frozen base, only they trained
    # at the compute precision: π_θ = π_ref at step 0 (--lora-r: the policy with its adapters off, no second copy)
    ref = harness.reference_of(policy, args, path, device, prec)
    cuts = {"cut_pairs": {"train": cut_train, "heldout": cut_heldout},
            "dropped_pairs": {"train": dropped_train, "heldout": dropped_heldout}}
    return policy, ref, tok, train_pairs, heldout, cuts, max_length


def evaluator(policy, ref, tok, heldout: list[dict], ref_hc, ref_hr, eval_prompts: list[str], args: Args,
              gold: bool, device, prec, max_length: int | None):
    """A closure: the held-out pair accuracy of the implicit reward, and samples from π_θ (a fixed
    seed) with their gold reward, KL to π_ref and length. ref_hc, ref_hr: log π_ref of the held-out
    pairs [M]."""
    average = args.loss_type in PER_TOKEN_AVERAGED

    def evaluate() -> dict:
        with prec.autocast():
            pc, pr = all_pair_logps(policy, tok, heldout, device, average, max_length, per_pass(args))  # [M], [M]
            s = sample_and_score(policy, ref, tok, eval_prompts, args.max_new_tokens, args.seed + 1, gold)
        return {"eval/heldout_pair_accuracy": implicit_reward_accuracy(pc, pr, ref_hc, ref_hr, args.beta,
                                                                       args.loss_type),
                "eval/gold_reward": s["gold_reward"], "eval/kl_to_ref": s["kl_to_ref"],
                "eval/mean_length": s["mean_length"], "texts": s["texts"]}
    return evaluate


def print_header(out, device, prec, args: Args, policy, n_train: int, n_heldout: int, cuts: dict,
                 max_length: int | None) -> None:
    print(f"run folder: {out}  |  device {device}, {prec.dtype}  |  model {args.model} "
          f"({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters)  |  "
          f"{n_train} train pairs, {n_heldout} held out  |  loss {args.loss_type}, β {args.beta}")
    if max_length is not None:
        cut, dropped = cuts["cut_pairs"], cuts["dropped_pairs"]
        print(f"--max-length {max_length}: cut {cut['train']} train and {cut['heldout']} held-out pairs "
              f"to their first {max_length} tokens; dropped {dropped['train']} train and "
              f"{dropped['heldout']} held-out pairs whose prompt alone is that long (TRL's keep_start)")


def evaluate_start(evaluate, log, ceiling, n_heldout: int, n_samples: int, gold: bool) -> tuple[dict, list]:
    """The start policy's figures, logged at step 0 and printed.  -> (figures, sampled texts)"""
    print(f"evaluating the start policy ({n_heldout} held-out pairs, {n_samples} samples) …", flush=True)
    start = evaluate()
    start_texts = start.pop("texts")
    log.log(0, {**start, "eval/ceiling_accuracy": ceiling})
    if gold:
        print(f"before training: gold reward of samples {start['eval/gold_reward']:+.3f}, "
              f"held-out pair accuracy {start['eval/heldout_pair_accuracy']:.3f} (ceiling {ceiling:.3f})")
    return start, start_texts


def resume(ckpt, opt, sched, prec) -> tuple:
    """--resume: the state at the end of the checkpoint's step (the global RNGs last). The data order
    is `batches`, drawn again from --seed: the run goes on at batch ckpt.step + 1.
    -> the figures of the run so far: (start, start_texts, ev, final_texts, step)."""
    start, start_texts, ev, final_texts = (ckpt.state[k] for k in ("start", "start_texts", "ev",
                                                                   "final_texts"))
    harness.restore_training_state(ckpt.state, opt, sched, prec)
    return start, start_texts, ev, final_texts, ckpt.step


def save_checkpoint(out, step: int, args: Args, policy, tok, opt, sched, prec, **figures) -> None:
    """--save-every: <out>/checkpoint-<step>/, all that step + 1 needs."""
    harness.save_checkpoint(out, step, args, {"model": policy}, {**harness.training_state(opt, sched, prec),
                                                                  **figures}, tok)


def summarise(log, out, args: Args, start: dict, ev: dict, ceiling, cuts: dict, eval_prompts: list[str],
              start_texts: list[str], final_texts: list[str], step: int, model_dir, gold: bool, device,
              t_start: float, train_seconds: float, load_seconds: float) -> dict:
    """summary.json, and the printed summary with a few samples before and after."""
    summary = log.summary({
        "script": "dpo",
        "loss_type": args.loss_type,
        "beta": args.beta,
        "start_gold_reward": start["eval/gold_reward"],
        "final_gold_reward": ev["eval/gold_reward"],
        "kl_to_ref": ev["eval/kl_to_ref"],
        "heldout_pair_accuracy": ev["eval/heldout_pair_accuracy"],
        "start_heldout_pair_accuracy": start["eval/heldout_pair_accuracy"],
        "ceiling_accuracy": ceiling,
        "start_mean_length": start["eval/mean_length"],
        "final_mean_length": ev["eval/mean_length"],
        "eval_samples": args.eval_samples,
        "max_length": cuts,
        "examples_before": start_texts[:4],
        "examples_after": final_texts[:4],
        "steps": step,
        "model_dir": model_dir,
        **harness.run_facts(args, device, t_start, train_seconds, load_seconds),
    })
    log.close()
    print(f"\n=== DPO summary ({out})")
    if gold:
        print(f"gold reward of samples: {summary['start_gold_reward']:+.3f} -> "
              f"{summary['final_gold_reward']:+.3f}   KL to π_ref {summary['kl_to_ref']:.3f} nats")
    print(f"held-out pair accuracy of the implicit reward: {summary['heldout_pair_accuracy']:.3f}"
          + (f" (ceiling {ceiling:.3f})" if gold else "")
          + f"   in {step} steps, {summary['wall_seconds']:.0f}s wall ({train_seconds:.0f}s training)")
    for x, a, b in zip(eval_prompts[:4], start_texts[:4], final_texts[:4]):
        print(f"  {x!r:>14}  before: {a!r}\n  {'':>14}  after:  {b!r}")
    return summary


if __name__ == "__main__":
    harness.main(Args, train, __doc__)
