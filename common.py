"""The core every script shares, and every reader reads once: the tensors and the language model.

  #####  errors   `UsageError` and `check`: bad input becomes one line naming the flag
  #####  tensors  masked sum / mean / whitening, left padding, completion masks
  #####  models   `load_model`: any Hugging Face causal LM folder, or an embedded model of models/
  #####  the LM   `token_logprobs` (log π(y_t | x, y_<t)), `generate` (the rollout, with the KV cache)

What a reader may skip is below it: `harness.py` (command line, run folder, logging, checkpoints,
precision) and `tasks.py` (the built-in tasks and the users' data). It imports neither of them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


class UsageError(Exception):
    """Bad input from the user. `harness.main` prints it as one line and exits with code 2."""


def check(condition: bool, message: str):
    """Raise a `UsageError` with `message` unless `condition` holds. Messages name the flag."""
    if not condition:
        raise UsageError(message)


#####################################################################################################
#####  tensors: masked statistics, padding, completion masks, the gradient's norm
#####################################################################################################


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x over positions where mask is true. Masked positions may hold inf or NaN: they are
    selected away with `where`, never multiplied by 0 (NaN·0 is NaN)."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the positions where mask is true; 0 (not NaN) when the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked positions; masked positions come back as 0. The
    variance is Bessel-corrected (÷ (n−1)) when n > 1, as in TRL's `masked_whiten`. With
    `shift_mean=False` the mean is added back (scale only)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation: returns ids [B, P] and attention mask [B, P]. Every
    row's last real token then sits in the last column, where generation appends the next token."""
    P = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (P - len(s)) + list(s) for s in seqs], dtype=torch.long)  # [B, P]
    mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)  # [B, P]
    return ids.to(device), mask.to(device)


def completion_mask(completion_ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 on every completion token up to and including the first EOS, 0 after it.  # [B, T]
    `eos_ids`: the EOS id, or a list (the model's stop tokens, `stop_ids`: any one ends it). A
    completion with none (cut at the token limit) is all ones. The mask is positional, so it is
    right even when the pad token equals the EOS token, as in many real tokenizers."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_ids, device=completion_ids.device))  # [B, T]
    # number of EOS strictly before position t; the token at t is kept iff that number is 0
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # [B, T]
    return (eos_before == 0).long()  # [B, T]


def concat_prompt_completion(prompt_ids, prompt_mask, completion_ids, comp_mask):
    """[left-padded prompt | right-padded completion] -> input_ids, attention_mask  # [B, P+T]."""
    return (torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1))


def clip_grad_norm(params, max_norm: float) -> float:
    """g ← g · min(1, max_norm / ‖g‖) over `params` (max_norm 0: no clipping). Returns ‖g‖ before
    clipping; inf, not NaN, when float16 gradients overflowed (the scaler then skips the step)."""
    norm = float(torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf")))
    return norm if norm == norm else float("inf")


#####################################################################################################
#####  models: any Hugging Face causal LM, or the embedded default `tiny`
#####################################################################################################


# The embedded models are files of this repository (models/build.py made them; see its docstring).
MODELS_DIR = Path(__file__).resolve().parent / "models"
EMBEDDED = ("tiny", "tiny-pref", "tiny-pref-rm", "tiny-ramble")  # names that --model / --reward-model accept as such


def resolve_model_path(name_or_path: str) -> str:
    """An embedded model's name (`tiny`, ...) -> its folder in models/; anything else unchanged."""
    return str(MODELS_DIR / name_or_path) if name_or_path in EMBEDDED else name_or_path


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off inside the block, the caller's settings after it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def load_model(name_or_path: str, device: torch.device, trainable: bool = True):
    """Load (model, tokenizer) through the Auto classes, with float32 weights whatever the compute
    dtype (see `harness.MixedPrecision`). The embedded models (`tiny`, ...) are folders of models/,
    loaded like any other. The tokenizer pads on the left and carries the stop tokens (`stop_ids`).
    A frozen copy (`trainable=False`, the reference policy) is in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)  # `tiny`, `tiny-pref`: the embedded models
    check(name_or_path not in EMBEDDED or Path(path).is_dir(),
          f"--model {name_or_path}: the embedded models are looked for in {MODELS_DIR}, which has no "
          f"{name_or_path}/ (copy models/ beside common.py, or give --model a model folder)")
    if name_or_path not in EMBEDDED and (name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path
                                   and not Path(name_or_path).exists() and name_or_path.count("/") != 1):
        check(Path(name_or_path).expanduser().exists(), f"--model {name_or_path}: no such folder")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {name_or_path}: could not load a causal LM there ({first}). "
                         "Give a local folder with config.json, or 'tiny'.") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # the completion mask is positional, so pad == EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    check(tokenizer.eos_token_id is not None, f"--model {name_or_path}: the tokenizer has no EOS token")
    # every stop token of transformers' generate (Llama-3's <|eot_id|>, Gemma's <end_of_turn> too)
    more = getattr(model.generation_config, "eos_token_id", None)  # None, an id or a list of ids
    more = [more] if isinstance(more, int) else list(more or [])
    tokenizer.stop_ids = list(dict.fromkeys([tokenizer.eos_token_id, *more]))  # EOS first, once each
    model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model, tokenizer


#####################################################################################################
#####  the LM: per-token log-probs and generation
#####################################################################################################


def vocab_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """log π(· | x, y_<t) over the whole vocabulary, for the last `n_completion` columns.  -> [B, T, V]

    Row t is the distribution that chose y_t (see `token_logprobs` for the inputs), log-softmaxed in
    float32 (float64 for a float64 model). Rows whose target is padding are finite and meaningless:
    mask them. ppo.py keeps all of it for the exact KL between two policies."""
    T = n_completion
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    # the logits at column j predict the token at column j+1: keep the T+1 columns that matter
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1]  # [B, T, V]
    with torch.autocast(device_type=logits.device.type, enabled=False):  # the softmax in float32
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [B, T, V] (float64 stays)
        return torch.log_softmax(logits, dim=-1)  # [B, T, V]


def pick_token_logprobs(logprobs_all: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """log π(y_t | x, y_<t) from `vocab_logprobs`' [B, T, V] for the last T tokens of input_ids
    [B, L]; positions whose target is padding come back as 0.  -> [B, T]"""
    targets = input_ids[:, -logprobs_all.shape[1]:]  # the last T tokens   [B, T]
    logp = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    real = attention_mask[:, -targets.shape[1]:].bool()  # [B, T]
    return torch.where(real, logp, torch.zeros_like(logp))  # [B, T]


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log π(y_t | x, y_<t) for the last `n_completion` columns of `input_ids`.  -> [B, T]
    input_ids, attention_mask: [B, L] = [left-padded prompt | right-padded completion].
    The logits are divided by the sampling temperature: these are the log-probs of the distribution
    the completions were sampled from. Position ids come from the attention mask, so the values do
    not depend on how much padding a row has. Positions whose target is padding come back as 0.
    With `with_entropy`, also the entropy H(π(·|x, y_<t)) [B, T] (no gradient), else None."""
    logprobs_all = vocab_logprobs(model, input_ids, attention_mask, n_completion, temperature)  # [B, T, V]
    logp = pick_token_logprobs(logprobs_all, input_ids, attention_mask)  # [B, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            real = attention_mask[:, -n_completion:].bool()  # [B, T]
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # [B, T]
            entropy = torch.where(real, entropy, torch.zeros_like(entropy))
    return logp, entropy


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             eos_ids, pad_id: int, temperature: float = 1.0, greedy: bool = False):
    """Sample (or greedily decode) completions with the KV cache. prompt_ids, prompt_mask: [B, P],
    left-padded; eos_ids: the EOS id or the list of stop tokens. Returns completion ids [B, T]
    (T ≤ max_new_tokens, `pad_id` after each row's first EOS) and the mask [B, T] (`completion_mask`).
    Sampling draws from softmax(logits / temperature) with torch's global RNG (`seed_everything`);
    no top-k or top-p, so the sampling distribution is exactly the one `token_logprobs` scores."""
    mask = prompt_mask.clone()  # [B, P + t]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    past, next_pos = out.cache, position_ids[:, -1:] + 1  # [B, 1]
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)  # [B]
    stops = torch.as_tensor(eos_ids, device=prompt_ids.device)  # [n_stop] or a scalar
    tokens = []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # [B, V]
        if greedy:
            nxt = logits.argmax(-1)  # [B]
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # [B]
        tokens.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, P + t + 1]
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                    cache=past, use_cache=True)
        past, next_pos = out.cache, next_pos + 1
    completion = torch.stack(tokens, dim=1)  # [B, T]
    return completion, completion_mask(completion, eos_ids)


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a completion: those `load_model` set (EOS and generation_config's), else EOS."""
    return getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_token_id]


def encode_prompts(tokenizer, texts) -> list[list[int]]:
    """Prompt ids as the tokenizer's default has them: BOS first where it adds one (Llama, Gemma; not
    GPT-2, Qwen), once (a chat template that writes BOS keeps its own), and no EOS. A prompt of no
    tokens would crash deep inside attention: it is refused."""
    ids, bos = tokenizer(list(texts), add_special_tokens=False)["input_ids"], tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos]:  # its default adds BOS
        ids = [s if s[:1] == [bos] else [bos] + s for s in ids]
    empty = next((t for t, s in zip(texts, ids) if not s), None)
    check(empty is None, f"the prompt {str(empty)[:60]!r} tokenizes to no tokens with this model's "
                         "tokenizer (check --model and the prompts of --data)")
    return ids


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                  greedy: bool = False):
    """Tokenize `prompts`, generate, and return (prompt_ids, prompt_mask, completion_ids,
    completion_mask, completion_texts, finished) where `finished[i]` says the row emitted a stop
    token; a text is what comes before it."""
    device, stops = next(model.parameters()).device, stop_ids(tokenizer)
    p_ids, p_mask = left_pad(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id, device)  # [B, P]
    c_ids, c_mask = generate(model, p_ids, p_mask, max_new_tokens, stops, tokenizer.pad_token_id,
                             temperature, greedy)
    finished = (torch.isin(c_ids, torch.tensor(stops, device=device)) & c_mask.bool()).any(-1)  # [B]
    lengths = (c_mask.sum(1) - finished.long()).tolist()  # the mask is a prefix; the stop token off
    texts = tokenizer.batch_decode([r[:n] for r, n in zip(c_ids.tolist(), lengths)], skip_special_tokens=True)
    return p_ids, p_mask, c_ids, c_mask, texts, finished.tolist()


def encode_prompt_completion(tokenizer, prompts, completions, device=None, max_length: int | None = None):
    """Tokenize (prompt, completion) text for scoring: [left-padded prompt | completion + EOS,
    right-padded]. Prompt (`encode_prompts`) and completion (no special token) are tokenized apart,
    and EOS is appended to every completion, so a completion ends the way a sampled one does.
    `max_length`: each row keeps its first `max_length` tokens (TRL's DPO `keep_start`; dpo.py drops
    the rows whose prompt alone fills it). Returns input_ids, attention_mask [B, P+T], the completion
    mask [B, T] (the completion and its EOS, from the lengths: right even when pad = EOS) and T."""
    prompt_ids = encode_prompts(tokenizer, prompts)  # one batched call of the tokenizer, as below
    p_ids, p_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)  # [B, P]
    comps = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    comps = [c + [tokenizer.eos_token_id] for c in comps]
    if max_length is not None:  # keep_start: the first max_length tokens of prompt + completion
        comps = [c[:max(0, max_length - len(p))] for p, c in zip(prompt_ids, comps)]
    T = max(map(len, comps))
    c_ids = torch.tensor([c + [tokenizer.pad_token_id] * (T - len(c)) for c in comps],
                         dtype=torch.long, device=device)  # [B, T]
    c_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in comps], dtype=torch.long,
                          device=device)  # [B, T]
    ids, mask = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
    return ids, mask, c_mask, T
