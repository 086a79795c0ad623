"""Plumbing shared by the scripts in this repository, and nothing else.

Every algorithm (its advantage, its loss, its buffer) lives in its own file. This module holds
what is the same for all of them:

  #####  command line   `parse_args(Args)`: a dataclass whose field docstrings become `--help`
  #####  errors         `UsageError` and `main(Args, train)`: bad input -> one line, exit code 2
  #####  runs           device, seed, run folder, `RunLogger` (metrics.jsonl + summary.json)
  #####  data           `read_jsonl` that names `file:line: reason`
  #####  tensors        masked mean / whitening, padding, completion masks
  #####  models         `load_model` (any HF causal LM, or the embedded default `tiny`)
  #####  the LM itself  `token_logprobs`, `generate` (KV cache, sampling or greedy)
  #####  the task       arithmetic prompts with exact answers, strict reward, `--data FILE.jsonl`

Nothing here needs a network connection.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import random
import sys
import textwrap
import time
import typing
from pathlib import Path

import numpy as np
import torch

#####################################################################################################
#####  command line
#####################################################################################################


class UsageError(Exception):
    """Bad input from the user. `main` prints it as one line and exits with code 2."""


def _field_docs(cls) -> dict[str, str]:
    """Map each dataclass field to the string literal written on the line below it (CleanRL style)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """Build an argparse parser from a dataclass `Args` and return a filled instance.

    `max_new_tokens: int = 4` becomes `--max-new-tokens INT`; a bool becomes `--flag/--no-flag`;
    `Optional[X]` accepts the word `none`; `Literal[...]` becomes a choice. The help text of each
    flag is the docstring under the field.
    """
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ())):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, optional = inner[0], True
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + (["--" + f.name] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_)
            continue
        kwargs: dict = {"dest": f.name, "default": default, "help": help_}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            base = type(kwargs["choices"][0])
        else:
            base = tp
        kwargs["metavar"] = base.__name__.upper() if "choices" not in kwargs else None

        def convert(s, base=base, optional=optional):
            if optional and s.lower() == "none":
                return None
            return base(s)
        kwargs["type"] = convert
        parser.add_argument(*names, **kwargs)
    return cls(**vars(parser.parse_args(argv)))


def main(cls, train, doc: str | None = None, argv: list[str] | None = None):
    """`python script.py [flags]`: parse flags, run `train(args)`, and turn a `UsageError` (or a
    missing file) into one line on stderr and exit code 2, never a traceback."""
    args = parse_args(cls, argv, description=doc)
    try:
        return train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check(condition: bool, message: str):
    """Raise a `UsageError` with `message` unless `condition` holds. Messages name the flag."""
    if not condition:
        raise UsageError(message)


#####################################################################################################
#####  runs: device, seed, run folder, logging
#####################################################################################################


def pick_device(name: str | None = None) -> torch.device:
    """CUDA when present, else the CPU; `--device cpu|cuda|cuda:1` overrides."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a torch device ({e})") from None
    check(dev.type != "cuda" or torch.cuda.is_available(),
          f"--device {name}: CUDA is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def default_run_dir(script: str, seed: int) -> Path:
    """`runs/<script>__s<seed>__<date-time>`: a new folder per run, so no run overwrites another."""
    return Path("runs") / f"{script}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create the run folder. Refuse (UsageError) if it already holds a run, unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        check(overwrite, f"--out-dir {out} already holds a run; pass --overwrite to replace it, "
                         "or choose another --out-dir")
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _jsonable(x):
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


class RunLogger:
    """One compact line per logging step on stdout, and the same numbers in `metrics.jsonl`.

    Metric names are namespaced, as in CleanRL and TRL: `reward/mean`, `loss/policy`, `eval/accuracy`.
    """

    def __init__(self, out_dir: Path, quiet: bool = False):
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        self.t0 = time.time()
        self.file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, metrics: dict, keys: list[str] | None = None) -> None:
        row = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        self.file.write(json.dumps(row, default=_jsonable) + "\n")
        if not self.quiet and keys != []:  # keys=[]: write the row, print nothing
            shown = keys if keys is not None else list(metrics)
            parts = [f"{k.split('/')[-1] if k.count('/') else k} {_fmt(metrics[k])}"
                     for k in shown if k in metrics]
            print(f"step {step:>5} | {row['time']:7.1f}s | " + " | ".join(parts), flush=True)

    def summary(self, summary: dict) -> dict:
        with open(self.out_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=_jsonable)
        return summary

    def close(self):
        self.file.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


#####################################################################################################
#####  data
#####################################################################################################


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), flag: str = "--data") -> list[dict]:
    """Read a JSONL file: one JSON object per non-blank line, each with the `required` keys.

    A bad line raises `UsageError("FILE:LINE: reason")`, so the user can open the file there.
    """
    p = Path(path)
    check(p.is_file(), f"{flag} {p}: no such file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            check(isinstance(row, dict), f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            check(not missing, f"{p}:{n}: missing key(s) {', '.join(map(repr, missing))}")
            rows.append(row)
    check(len(rows) > 0, f"{flag} {p}: the file holds no rows")
    return rows


#####################################################################################################
#####  tensors: masked statistics, padding, completion masks
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
    """(x − mean) / sqrt(var + eps) over the masked positions; masked positions come back as 0.

    The variance is Bessel-corrected (÷ (n−1)) when n > 1, as in TRL's `masked_whiten`.
    With `shift_mean=False` the mean is added back (scale only).
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation: returns ids [B, P] and attention mask [B, P].

    Prompts are padded on the left so that every row's last real token sits in the last column,
    where generation appends the next token.
    """
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on every completion token up to and including the first EOS, 0 after it.  # [B, T]

    A completion with no EOS (cut at the token limit) is all ones. The mask is positional, so it
    is right even when the pad token equals the EOS token, as in many real tokenizers.
    """
    is_eos = completion_ids == eos_id  # [B, T]
    # number of EOS strictly before position t; the token at t is kept iff that number is 0
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # [B, T]
    return (eos_before == 0).long()  # [B, T]


def concat_prompt_completion(prompt_ids, prompt_mask, completion_ids, comp_mask):
    """[left-padded prompt | right-padded completion] -> input_ids, attention_mask  # [B, P+T]."""
    return (torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1))


#####################################################################################################
#####  models: any Hugging Face causal LM, or the embedded default `tiny`
#####################################################################################################


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, else float32 (the CPU path stays in fp32)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    check(name in table, f"--dtype {name!r}: expected auto, {', '.join(table)}")
    return table[name]


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
               trainable: bool = True):
    """Load (model, tokenizer) through the Auto classes. `tiny` is the embedded default, built on
    first use and cached on disk (see `tiny_model_path`). The tokenizer pads on the left.

    A frozen copy (`trainable=False`) is put in eval mode with gradients off: the reference policy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = tiny_model_path() if name_or_path == "tiny" else name_or_path
    if name_or_path != "tiny" and (name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path
                                   and not Path(name_or_path).exists() and name_or_path.count("/") != 1):
        check(Path(name_or_path).expanduser().exists(), f"--model {name_or_path}: no such folder")
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {name_or_path}: could not load a causal LM there ({first}). "
                         "Give a local folder with config.json, or 'tiny'.") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # the completion mask is positional, so pad == EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    check(tokenizer.eos_token_id is not None, f"--model {name_or_path}: the tokenizer has no EOS token")
    model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model, tokenizer


def build_char_tokenizer():
    """A character-level tokenizer built in code: <pad>=0, <eos>=1, <unk>=2, then printable ASCII
    and newline. One character is one token, so an answer digit is exactly one token."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:-5]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: chars
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", padding_side="left")
    return tok


# The embedded default. Changing anything here changes the folder name, so old caches are not reused.
TINY = dict(version=4, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, sft_batch=64, sft_lr=3e-3, sft_max_steps=1500,
            sft_stop_accuracy=0.35, seed=0)


def cache_root() -> Path:
    """Where built models are cached: $RL_REF_CACHE, else ~/.cache/rl-llm-ref."""
    return Path(os.environ.get("RL_REF_CACHE", Path.home() / ".cache" / "rl-llm-ref")).expanduser()


def tiny_model_path(quiet: bool = False) -> Path:
    """Path of the embedded `tiny` model, building it on first use (well under a minute on 2 CPU
    cores). The build is deterministic, and written to a temporary folder then renamed, so two
    processes that build at once do not corrupt the cache."""
    key = "-".join(f"{v}" for v in TINY.values())
    path = cache_root() / f"tiny-{key}"
    if (path / "config.json").exists():
        return path
    import shutil
    import tempfile
    t0 = time.time()
    if not quiet:
        print(f"building the embedded model 'tiny' (once) into {path}", flush=True)
    model, tok, acc, steps = build_tiny()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-tiny-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps({**TINY, "heldout_accuracy": acc, "sft_steps": steps,
                                                "build_seconds": round(time.time() - t0, 1)}))
    try:
        tmp.rename(path)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"built 'tiny' in {time.time() - t0:.1f}s ({steps} warm-up steps): held-out greedy "
              f"accuracy {acc:.3f}", flush=True)
    return path


def build_tiny():
    """Build the embedded default: a Llama-style config with the character tokenizer, then a brief
    supervised warm-up on `a+b=c<eos>` from the arithmetic train split. The warm-up is stopped
    early on purpose, so that RL starts well above zero but far from perfect."""
    from transformers import LlamaConfig, LlamaForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(TINY["seed"])
    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=TINY["hidden_size"],
                      intermediate_size=TINY["intermediate_size"],
                      num_hidden_layers=TINY["num_hidden_layers"],
                      num_attention_heads=TINY["num_attention_heads"],
                      num_key_value_heads=TINY["num_attention_heads"], max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    train, heldout = arithmetic_task()
    rng = np.random.default_rng(TINY["seed"])
    probe = [train[i] for i in rng.choice(len(train), 200, replace=False)]  # train split, not held out
    opt = torch.optim.AdamW(model.parameters(), lr=TINY["sft_lr"], weight_decay=0.0)
    for step in range(1, TINY["sft_max_steps"] + 1):
        batch = [train[i] for i in rng.integers(0, len(train), TINY["sft_batch"])]
        p_ids, p_mask = left_pad([tok.encode(b["prompt"]) for b in batch], tok.pad_token_id)
        comps = [tok.encode(b["answer"]) + [tok.eos_token_id] for b in batch]
        T = max(map(len, comps))
        c_ids = torch.tensor([c + [tok.pad_token_id] * (T - len(c)) for c in comps])  # [B, T]
        c_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in comps])  # [B, T]
        ids, mask = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
        logp, _ = token_logprobs(model, ids, mask, T)  # [B, T]
        loss = -masked_mean(logp, c_mask)  # next-token NLL on the answer only
        opt.zero_grad()
        loss.backward()
        opt.step()
        # Stop as soon as greedy accuracy on a probe of *train* problems passes the target. The
        # learning curve of addition is steep and jumpy, so a fixed step count would land anywhere
        # between 5% and 90%; a target lands RL's start in the same place every time.
        if step % 25 == 0 and greedy_accuracy(model, tok, probe, 4) >= TINY["sft_stop_accuracy"]:
            break
    model.eval()
    acc = greedy_accuracy(model, tok, heldout, max_new_tokens=4)
    torch.random.set_rng_state(state)
    return model, tok, acc, step


#####################################################################################################
#####  the LM: per-token log-probs and generation
#####################################################################################################


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log π(y_t | x, y_<t) for the last `n_completion` columns of `input_ids`.  -> [B, T]

    input_ids, attention_mask: [B, L] = [left-padded prompt | right-padded completion].
    The logits are divided by the sampling temperature, so that these are the log-probs of the
    distribution the completions were sampled from. Position ids come from the attention mask, so
    the values do not depend on how much padding a row has, on either side. Positions whose target
    is padding come back as 0. With `with_entropy`, also returns the entropy H(π(·|x, y_<t)) [B, T]
    (no gradient), else None.
    """
    T = n_completion
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    # the logits at column j predict the token at column j+1: keep the T+1 columns that matter
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1]  # [B, T, V]
    logits = logits.float() / temperature  # [B, T, V]
    logprobs_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    targets = input_ids[:, -T:]  # [B, T]
    logp = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    real = attention_mask[:, -T:].bool()  # [B, T]
    logp = torch.where(real, logp, torch.zeros_like(logp))  # [B, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # [B, T]
            entropy = torch.where(real, entropy, torch.zeros_like(entropy))
    return logp, entropy


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, greedy: bool = False):
    """Sample (or greedily decode) completions with the KV cache.

    prompt_ids, prompt_mask: [B, P], left-padded. Returns completion ids [B, T] (T ≤ max_new_tokens,
    `pad_id` after each row's first EOS) and the completion mask [B, T] (see `completion_mask`).
    Sampling draws from softmax(logits / temperature) with torch's global RNG (seeded by
    `seed_everything`); there is no top-k or top-p, so the sampling distribution is exactly the one
    `token_logprobs` scores.
    """
    B = prompt_ids.shape[0]
    mask = prompt_mask.clone()  # [B, P + t]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    past, next_pos = out.past_key_values, position_ids[:, -1:] + 1  # [B, 1]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)  # [B]
    tokens = []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # [B, V]
        if greedy:
            nxt = logits.argmax(-1)  # [B]
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # [B]
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, P + t + 1]
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=past, use_cache=True)
        past, next_pos = out.past_key_values, next_pos + 1
    completion = torch.stack(tokens, dim=1)  # [B, T]
    return completion, completion_mask(completion, eos_id)


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                  greedy: bool = False):
    """Tokenize `prompts`, generate, and return (prompt_ids, prompt_mask, completion_ids,
    completion_mask, completion_texts, finished) where `finished[i]` says the row emitted EOS."""
    device = next(model.parameters()).device
    p_ids, p_mask = left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts],
                             tokenizer.pad_token_id, device)
    c_ids, c_mask = generate(model, p_ids, p_mask, max_new_tokens, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, temperature, greedy)
    finished = ((c_ids == tokenizer.eos_token_id) & c_mask.bool()).any(-1)  # [B]
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(c_ids, c_mask)]
    return p_ids, p_mask, c_ids, c_mask, texts, finished.tolist()


#####################################################################################################
#####  the verifiable task: arithmetic with exact answers, or `--data FILE.jsonl`
#####################################################################################################

ARITH_HELDOUT = 500  # held-out problems, never trained on (neither in the warm-up nor in RL)


def arithmetic_task() -> tuple[list[dict], list[dict]]:
    """All 10,000 `a+b=` problems with 0 ≤ a, b ≤ 99, split once (fixed seed, independent of
    --seed) into (train, heldout). Rows are {"prompt": "37+48=", "answer": "85"}. The one-digit
    operands matter: in the warm-up they act as a curriculum (with two-digit operands only, the
    same model needs several times more steps to learn the format and the carries)."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)]
    order = np.random.default_rng(1234).permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows[ARITH_HELDOUT:], rows[:ARITH_HELDOUT]


def load_task(data: str | None, heldout_size: int = ARITH_HELDOUT) -> tuple[list[dict], list[dict]]:
    """(train, heldout) rows. No `--data`: the built-in arithmetic task. With `--data FILE.jsonl`:
    lines of {"prompt": str, "answer": str or number}; the last `heldout_size` rows (at most a
    fifth of the file) are held out."""
    if data is None:
        return arithmetic_task()
    rows = read_jsonl(data, required=("prompt", "answer"))
    for n, r in enumerate(rows, 1):
        check(isinstance(r["prompt"], str) and r["prompt"] != "",
              f"{data}: row {n}: 'prompt' must be a non-empty string")
        check(parse_number(str(r["answer"])) is not None,
              f"{data}: row {n}: 'answer' {r['answer']!r} is not a number")
        r["answer"] = str(r["answer"])
    check(len(rows) >= 2, f"--data {data}: need at least 2 rows (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


def parse_number(s: str) -> float | None:
    """'1,234' -> 1234.0, '-3.5' -> -3.5, anything else -> None."""
    import re
    s = s.strip().replace(",", "")
    return float(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None


def score(completion: str, answer: str, finished: bool, strict: bool = True) -> float:
    """The verifiable reward: 1.0 if the completion answers `answer`, else 0.0. Never raises.

    strict (the built-in arithmetic task): the whole completion must be the number, digits only
    (`85`, not ` 85` or `85.`). Not strict (`--data`): the last number in the completion counts
    (GSM8K style, `... so the answer is 1,234.`). Either way a completion that did not finish
    (no EOS within the token limit) scores 0: an answer that was cut off is not an answer.
    """
    import re
    if not finished or not isinstance(completion, str):
        return 0.0
    target = parse_number(str(answer))
    if strict:
        got = parse_number(completion) if re.fullmatch(r"-?[0-9]+", completion) else None  # ASCII digits only
    else:
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
        got = parse_number(nums[-1]) if nums else None
    return float(got is not None and target is not None and got == target)


def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, strict: bool = True,
                    batch_size: int = 256) -> float:
    """Held-out accuracy of greedy decoding: the mean of `score` over `rows`."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        *_, texts, finished = generate_text(model, tokenizer, [r["prompt"] for r in chunk],
                                            max_new_tokens, greedy=True)
        total += sum(score(t, r["answer"], f, strict) for t, r, f in zip(texts, chunk, finished))
    model.train(was_training)
    return total / max(1, len(rows))


def digit_step_rewards(completion_ids: torch.Tensor, comp_mask: torch.Tensor,
                       target_ids: list[list[int]]) -> torch.Tensor:
    """Process rewards for the arithmetic task: one step per completion token.  -> [B, T]

    Step j ends at completion token j and is rewarded 1 if that token is the j-th token of the
    target (the answer's digits, then EOS), else 0. So `85<eos>` against `85` earns [1, 1, 1],
    `75<eos>` earns [0, 1, 1], and `8<eos>` earns [1, 0]. Tokens past the target's length earn 0,
    and positions outside the completion mask are 0.
    """
    B, T = completion_ids.shape
    target = torch.full((B, T), -1, dtype=torch.long, device=completion_ids.device)  # [B, T]
    for i, t in enumerate(target_ids):
        n = min(len(t), T)
        target[i, :n] = torch.tensor(t[:n], dtype=torch.long)
    hit = (completion_ids == target) & comp_mask.bool()  # [B, T]
    return hit.float()  # [B, T]
