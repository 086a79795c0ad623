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


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`error: ...`), exit code 2, not the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """Build an argparse parser from a dataclass `Args` and return a filled instance.

    `max_new_tokens: int = 4` becomes `--max-new-tokens INT`; a bool becomes `--flag/--no-flag`;
    `Optional[X]` accepts the word `none`; `Literal[...]` becomes a choice. The help text of each
    flag is the docstring under the field.
    """
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = _OneLineErrorParser(
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
    """`python script.py [flags]`: parse flags, run `train(args)`, and turn a `UsageError` into one
    line on stderr and exit code 2, never a traceback. (Scripts check files and paths themselves
    and raise `UsageError`, so that the message names the flag.)"""
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


def run_facts(args, device, t_start: float, train_seconds: float, load_seconds: float) -> dict:
    """The facts that end every summary.json: wall time (process start of `train` to now), time in
    the training loop, time spent loading and preparing, the full config, and where it ran."""
    return {"wall_seconds": round(time.time() - t_start, 2), "train_seconds": round(train_seconds, 2),
            "load_seconds": round(load_seconds, 2), "config": dataclasses.asdict(args),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}


def save_policy(model, tokenizer, out: Path, enabled: bool = True) -> str | None:
    """`save_pretrained` the model and its tokenizer into out/model, so that `from_pretrained`
    loads it; returns that folder (None when saving is off)."""
    if not enabled:
        return None
    model.save_pretrained(Path(out) / "model")
    tokenizer.save_pretrained(Path(out) / "model")
    return str(Path(out) / "model")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


#####################################################################################################
#####  data
#####################################################################################################


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), flag: str = "--data",
               validate=None) -> list[dict]:
    """Read a JSONL file: one JSON object per non-blank line, each with the `required` keys.

    `validate(row)` may return a reason why a row is unusable (else None). A bad line raises
    `UsageError("FILE:LINE: reason")`, so the user can open the file there.
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
            reason = validate(row) if validate is not None else None
            check(reason is None, f"{p}:{n}: {reason}")
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
    ids = torch.tensor([[pad_id] * (P - len(s)) + list(s) for s in seqs], dtype=torch.long)  # [B, P]
    mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)  # [B, P]
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


def autocast(device: torch.device, dtype: torch.dtype):
    """GPU only: run forward passes in `dtype` (bfloat16) while the weights that the optimiser
    updates stay in float32. With float32 this does nothing."""
    import contextlib
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
               trainable: bool = True):
    """Load (model, tokenizer) through the Auto classes. `tiny` (arithmetic) and `tiny-pref` (the
    preference task) are the embedded defaults, built on first use and cached on disk (see
    `tiny_model_path`, `tiny_pref_model_path`). The tokenizer pads on the left.

    A frozen copy (`trainable=False`) is put in eval mode with gradients off: the reference policy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)  # `tiny`, `tiny-pref`: the embedded models
    if name_or_path not in ("tiny", "tiny-pref") and (name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path
                                   and not Path(name_or_path).exists() and name_or_path.count("/") != 1):
        check(Path(name_or_path).expanduser().exists(), f"--model {name_or_path}: no such folder")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars on stderr, which is for errors
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


def build_once(path: Path, build) -> dict:
    """Run `build(folder)` into a new temporary folder beside `path`, then rename it to `path`.

    The rename is atomic, so a cache folder is either complete or absent: an interrupted build
    leaves only a `.tmp-*` folder, and when two processes build at once the second rename fails
    and its copy (identical: the builds are deterministic) is deleted. Returns what `build` returns.
    """
    import shutil
    import tempfile

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # stderr is for errors
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name[:24]}-"))
    try:
        facts = build(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return facts


def tiny_model_path(quiet: bool = False) -> Path:
    """Path of the embedded `tiny` model, building it on first use (well under a minute on 2 CPU
    cores). The build is deterministic and written by `build_once`, so two processes that build
    at once do not corrupt the cache."""
    key = "-".join(f"{v}" for v in TINY.values())
    path = cache_root() / f"tiny-{key}"
    if (path / "config.json").exists():
        return path
    t0 = time.time()
    if not quiet:
        print(f"building the embedded model 'tiny' (once) into {path}", flush=True)

    def build(folder: Path) -> dict:
        model, tok, acc, steps = build_tiny()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        facts = {"heldout_accuracy": acc, "sft_steps": steps, "build_seconds": round(time.time() - t0, 1)}
        (folder / "build.json").write_text(json.dumps({**TINY, **facts}))
        return facts
    facts = build_once(path, build)
    if not quiet:
        print(f"built 'tiny' in {time.time() - t0:.1f}s ({facts['sft_steps']} warm-up steps): held-out "
              f"greedy accuracy {facts['heldout_accuracy']:.3f}", flush=True)
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
    encoded = {p: tokenizer.encode(p, add_special_tokens=False) for p in dict.fromkeys(prompts)}  # once each
    p_ids, p_mask = left_pad([encoded[p] for p in prompts], tokenizer.pad_token_id, device)  # [B, P]
    c_ids, c_mask = generate(model, p_ids, p_mask, max_new_tokens, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, temperature, greedy)
    finished = ((c_ids == tokenizer.eos_token_id) & c_mask.bool()).any(-1)  # [B]
    lengths = c_mask.sum(1).tolist()  # the mask is a prefix: the tokens up to and including the first EOS
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(c_ids.tolist(), lengths)],
                                   skip_special_tokens=True)
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
    def why_bad(r):
        if not isinstance(r["prompt"], str) or r["prompt"] == "":
            return "'prompt' must be a non-empty string"
        if parse_number(str(r["answer"])) is None:
            return f"'answer' {r['answer']!r} is not a number"
        return None
    rows = read_jsonl(data, required=("prompt", "answer"), validate=why_bad)
    for r in rows:
        r["answer"] = str(r["answer"])
    check(len(rows) >= 2, f"--data {data}: need at least 2 rows (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


def parse_number(s: str):
    """'1,234' -> 1234, '-3.5' -> -7/2, anything else -> None. An exact `Fraction`, so that two
    long integers that differ in the last digit never compare equal (as floats they could)."""
    import re
    from fractions import Fraction
    s = s.strip().replace(",", "")
    if len(s) > 200:  # no answer is that long; Python also refuses int() of > 4300 digits
        return None
    return Fraction(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None


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


#####################################################################################################
#####  the preference task: a hidden gold reward, the embedded SFT policy `tiny-pref`, noisy pairs
#####################################################################################################
#
# Used by reward_model.py and dpo.py (and ppo.py). Real human labels cannot be used offline, so this
# synthetic task keeps what matters about them (notes `003`, "Training the reward model"): every
# text has a true scalar reward, which nobody observes; an annotator compares two texts and prefers
# one with the Bradley–Terry probability P(a ≻ b) = σ(r_gold(a) − r_gold(b)), so the labels are
# noisy. The gold reward is used only to label pairs and to evaluate, never to train.
#
#   prompt      "the hotel"                      (one of the PREF_TOPICS)
#   completion  "was really great but the staff was rude"      (sampled from the SFT policy)
#   r_gold      #positive words − #negative words − 0.5 · max(0, #words − 15)      = 1 − 1 = 0
#
# `tiny-pref` is the SFT policy: a word-level Llama-style model (built in code, like `tiny`), fitted
# to a small grammar of short reviews whose adjectives are positive, negative or neutral at random,
# so its samples have a mean gold reward near 0 and a lot of room to improve (the best texts the
# grammar allows score +3). The preference pairs are two samples of that policy for one prompt,
# written as JSONL {"prompt", "chosen", "rejected"}, the format of TRL and of public preference
# datasets; `--data FILE.jsonl` swaps in a user's own file of that format.

PREF_POSITIVE = ("great", "good", "lovely", "excellent", "wonderful", "nice", "perfect", "amazing",
                 "friendly", "fun")
PREF_NEGATIVE = ("bad", "awful", "terrible", "poor", "boring", "rude", "dirty", "slow", "broken",
                 "horrible")
PREF_NEUTRAL = ("ok", "small", "big", "new", "old", "loud", "quiet", "cheap", "busy", "simple")
PREF_INTENSIFIERS = ("very", "really", "quite", "so")
PREF_TOPICS = ("hotel", "food", "movie", "book", "phone", "car", "city", "beach", "show", "class",
               "team", "coffee", "pizza", "park", "trip", "game", "song", "laptop", "museum", "bus")
PREF_ASPECTS = ("price", "staff", "view", "ending", "start", "story", "sound", "owner", "menu",
                "screen", "seat", "music")
PREF_VERBS = ("was", "looked", "felt", "seemed")
GOLD_FREE_WORDS = 15  # a completion of up to this many words pays no length cost (the grammar's longest)
GOLD_LENGTH_COST = 0.5  # gold reward lost per word beyond GOLD_FREE_WORDS

# The embedded SFT policy and its preference data. Changing anything here changes the folder name,
# so old caches are not reused.
TINY_PREF = dict(version=1, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, sft_batch=64, sft_lr=3e-3, sft_steps=200,
                 train_pairs=4000, heldout_pairs=1000, max_new_tokens=20, seed=0)
PREF_HELDOUT = 1000  # held-out pairs of a --data file: at most this many, and at most a fifth


def gold_reward(text: str) -> float:
    """The hidden gold reward of a completion (sentiment from word lists, with a length cost):

        r_gold(y) = #{words of y in PREF_POSITIVE} − #{words in PREF_NEGATIVE}
                    − GOLD_LENGTH_COST · max(0, #words − GOLD_FREE_WORDS)

    Words are split on white space and lower-cased. The length cost stops a policy from gaming the
    count by writing ever longer lists of positive words: past 15 words, every word costs 0.5.
    >>> gold_reward("was really great but the staff was rude"), gold_reward("was great and the view was nice")
    (0.0, 2.0)
    """
    words = text.lower().split()
    pos = sum(w in PREF_POSITIVE for w in words)
    neg = sum(w in PREF_NEGATIVE for w in words)
    return float(pos - neg) - GOLD_LENGTH_COST * max(0, len(words) - GOLD_FREE_WORDS)


def sample_review(rng: np.random.Generator) -> tuple[str, str]:
    """One (prompt, completion) of the SFT grammar, the text `tiny-pref` is fitted to:

        prompt      the TOPIC
        completion  VERB [INTENSIFIER] ADJ  { and|but the ASPECT was [INTENSIFIER] ADJ }   (0-2 times)

    with 1, 2 or 3 clauses (probabilities 0.3, 0.4, 0.3), an intensifier with probability 0.3, and
    each adjective positive, negative or neutral with probabilities 0.4, 0.4, 0.2. So the gold
    reward of a text runs from −3 to +3, with mean 0.
    """
    def pick(seq):
        return seq[rng.integers(len(seq))]
    words: list[str] = []
    for k in range(rng.choice(3, p=[0.3, 0.4, 0.3]) + 1):
        if k > 0:
            words += [pick(("and", "but")), "the", pick(PREF_ASPECTS), "was"]
        else:
            words.append(pick(PREF_VERBS))
        if rng.random() < 0.3:
            words.append(pick(PREF_INTENSIFIERS))
        words.append(pick((PREF_POSITIVE, PREF_NEGATIVE, PREF_NEUTRAL)[rng.choice(3, p=[0.4, 0.4, 0.2])]))
    return f"the {pick(PREF_TOPICS)}", " ".join(words)


def build_word_tokenizer():
    """A word-level tokenizer built in code: <pad>=0, <eos>=1, <unk>=2, then every word of the
    grammar. Text is split on white space; decoding joins the words with single spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(PREF_POSITIVE + PREF_NEGATIVE + PREF_NEUTRAL + PREF_INTENSIFIERS + PREF_TOPICS
                       + PREF_ASPECTS + PREF_VERBS + ("the", "and", "but")))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def resolve_model_path(name_or_path: str) -> str:
    """`tiny` and `tiny-pref` (the embedded models, built on first use) -> their cached folder;
    anything else is returned unchanged, for `load_model`."""
    if name_or_path == "tiny":
        return str(tiny_model_path())
    if name_or_path == "tiny-pref":
        return str(tiny_pref_model_path())
    return name_or_path


def tiny_pref_model_path(quiet: bool = False) -> Path:
    """Folder of the embedded SFT policy `tiny-pref` and its preference pairs (`pairs_train.jsonl`,
    `pairs_heldout.jsonl`), built on first use (seconds on 2 CPU cores). Like `tiny_model_path`,
    the build is deterministic and written by `build_once`."""
    key = "-".join(f"{v}" for v in TINY_PREF.values())
    path = cache_root() / f"tiny-pref-{key}"
    if (path / "config.json").exists() and (path / "pairs_heldout.jsonl").exists():
        return path
    t0 = time.time()
    if not quiet:
        print(f"building the embedded model 'tiny-pref' and its preference pairs (once) into {path}",
              flush=True)

    def build(folder: Path) -> dict:
        info = build_tiny_pref(folder)
        (folder / "build.json").write_text(json.dumps({**TINY_PREF, **info,
                                                       "build_seconds": round(time.time() - t0, 1)}, indent=1))
        return info
    info = build_once(path, build)
    if not quiet:
        print(f"built 'tiny-pref' in {time.time() - t0:.1f}s: samples' mean gold reward "
              f"{info['sample_gold_mean']:+.2f} (std {info['sample_gold_std']:.2f}), pair-label "
              f"ceiling {info['heldout_ceiling']:.3f}", flush=True)
    return path


def build_tiny_pref(folder: Path) -> dict:
    """Fit `tiny-pref` to the grammar of `sample_review` (next-token NLL on the completion and its
    EOS, a fixed number of steps), save it into `folder`, then sample the preference pairs from it
    and write them there as JSONL. Returns facts for build.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = TINY_PREF
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    tok = build_word_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg["sft_steps"])
    for _ in range(cfg["sft_steps"]):
        prompts, completions = zip(*(sample_review(rng) for _ in range(cfg["sft_batch"])))
        ids, mask, c_mask, T = encode_prompt_completion(tok, prompts, completions)
        logp, _ = token_logprobs(model, ids, mask, T)  # [B, T]
        loss = -masked_mean(logp, c_mask)  # next-token NLL on the completion and its EOS
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    facts = {"sft_final_nll": round(loss.item(), 4)}
    for split, n, seed in (("train", cfg["train_pairs"], cfg["seed"] + 1),
                           ("heldout", cfg["heldout_pairs"], cfg["seed"] + 2)):
        pairs, golds = sample_preference_pairs(model, tok, n, seed, cfg["max_new_tokens"])
        with open(folder / f"pairs_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        facts[f"{split}_ceiling"] = round(ceiling_accuracy(pairs), 4)
        if split == "heldout":
            facts.update(sample_gold_mean=round(float(np.mean(golds)), 4),
                         sample_gold_std=round(float(np.std(golds)), 4))
    torch.random.set_rng_state(state)
    return facts


@torch.no_grad()
def sample_preference_pairs(model, tokenizer, n_pairs: int, seed: int, max_new_tokens: int = 20,
                            batch_size: int = 1000) -> tuple[list[dict], list[float]]:
    """`n_pairs` preference pairs labelled like annotators: for a prompt x (a random topic), two
    completions a, b ~ π_SFT(·|x) at temperature 1, then a ≻ b with the Bradley–Terry probability

        P(a ≻ b) = σ(r_gold(a) − r_gold(b))

    (a coin flip, so about one label in four goes against the gold reward). Pairs where a == b, where
    a sample is empty, or where one did not finish within `max_new_tokens` are dropped and drawn
    again. Returns the
    rows {"prompt", "chosen", "rejected"} and the gold rewards of all kept samples."""
    rng = np.random.default_rng(seed)
    pairs: list[dict] = []
    golds: list[float] = []
    with torch.random.fork_rng(devices=[]):  # sampling reseeds torch's CPU RNG; the caller's is kept
        torch.manual_seed(seed)
        while len(pairs) < n_pairs:
            prompts = [f"the {PREF_TOPICS[i]}" for i in rng.integers(len(PREF_TOPICS), size=batch_size)]
            *_, texts, finished = generate_text(model, tokenizer, [p for p in prompts for _ in (0, 1)],
                                                max_new_tokens)  # two samples per prompt, consecutive
            for i, x in enumerate(prompts):
                a, b = texts[2 * i], texts[2 * i + 1]
                if (a == b or not (a.strip() and b.strip()) or not (finished[2 * i] and finished[2 * i + 1])
                        or len(pairs) == n_pairs):
                    continue
                p_a = 1.0 / (1.0 + np.exp(-(gold_reward(a) - gold_reward(b))))  # σ(r(a) − r(b))
                a_wins = rng.random() < p_a
                pairs.append({"prompt": x, "chosen": a if a_wins else b, "rejected": b if a_wins else a})
                golds += [gold_reward(a), gold_reward(b)]
    return pairs, golds


@torch.no_grad()
def sample_and_score(policy, ref, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     gold: bool, score_fn=None, batch_size: int = 250) -> dict:
    """The sampled evaluation of dpo.py and ppo.py, one code path so their numbers compare.

    Sample one completion per prompt from π_θ (temperature 1, a fixed seed, so evaluations before
    and after use the same random numbers; the caller's RNG state is kept) and measure:
        gold reward   mean r_gold(y)                                    (built-in task only)
        KL to π_ref   mean over samples of Σ_t [log π_θ(y_t|·) − log π_ref(y_t|·)], an unbiased
                      estimate of D_KL(π_θ(·|x) ‖ π_ref(·|x)) in nats per completion (k1, y ~ π_θ)
        score         mean score_fn(input_ids, attention_mask, finished) [b] -> [b], if given
                      (ppo.py: the reward model minus the EOS penalty)
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    golds, kls, lengths, scores, texts_all = [], [], [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            p_ids, p_mask, c_ids, c_mask, texts, finished = generate_text(
                policy, tokenizer, prompts[i:i + batch_size], max_new_tokens)  # c_ids, c_mask: [b, T]
            ids, mask = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [b, P+T]
            T = c_ids.shape[1]
            logp, _ = token_logprobs(policy, ids, mask, T)  # log π_θ   [b, T]
            ref_logp, _ = token_logprobs(ref, ids, mask, T)  # log π_ref   [b, T]
            kls.append(masked_sum(logp - ref_logp, c_mask, dim=1))  # Σ_t log π_θ/π_ref   [b]
            lengths.append(c_mask.sum(1).float())  # [b]
            if score_fn is not None:
                scores.append(score_fn(ids, mask, torch.tensor(finished, device=device)).float())  # [b]
            texts_all += texts
            if gold:
                golds += [gold_reward(t) for t in texts]
    policy.train(was_training)
    return {"gold_reward": float(np.mean(golds)) if gold else None,
            "gold_reward_std": float(np.std(golds)) if gold else None,
            "kl_to_ref": float(torch.cat(kls).mean()), "mean_length": float(torch.cat(lengths).mean()),
            "score": float(torch.cat(scores).mean()) if scores else None, "texts": texts_all}


def ceiling_accuracy(pairs: list[dict]) -> float:
    """How often the gold reward itself agrees with the labels: the mean over pairs of
    1[r_gold(chosen) > r_gold(rejected)] + ½·1[equal]. The labels are drawn from σ(Δr_gold), so the
    best any predictor can do on average is to side with the gold reward: no reward model beats
    this number except by chance."""
    agree = [float(np.sign(gold_reward(p["chosen"]) - gold_reward(p["rejected"]))) for p in pairs]
    return float(np.mean([(a + 1) / 2 for a in agree]))  # +1 -> 1, 0 (a tie) -> ½, −1 -> 0


def read_preference_jsonl(path: str | Path, flag: str = "--data") -> list[dict]:
    """Read preference pairs: JSONL lines {"prompt": str, "chosen": str, "rejected": str} (other
    keys are ignored). A bad line raises `UsageError("FILE:LINE: reason")`: a missing key, a value
    that is not a string, an empty prompt or completion, or a chosen equal to its rejected."""
    def why_bad(r):
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(r[k], str):
                return f"{k!r} must be a string, got {type(r[k]).__name__}"
            if r[k].strip() == "":
                return f"{k!r} is empty"
        if r["chosen"] == r["rejected"]:
            return "'chosen' and 'rejected' are the same text, so the pair says nothing"
        return None
    rows = read_jsonl(path, required=("prompt", "chosen", "rejected"), flag=flag, validate=why_bad)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def load_preferences(data: str | None, heldout_size: int = PREF_HELDOUT) -> tuple[list[dict], list[dict]]:
    """(train, heldout) preference pairs. No `--data`: the built-in task's pairs, sampled from
    `tiny-pref` (4,000 train, 1,000 held out). With `--data FILE.jsonl`: the last `heldout_size` rows
    (at most a fifth of the file) are held out."""
    if data is None:
        path = tiny_pref_model_path()
        return (read_preference_jsonl(path / "pairs_train.jsonl"),
                read_preference_jsonl(path / "pairs_heldout.jsonl"))
    rows = read_preference_jsonl(data)
    check(len(rows) >= 2, f"--data {data}: need at least 2 pairs (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


def encode_prompt_completion(tokenizer, prompts, completions, device=None):
    """Tokenize (prompt, completion) text for scoring: [left-padded prompt | completion + EOS,
    right-padded]. The prompt and the completion are tokenized separately (no special tokens added),
    and EOS is appended to every completion, so a completion ends the way a sampled one does.

    Returns input_ids, attention_mask [B, P+T], the completion mask [B, T] (1 on the completion's
    tokens and its EOS) and T. The mask comes from the lengths, so it is right even when the pad
    token equals the EOS token.
    """
    def encode(texts):  # one batched call of the tokenizer, not one call per text
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    p_ids, p_mask = left_pad(encode(prompts), tokenizer.pad_token_id, device)  # [B, P]
    comps = [c + [tokenizer.eos_token_id] for c in encode(completions)]
    T = max(map(len, comps))
    c_ids = torch.tensor([c + [tokenizer.pad_token_id] * (T - len(c)) for c in comps],
                         dtype=torch.long, device=device)  # [B, T]
    c_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in comps], dtype=torch.long,
                          device=device)  # [B, T]
    ids, mask = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
    return ids, mask, c_mask, T
