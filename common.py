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
import contextlib
import dataclasses
import fnmatch
import inspect
import json
import os
import random
import re
import shutil
import signal
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
    """argparse, but a bad flag is one line (`error: --flag: ...`), exit code 2, not the whole usage."""

    def error(self, message):
        # argparse says "argument --lr: ..."; the flag alone reads better and matches our own errors
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see --help)\n")


def _converter(base, optional: bool):
    """The `type=` of a flag: `base(s)`, or None for the word `none` when the field is Optional.

    A bad value raises argparse's ArgumentTypeError with a message that says what was expected
    (`--lr: expected a number, got 'abc'`), not argparse's "invalid convert value". Floats must be
    finite: no flag here means anything by nan or inf, and a nan would only surface later as a NaN
    loss. A str value that starts with `~` is expanded as the shell would (os.path.expanduser): the
    shell leaves `--out-dir=~/runs/x` alone, and every str flag that can hold a `~` is a path."""
    expected = {int: "an integer", float: "a number"}.get(base)

    def convert(s: str):
        if optional and s.lower() == "none":
            return None
        if base is str:
            return os.path.expanduser(s) if s.startswith("~") else s
        try:
            value = base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected or base.__name__}, got {s!r}"
                                             + (" (or none)" if optional else "")) from None
        if base is float and not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
        return value
    return convert


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """Build an argparse parser from a dataclass `Args` and return a filled instance.

    `max_new_tokens: int = 4` becomes `--max-new-tokens INT`; a bool becomes `--flag/--no-flag`;
    `Optional[X]` accepts the word `none`; `Literal[...]` is how a field declares a fixed set of
    values: `--help` lists them and any other value is refused. The help text of each flag is the
    docstring under the field. The underscore spelling (`--max_new_tokens`) is accepted as well,
    but not shown in `--help`, so every flag appears once.
    """
    return cls(**vars(_parser(cls, description).parse_args(argv)))


def given_flags(cls, argv: list[str] | None = None) -> set[str]:
    """The fields of `cls` whose flags appear in `argv` (a flag given with its default value
    counts as given): the same parser, with no defaults, so that argparse fills only those."""
    return set(vars(_parser(cls, None, defaults=False).parse_args(argv)))


def _parser(cls, description: str | None, defaults: bool = True) -> argparse.ArgumentParser:
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
        alias = "--" + f.name if "_" in f.name else None
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict = {"dest": f.name, "default": default if defaults else argparse.SUPPRESS,
                        "help": f"{docs.get(f.name, '')} (default: {default})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else None
            base = type(choices[0]) if choices else tp
            if choices:
                # {a,b,c} in --help; `none` must pass the choices check too when the field is Optional
                kwargs["choices"] = choices + [None] if optional else choices
                kwargs["metavar"] = "{" + ",".join(map(str, choices + (["none"] if optional else []))) + "}"
            else:
                kwargs["metavar"] = base.__name__.upper()
            kwargs["type"] = _converter(base, optional)
        parser.add_argument(flag, **kwargs)
        if alias:  # the same flag with underscores: works, hidden from --help and from the usage line
            parser.add_argument(alias, **{**kwargs, "help": argparse.SUPPRESS})
    return parser


def main(cls, train, doc: str | None = None, argv: list[str] | None = None):
    """`python script.py [flags]`: parse flags, run `train(args)`, and turn a `UsageError` into one
    line on stderr and exit code 2, never a traceback. (Scripts check files and paths themselves
    and raise `UsageError`, so that the message names the flag.)

    --resume RUN_DIR takes the run's config from its last checkpoint (`resume_config`; here, with
    the flags that were given on the command line, so that one given with its default value is
    checked too). Ctrl-C (KeyboardInterrupt) writes summary.json with "interrupted": true and the
    figures logged so far (`RunLogger.interrupted`), prints one line and exits with code 130, the
    shell's code for SIGINT, without a traceback."""
    args = parse_args(cls, argv, description=doc)
    try:
        if getattr(args, "resume", None) is not None:
            args = resume_config(args, given_flags(cls, argv))
        return train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        log = RunLogger.active
        if log is None:
            print("interrupted before the run had logged anything: nothing written", file=sys.stderr)
        else:
            s = log.interrupted(Path(sys.argv[0]).stem, dataclasses.asdict(args))
            where = (f"resume with --resume {log.out_dir} (from {s['checkpoint']})" if s["checkpoint"]
                     else "no checkpoint to resume from (--save-every N writes them)")
            total = f"/{log.total_steps}" if log.total_steps is not None else ""
            at = f"at step {s['step']}{total}" if s["step"] is not None else "before its first row"
            print(f"interrupted {at}: {log.out_dir / 'summary.json'} written; {where}", file=sys.stderr)
        sys.exit(130)


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
    """Seed Python's `random`, numpy and torch (CPU and every GPU). numpy's legacy seed takes
    0 .. 2³² − 1 only, so any other --seed is a UsageError here, before a run folder exists."""
    check(0 <= seed < 2 ** 32, f"--seed must be in [0, 2^32 − 1] (got {seed})")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def default_run_dir(script: str, seed: int) -> Path:
    """`runs/<script>__s<seed>__<date-time>`: a new folder per run, so no run overwrites another."""
    return Path("runs") / f"{script}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


# What the scripts write into a run folder, and so what --overwrite may remove: nothing else is
# ever deleted. (model/: the policy or reward model; value_model/: PPO's value model;
# value_head.pt: reinforce.py's --baseline value head; reward_model/: the reward-model run that
# ppo.py trains when none is given; q_network.pt: dqn_maze; checkpoint-<step>/: --save-every, and
# checkpoint-<step>.tmp/, one that was being written when the run stopped.) Shell patterns.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "model", "value_model", "value_head.pt", "reward_model",
               "q_network.pt", "checkpoint-*")


def prepare_run_dir(out_dir: str | Path, overwrite: bool, resume: Checkpoint | None = None) -> Path:
    """Create the run folder and return it. A folder that already holds a run is refused
    (UsageError), unless `overwrite`: then the earlier run's outputs (RUN_OUTPUTS) are removed, and
    the names of what was removed printed. A folder that holds anything else is refused even with
    `overwrite`, since those files are not ours to delete.

    `resume` (--resume, see `resume_run`): the run continues in its own folder. Nothing is
    removed but the rows of metrics.jsonl after the checkpoint's step, which the run writes again."""
    if resume is not None:
        truncate_metrics(resume.run_dir, resume.step)
        return resume.run_dir
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    unknown = [name for name in present if not any(fnmatch.fnmatchcase(name, pat) for pat in RUN_OUTPUTS)]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UsageError(f"--out-dir {out} holds files that no run writes ({shown}); choose another "
                         "--out-dir" + " (--overwrite removes only a run's own outputs)" * overwrite)
    if present:
        check(overwrite, f"--out-dir {out} already holds a run; pass --overwrite to replace it, "
                         "or choose another --out-dir")
        removed = []
        for name in present:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(name + "/")
            else:
                p.unlink()
                removed.append(name)
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear") -> float:
    """The learning-rate schedule of every script: the factor that multiplies --lr at optimiser
    step `step` (counted from 0, so the first step uses lr_factor(0)).

        warm-up      (step + 1) / (warmup_steps + 1)                     for step < warmup_steps
        "constant"   1                                                   after it
        "linear"     (total_steps − step) / (total_steps − warmup_steps) after it, down to 1/(N − W)
                     at the last step (N = total_steps), so 0 is reached just after the run ends

    The linear part is that of transformers' `get_linear_schedule_with_warmup` (TRL's default).
    The warm-up differs: HF's is step / warmup_steps, so its first step has lr 0 and does nothing;
    this one starts at lr / (warmup_steps + 1). With W = 2, N = 5 the factors are
    1/3, 2/3, 1, 2/3, 1/3 (linear) and 1/3, 2/3, 1, 1, 1 (constant).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "linear":
        raise ValueError(f"unknown schedule {schedule!r}: expected linear or constant")
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def lr_scheduler(opt, warmup_steps: int, total_steps: int, schedule: str = "linear"):
    """A torch LambdaLR over `lr_factor`; call `.step()` once per optimiser step (per PPO step in
    ppo.py, which takes several optimiser steps on one rate)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, warmup_steps, total_steps, schedule))


#####################################################################################################
#####  checkpoints: --save-every N, --resume RUN_DIR
#####################################################################################################
#
# A checkpoint is everything that the step after it needs, so that a resumed run takes the same
# steps as one that was never stopped (on the CPU, bit for bit):
#
#   <out-dir>/checkpoint-<step>/
#       model/              the policy (or reward model) with its tokenizer: save_pretrained, so
#                           from_pretrained (and --model) loads it; value_model/ too in ppo.py
#       <name>.pt           the state_dict of any other trained module (reinforce.py's value head)
#       state.pt            optimiser, scheduler (LambdaLR: last_epoch), GradScaler (float16), the
#                           RNG states (Python, numpy, torch CPU and CUDA), and the script's own:
#                           its data-order generator, adaptive coefficients, the figures so far
#       checkpoint.json     the step, the run's full config, and the seconds it had run
#
# It is written as checkpoint-<step>.tmp/ and renamed when complete, so a run stopped while it
# writes leaves no checkpoint that looks whole. All are kept (TRL's default), unless
# --save-total-limit K: then the K newest.

RESUME_MAY_CHANGE = ("device", "log_every", "save_every", "save_total_limit")  # nothing else changes a step
SIGINT_HOOK = "RL_REF_SIGINT_AFTER_STEP"  # for tests: a real SIGINT once this step's row is logged


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read back by `load_checkpoint`: where it is, its step, and what `save_checkpoint`
    stored (`state` holds the script's dict, with "rng" and the training state of `training_state`)."""
    path: Path
    step: int
    config: dict
    state: dict

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def rng_state() -> dict:
    """The global random states: Python's `random`, numpy's legacy one, torch's CPU generator and
    every CUDA device's. Plain lists and tensors, so that torch.load(weights_only=True) reads them."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, key.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (the CUDA states only where CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(opt, sched, prec) -> dict:
    """The state of the optimiser, the scheduler, the GradScaler (float16) and the global RNGs."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": prec.scaler.state_dict() if prec.scaler is not None else None, "rng": rng_state()}


def restore_training_state(state: dict, opt, sched, prec) -> None:
    """Put back what `training_state` saved. The optimiser's tensors move to its parameters' device;
    the RNGs are restored last, so call this just before the first step that the run takes again."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if prec.scaler is not None and state["scaler"] is not None:
        prec.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def save_checkpoint(out: Path, step: int, args, models: dict, state: dict, tokenizer=None) -> Path:
    """Write <out>/checkpoint-<step>/ (see the layout above) and return it. `models`: name -> module;
    one with `save_pretrained` is saved so (with `tokenizer`), any other as <name>.pt (state_dict).
    `state`: the script's dict of tensors, numbers, strings, lists and dicts (for torch.load with
    weights_only=True). Then only the newest --save-total-limit checkpoints are kept."""
    out = Path(out)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, module in models.items():
            if hasattr(module, "save_pretrained"):
                module.save_pretrained(tmp / name)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / name)
            else:
                torch.save(module.state_dict(), tmp / f"{name}.pt")
        torch.save(state, tmp / "state.pt")
        elapsed = RunLogger.active.elapsed() if RunLogger.active is not None else None
        (tmp / "checkpoint.json").write_text(json.dumps(
            {"step": step, "elapsed_seconds": elapsed, "config": dataclasses.asdict(args)},
            indent=2, default=_jsonable))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:  # Ctrl-C or a full disk while writing: leave no half checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    limit = getattr(args, "save_total_limit", None)
    if limit is not None:
        for old in checkpoints(out)[:-limit]:
            shutil.rmtree(old)
    print(f"step {step}: checkpoint saved in {final}", flush=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder (checkpoint-<step>/ with its checkpoint.json), by step."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir()
             and p.name.removeprefix("checkpoint-").isdigit() and (p / "checkpoint.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The last checkpoint of the run in `run_dir`; a UsageError naming --resume when `run_dir` is
    not a run folder or holds no checkpoint."""
    run = Path(run_dir).expanduser()
    check(run.is_dir(), f"--resume {run}: " + ("no such folder" if not run.exists() else "not a folder"))
    check((run / "metrics.jsonl").is_file(), f"--resume {run}: not a run folder (it has no metrics.jsonl)")
    found = checkpoints(run)
    check(len(found) > 0, f"--resume {run}: the run has no checkpoint-<step>/ to resume from "
                          "(only runs started with --save-every N write them)")
    return found[-1]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint` (the tensors onto the CPU; the
    optimiser's state moves to the device when it is loaded into the optimiser)."""
    path = Path(path)
    info = json.loads((path / "checkpoint.json").read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return Checkpoint(path=path, step=int(info["step"]), config=info["config"], state=state)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load trained weights saved by `save_checkpoint` into `module`: a save_pretrained folder
    (read with the module's own class) or a <name>.pt state_dict."""
    path = Path(path)
    if path.is_dir():
        state = type(module).from_pretrained(path, dtype=torch.float32).state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state)


def resume_config(args, given: set[str] | None = None):
    """--resume RUN_DIR: the config to continue with, the one saved in the run's last checkpoint.

    A flag given beside --resume must equal the run's own value, or name one of RESUME_MAY_CHANGE
    (--device, --log-every, --save-every, --save-total-limit), which change no step of the run;
    anything else is refused with one line naming the flag. --out-dir may only name the run's own
    folder. `given`: the fields given on the command line (`given_flags`); None (a caller of
    `train`): those that differ from their default."""
    run = Path(args.resume).expanduser()
    saved = json.loads((latest_checkpoint(run) / "checkpoint.json").read_text())["config"]
    names = [f.name for f in dataclasses.fields(args)]
    check(set(saved) == set(names), f"--resume {run}: its checkpoints were written by another script "
                                    "(their config has other flags)")
    defaults = type(args)()

    def flag(name):
        return "--" + name.replace("_", "-")
    explicit = {n for n in names
                if (n in given if given is not None else getattr(args, n) != getattr(defaults, n))}
    if "out_dir" in explicit and args.out_dir is not None:
        check(Path(args.out_dir).expanduser().resolve() == run.resolve(),
              f"--out-dir {args.out_dir}: --resume continues the run in its own folder ({run}); "
              "leave --out-dir out")
    for n in sorted(explicit - {"resume", "out_dir", *RESUME_MAY_CHANGE}):
        mine = json.loads(json.dumps(getattr(args, n), default=_jsonable))  # as the checkpoint wrote it
        check(mine == saved[n], f"{flag(n)} {mine}: the run in {run} was started with {flag(n)} {saved[n]}; "
                                "with --resume, leave it out or give that value (only "
                                + ", ".join(map(flag, RESUME_MAY_CHANGE)) + " may change)")
    changed = {n: getattr(args, n) for n in RESUME_MAY_CHANGE if n in explicit and n in names}
    return type(args)(**{**saved, **changed, "resume": str(run), "out_dir": str(run)})


def resume_run(args):
    """The start of every `train`: check --save-every and --save-total-limit, and for --resume
    RUN_DIR return the run's saved config (`resume_config`) and its last checkpoint, else
    (args, None). The script then loads its models and state from the checkpoint, skips its start
    evaluation, and takes the steps after the checkpoint's."""
    check(args.save_every >= 0, f"--save-every must be ≥ 0 (got {args.save_every}; 0: no checkpoints)")
    check(args.save_total_limit is None or args.save_total_limit >= 1,
          f"--save-total-limit must be ≥ 1 (got {args.save_total_limit}; none keeps every checkpoint)")
    if args.resume is None:
        return args, None
    args = resume_config(args)
    ckpt = load_checkpoint(latest_checkpoint(args.resume))
    print(f"--resume: continuing {ckpt.run_dir} from {ckpt.path.name} (step {ckpt.step} of {args_steps(args)})",
          flush=True)
    return args, ckpt


def args_steps(args) -> str:
    """The configured length of a run, for messages: --steps or --max-steps (or its epochs)."""
    for name in ("steps", "max_steps"):
        if getattr(args, name, None) is not None:
            return str(getattr(args, name))
    return "its configured end"


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows of metrics.jsonl after `step` (and a last line cut short by a stop), so that a
    resumed run appends the steps after its checkpoint once."""
    path = Path(run_dir) / "metrics.jsonl"
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


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

    Metric names are namespaced, as in CleanRL and TRL: `reward/mean`, `loss/policy`, `eval/accuracy`,
    and printed in full:  step   50/2000 | reward/mean 0.5 | kl/ref 0.01 | 1m02s, ETA 3m10s
    With `total_steps`, each line says how far the run is and when it should end: the ETA is the
    time per step since the first logged row (step 0, after the start evaluation) times the steps
    left, so periodic evaluations are counted in it.

    A resumed run (--resume) appends to the rows that its checkpoint kept: the clock goes on from
    the last row's time. The logger keeps the first row, the last one and the last with `eval/`
    figures, for the summary of a run stopped with Ctrl-C (`interrupted`); the one logger of the
    running script is `RunLogger.active`.
    """
    active: RunLogger | None = None

    def __init__(self, out_dir: Path, quiet: bool = False, total_steps: int | None = None):
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        self.total_steps = total_steps
        self.first: tuple[int, float] | None = None  # (step, time) of the first row, for the ETA
        self.rows: dict[str, dict] = {}  # "start", "last_eval", "last": rows, for `interrupted`
        path, elapsed = self.out_dir / "metrics.jsonl", 0.0
        if path.is_file():  # --resume: the rows up to the checkpoint
            for line in path.read_text(encoding="utf-8").splitlines():
                self._remember(json.loads(line))
                elapsed = self.rows["last"].get("time", elapsed)
        self.t0 = time.time() - elapsed
        self.file = open(path, "a", buffering=1)
        RunLogger.active = self

    def _remember(self, row: dict) -> None:
        self.rows.setdefault("start", row)
        self.rows["last"] = row
        if row is not self.rows["start"] and any(k.startswith("eval/") for k in row):
            self.rows["last_eval"] = row

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 3)

    def log(self, step: int, metrics: dict, keys: list[str] | None = None) -> None:
        now = time.time()
        if self.first is None:
            self.first = (step, now)
        row = {"step": step, "time": round(now - self.t0, 3), **metrics}
        self.file.write(json.dumps(row, default=_jsonable) + "\n")
        self._remember(json.loads(json.dumps(row, default=_jsonable)))
        if not self.quiet and keys != []:  # keys=[]: write the row, print nothing
            shown = keys if keys is not None else list(metrics)
            parts = [f"{k} {_fmt(metrics[k])}" for k in shown if k in metrics]
            if self.total_steps is None:
                head, tail = f"step {step:>5}", f"{_fmt_seconds(now - self.t0)}"
            else:
                head = f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"
                tail = _fmt_seconds(now - self.t0)
                done, spent = step - self.first[0], now - self.first[1]
                if done > 0:
                    tail += f", ETA {_fmt_seconds(spent / done * max(0, self.total_steps - step))}"
            print(" | ".join([head, *parts, tail]), flush=True)
        if os.environ.get(SIGINT_HOOK) == str(step):  # tests: Ctrl-C at a known step, as a user's
            os.kill(os.getpid(), signal.SIGINT)

    def summary(self, summary: dict) -> dict:
        with open(self.out_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=_jsonable)
        return summary

    def interrupted(self, script: str, config: dict) -> dict:
        """The summary.json of a run stopped by Ctrl-C: what is known without more work. `step` is
        the last step logged; `start` its first row (the start evaluation), `last_eval` the latest
        row with eval/ figures after it, `last` the last row; `checkpoint` the newest checkpoint
        (what --resume would continue from), or None."""
        found = checkpoints(self.out_dir)
        last = self.rows.get("last", {})
        summary = self.summary({
            "script": script, "interrupted": True, "step": last.get("step"), "steps": self.total_steps,
            "start": self.rows.get("start"), "last_eval": self.rows.get("last_eval"), "last": last,
            "checkpoint": found[-1].name if found else None, "wall_seconds": self.elapsed(),
            "config": config})
        self.close()
        return summary

    def close(self):
        self.file.close()
        if RunLogger.active is self:
            RunLogger.active = None


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
    with quiet_transformers():  # no "Writing model shards" bar
        model.save_pretrained(Path(out) / "model")
        tokenizer.save_pretrained(Path(out) / "model")
    return str(Path(out) / "model")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _fmt_seconds(t: float) -> str:
    """A duration as people read it: 42s, 3m10s, 2h05m."""
    t = int(round(t))
    if t < 60:
        return f"{t}s"
    if t < 3600:
        return f"{t // 60}m{t % 60:02d}s"
    return f"{t // 3600}h{t % 3600 // 60:02d}m"


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
    check(p.is_file(), f"{flag} {p}: " + ("is a folder, not a JSONL file" if p.is_dir() else "no such file"))
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


class MixedPrecision:
    """How every script computes: float32 weights, forward passes under autocast in `dtype`.

    Every model is stored in float32, the trained ones (policy, value model, reward model and its
    head) and the frozen ones (reference, reward model in PPO) alike; `torch.autocast` runs the
    matmuls of each forward pass in the compute dtype (bfloat16 on a GPU by default).
      - Trained weights in float32: AdamW's update of a weight w is about lr, and bf16 keeps 8 bits
        of mantissa, so any update below |w|·2⁻⁹ rounds away. At lr 1e-6 that is nearly every
        update of a 0.5B model; in float32 it is none.
      - Frozen weights in float32 too: a copy stored in bf16 also runs its norms, embeddings and
        residual adds in bf16, where the policy under autocast runs them in float32, so at step 0
        log π_θ − log π_ref would be ~1e-2 per token instead of exactly 0. The price is memory:
        two bytes more per frozen weight.
      - float16 (GPUs without bf16): its 5-bit exponent underflows small gradients, so the loss is
        scaled before `backward` and the gradients unscaled before clipping (`GradScaler`); a step
        whose gradients overflowed is skipped and the scale lowered.
      - float32: no autocast, no scaler; this is the CPU default.

        prec = MixedPrecision(device, args.dtype)
        with prec.autocast():
            loss = ...
        prec.backward(loss)                               # instead of loss.backward()
        grad_norm = prec.step(opt, params, max_norm=args.grad_clip)  # unscale, clip, step, rescale
    """

    def __init__(self, device: torch.device, name: str = "auto"):
        self.device = device
        self.dtype = pick_dtype(device, name)  # the compute dtype
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        """A context for forward passes: autocast in the compute dtype (nothing for float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scale(self) -> float:
        """The factor that .grad holds between `backward` and `step` (1 without a scaler)."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt, *groups, max_norm: float):
        """Clip the gradient norm of each group of parameters to `max_norm` (≤ 0: no clipping),
        then step `opt`. Returns each group's norm before clipping (a float for one group, else a
        tuple); inf on a float16 step that overflowed, which the scaler then skips."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)  # .grad back to the true gradient, before clipping
        limit = max_norm if max_norm > 0 else float("inf")
        norms = tuple(float(torch.nn.utils.clip_grad_norm_(list(g), limit)) for g in groups)
        norms = tuple(n if n == n else float("inf") for n in norms)  # NaN (inf − inf) -> inf: skipped
        if self.scaler is not None:
            self.scaler.step(opt)  # skipped when the gradients hold inf or NaN
            self.scaler.update()
        else:
            opt.step()
        return norms[0] if len(norms) == 1 else norms


# The embedded models are files of this repository (models/build.py made them; see its docstring).
MODELS_DIR = Path(__file__).resolve().parent / "models"
EMBEDDED = ("tiny", "tiny-pref", "tiny-pref-rm", "tiny-ramble")  # names that --model / --reward-model accept as such


def resolve_model_path(name_or_path: str) -> str:
    """`tiny`, `tiny-pref` and `tiny-pref-rm` (the embedded models) -> their folder in models/;
    anything else is returned unchanged, for `load_model`."""
    if name_or_path in EMBEDDED:
        return str(MODELS_DIR / name_or_path)
    return name_or_path


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off inside the block ("Loading weights" bars on
    stderr, which is for errors), and the caller's settings back after it, whatever happens: no
    process-wide side effect (a user who imports common still sees transformers' warnings)."""
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
    """Load (model, tokenizer) through the Auto classes, with float32 weights whatever the
    compute dtype (see `MixedPrecision`). `tiny` (arithmetic) and `tiny-pref` (the preference
    task) are the embedded defaults, folders of this repository (`models/`), loaded like any other
    with `from_pretrained`. The tokenizer pads on the left.

    A frozen copy (`trainable=False`) is put in eval mode with gradients off: the reference policy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)  # `tiny`, `tiny-pref`: the embedded models
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

    input_ids, attention_mask: [B, L] = [left-padded prompt | right-padded completion]. Row t is
    the distribution that chose y_t, divided by the sampling temperature and log-softmaxed in
    float32 (float64 for a float64 model). Position ids come from the attention mask, so the values
    do not depend on how much padding a row has. Rows whose target is padding are left as the model computes them (finite,
    meaningless): mask them. `token_logprobs` picks y_t's entry out of this; ppo.py keeps all of
    it for the exact KL between two policies.
    """
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
    T = logprobs_all.shape[1]
    targets = input_ids[:, -T:]  # [B, T]
    logp = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    real = attention_mask[:, -T:].bool()  # [B, T]
    return torch.where(real, logp, torch.zeros_like(logp))  # [B, T]


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
    past, next_pos = out.cache, position_ids[:, -1:] + 1  # [B, 1]
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
                    cache=past, use_cache=True)
        past, next_pos = out.cache, next_pos + 1
    completion = torch.stack(tokens, dim=1)  # [B, T]
    return completion, completion_mask(completion, eos_id)


def check_prompts_tokenize(pairs) -> None:
    """A prompt that the tokenizer turns into no tokens would crash deep inside attention: refuse it
    with one line instead. `pairs`: (prompt text, its token ids)."""
    for text, ids in pairs:
        check(len(ids) > 0, f"the prompt {text[:60]!r} tokenizes to no tokens with this model's tokenizer "
                            "(check --model and the prompts of --data)")


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                  greedy: bool = False):
    """Tokenize `prompts`, generate, and return (prompt_ids, prompt_mask, completion_ids,
    completion_mask, completion_texts, finished) where `finished[i]` says the row emitted EOS."""
    device = next(model.parameters()).device
    encoded = {p: tokenizer.encode(p, add_special_tokens=False) for p in dict.fromkeys(prompts)}  # once each
    check_prompts_tokenize(encoded.items())
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


def gsm8k_answer(answer) -> str:
    """The number of an answer field. GSM8K, as published, writes the worked solution and then
    `#### 72`: the final answer is what follows the last `####` (thousands commas dropped).
    Anything else comes back as its string.
    >>> gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"), gsm8k_answer(7)
    ('1072', '7')
    """
    s = str(answer)
    return s.rsplit("####", 1)[1].strip().replace(",", "") if "####" in s else s


def load_task(data: str | None, heldout_size: int = ARITH_HELDOUT) -> tuple[list[dict], list[dict]]:
    """(train, heldout) rows {"prompt", "answer"}. No `--data`: the built-in arithmetic task. With
    `--data FILE.jsonl`: lines of {"prompt": str, "answer": str or number}, or GSM8K as published,
    {"question": str, "answer": "<solution> #### 72"}; the last `heldout_size` rows (at most a
    fifth of the file) are held out. A "prompt" may also be a list of {"role", "content"} messages
    (TRL's conversational prompt-only rows): the script renders it with `chat_prompt`."""
    if data is None:
        return arithmetic_task()

    def why_bad(r):
        key = "prompt" if "prompt" in r else "question" if "question" in r else None
        if key is None:
            return "missing key 'prompt' (or GSM8K's 'question')"
        if not (isinstance(r[key], str) and r[key] != "" or key == "prompt" and is_messages(r[key])):
            return f"{key!r} must be a non-empty string" + (" or a list of {\"role\", \"content\"} messages"
                                                            if key == "prompt" else "")
        if parse_number(gsm8k_answer(r["answer"])) is None:
            return f"'answer' {r['answer']!r} is not a number (nor a GSM8K answer ending in '#### NUMBER')"
        return None
    rows = read_jsonl(data, required=("answer",), validate=why_bad)
    rows = [{"prompt": r["prompt"] if "prompt" in r else r["question"], "answer": gsm8k_answer(r["answer"])}
            for r in rows]
    check(len(rows) >= 2, f"--data {data}: need at least 2 rows (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


def parse_number(s: str):
    """'1,234' -> 1234, '-3.5' -> -7/2, anything else -> None. An exact `Fraction`, so that two
    long integers that differ in the last digit never compare equal (as floats they could)."""
    from fractions import Fraction
    s = s.strip().replace(",", "")
    if len(s) > 200:  # no answer is that long; Python also refuses int() of > 4300 digits
        return None
    return Fraction(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None


def score(completion, answer: str, finished: bool, strict: bool = True, tokenizer=None) -> float:
    """The verifiable reward: 1.0 if the completion answers `answer`, else 0.0. Never raises.

    completion: the generated token ids (a list of ints, with `tokenizer`; everything from the
    first EOS on is dropped), or the decoded text. A completion that did not finish (no EOS within
    the token limit) scores 0 either way: an answer that was cut off is not an answer.

    strict (the built-in arithmetic task) scores what was generated: the tokens before the EOS must
    spell the number and nothing else, in its one canonical form:
      - ASCII digits with an optional leading '-' (`85`; not ` 85`, `85 `, `85.`, `+85`, `85.0`, `8 5`);
      - no leading zero (`085`, `00`) and no `-0`;
      - from ids, no special token (nor an id outside the vocabulary) before the EOS:
        `8 <pad> 5 <eos>` scores 0, as in the process reward (`digit_step_rewards`), though its
        text without special tokens reads `85`.
    From text, strict can only check what the text still holds: a caller that decoded with
    skip_special_tokens=True has already removed any `<pad>` or `<unk>`, so pass the ids for the
    whole check. The answer may be spelled any way `parse_number` reads (`"085"` is 85).

    Not strict (`--data`): the last number in the text (special tokens skipped) counts, GSM8K style
    (`... so the answer is 1,234.`); leading zeros and signs are read as numbers.
    """
    if not finished:
        return 0.0
    if tokenizer is not None and isinstance(completion, (list, tuple)) \
            and all(isinstance(i, int) for i in completion):
        ids = list(completion)
        if tokenizer.eos_token_id in ids:
            ids = ids[:ids.index(tokenizer.eos_token_id)]  # the answer: the tokens before the first EOS
        special, n_vocab = set(tokenizer.all_special_ids), len(tokenizer)
        if strict and any(i in special or not 0 <= i < n_vocab for i in ids):
            return 0.0  # a <pad>, <unk>, ... (or no token at all) inside the answer: not the number as written
        try:
            completion = tokenizer.decode(ids, skip_special_tokens=True)
        except Exception:  # ids the tokenizer cannot decode (out of its vocabulary) are no answer
            return 0.0
    if not isinstance(completion, str):
        return 0.0
    target = parse_number(str(answer))
    if strict:  # ASCII digits only, canonical: 0, or a non-zero first digit (after an optional '-')
        got = parse_number(completion) if re.fullmatch(r"0|-?[1-9][0-9]*", completion) else None
    else:
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
        got = parse_number(nums[-1]) if nums else None
    return float(got is not None and target is not None and got == target)


def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, strict: bool = True,
                    batch_size: int = 256) -> float:
    """Held-out accuracy of greedy decoding: the mean of `score` over `rows`, scored from the
    generated token ids (so a special token inside a strict answer counts as wrong)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        _, _, c_ids, _, _, finished = generate_text(model, tokenizer, [r["prompt"] for r in chunk],
                                                    max_new_tokens, greedy=True)  # c_ids: [b, T]
        total += sum(score(ids, r["answer"], f, strict, tokenizer)
                     for ids, r, f in zip(c_ids.tolist(), chunk, finished))
    model.train(was_training)
    return total / max(1, len(rows))


@torch.no_grad()
def pass_at_k(model, tokenizer, rows: list[dict], k: int, max_new_tokens: int, strict: bool = True,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 512) -> dict:
    """What sampling can reach: k completions per prompt at `temperature`, scored by `score` from
    the generated token ids.

        pass@1 = mean over prompts and samples of the reward    (the expected reward of one sample)
        pass@k = fraction of prompts with at least one right answer among their k samples

    GRPO and REINFORCE can only reinforce answers they sample, so pass@G of the start model bounds
    what they can find. The samples use a fixed seed in a forked RNG (the caller's RNG state is
    kept), so the figure of a model is the same whenever it is measured.
    Returns {"k": k, "pass_at_1": float, "pass_at_k": float}.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = []  # [n_prompts, k] as nested lists
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        per = max(1, batch_size // k)  # prompts per generate call
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            _, _, c_ids, _, _, finished = generate_text(model, tokenizer, [r["prompt"] for r in chunk for _ in range(k)],
                                                        max_new_tokens, temperature)  # the k samples are consecutive
            ids = c_ids.tolist()  # [b·k][T]
            for j, r in enumerate(chunk):
                hits.append([score(ids[j * k + s], r["answer"], finished[j * k + s], strict, tokenizer)
                             for s in range(k)])
    model.train(was_training)
    h = np.array(hits, dtype=np.float64).reshape(-1, k)  # [n, k]
    return {"k": k, "pass_at_1": float(h.mean()) if h.size else 0.0,
            "pass_at_k": float((h.max(1) > 0).mean()) if h.size else 0.0}


def pass_metrics(p: dict | None) -> dict:
    """The logged names of a `pass_at_k` result: eval/pass@1 and eval/pass@k."""
    return {} if p is None else {"eval/pass@1": p["pass_at_1"], f"eval/pass@{p['k']}": p["pass_at_k"]}


def pass_text(p: dict | None) -> str:
    return "" if p is None else f"; pass@1 {p['pass_at_1']:.3f}, pass@{p['k']} {p['pass_at_k']:.3f}"


def digit_step_rewards(completion_ids: torch.Tensor, comp_mask: torch.Tensor,
                       target_ids: list[list[int]]) -> torch.Tensor:
    """Process rewards for the arithmetic task: every completion token is a step, the EOS
    included (not one step per answer digit).  -> [B, T]

    Step j ends at completion token j and is rewarded 1 if that token is the j-th token of the
    target (the answer's tokens, then EOS), else 0. So `85<eos>` against `85` earns [1, 1, 1],
    `75<eos>` earns [0, 1, 1], `8<eos>` earns [1, 0], and `8<pad>5<eos>` earns [1, 0, 0, 0] (a
    special token is a wrong step, and shifts the rest). Tokens past the target's length earn 0,
    and positions outside the completion mask are 0. The comparison is of token ids, so a number
    spelled with other tokens than `tokenizer.encode(answer)` earns 0 where `score` may give 1.
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
# `tiny-pref` is the SFT policy: a word-level Llama-style model (models/build.py), fitted
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


#####################################################################################################
#####  conversational rows (TRL's format): lists of {"role", "content"} messages, rendered as text
#####################################################################################################
#
# A conversational row holds messages instead of text: "prompt": [{"role": "user", "content": ...}],
# "chosen": [{"role": "assistant", "content": ...}]. The scripts turn each into plain text with the
# tokenizer's chat template, once, right after loading the model (`render_chat`); from there on a row
# is text like any other. As in TRL: the prompt is rendered with the generation prompt (the opening
# of the assistant's turn), the completion is what rendering prompt + completion adds after it, and a
# preference row without "prompt" takes the messages that chosen and rejected share as its prompt
# (TRL's "implicit prompt"). Our one difference: the completion's own EOS is cut off the text,
# because `encode_prompt_completion` appends EOS to every completion (a template whose turns end
# in another token keeps that token, and gets the EOS after it).


def is_messages(value) -> bool:
    """True for a conversational value: a list of {"role": str, "content": str} dicts."""
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


def why_bad_text(row: dict, key: str) -> str | None:
    """Why row[key] is neither a non-empty string nor a list of messages (None if it is fine)."""
    v = row[key]
    if isinstance(v, list):
        return None if is_messages(v) else (f"{key!r} must be a string or a non-empty list of "
                                            '{"role": str, "content": str} messages')
    if not isinstance(v, str):
        return f"{key!r} must be a string or a list of messages, got {type(v).__name__}"
    return f"{key!r} is empty" if v.strip() == "" else None


def check_chat_template(tokenizer, model: str, wrap: bool, rows: list[dict] = ()) -> None:
    """One line, not a Jinja traceback, when the tokenizer has no chat template and one is needed:
    for --chat-template (`wrap`), or for conversational `rows` (a "prompt" that is a list of messages)."""
    conversational = any(isinstance(r["prompt"], list) for r in rows)
    check(not (wrap or conversational) or bool(getattr(tokenizer, "chat_template", None)),
          f"{'--chat-template' if wrap else '--data (rows of messages)'}: the tokenizer of --model {model} "
          "has no chat template (give a chat/instruct model, or plain-text rows without --chat-template)")


def chat_prompt(tokenizer, prompt, wrap: bool = False) -> str:
    """The text of a prompt: a list of messages rendered with the chat template and the generation
    prompt; a string as it is, or (with `wrap`, i.e. --chat-template) as one user message."""
    if isinstance(prompt, str) and not wrap:
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chat_completion(tokenizer, prompt_msgs: list, completion_msgs: list) -> tuple[str, str]:
    """(prompt text, completion text) of one conversational prompt + completion."""
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    n = len(os.path.commonprefix([prompt, full]))  # < len(prompt) if the template renders the prompt
    completion = full[n:]                          # alone differently; TRL also splits where they part
    eos = tokenizer.eos_token
    if eos and eos in completion and completion.rsplit(eos, 1)[1].strip() == "":
        completion = completion.rsplit(eos, 1)[0]  # the EOS is appended again as a token
    return prompt[:n], completion


def render_chat(tokenizer, rows: list[dict], wrap: bool = False, model: str = "") -> list[dict]:
    """Rows whose prompt / chosen / rejected / completions are messages (or, with `wrap`, strings
    taken as one user and one assistant message) -> the same rows as plain text. Plain-text rows
    without `wrap` come back unchanged. Raises a one-line `UsageError` if the template is needed and
    the tokenizer has none."""
    check_chat_template(tokenizer, model, wrap, rows)
    if not (wrap or any(isinstance(r["prompt"], list) for r in rows)):
        return rows
    out = []
    for r in rows:
        msgs = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        keys = ["completions"] if "completions" in r else ["chosen", "rejected"]
        comps = r["completions"] if "completions" in r else [r["chosen"], r["rejected"]]
        texts = [_chat_completion(tokenizer, msgs, c if isinstance(c, list) else
                                  [{"role": "assistant", "content": c}]) for c in comps]
        prompt = min((p for p, _ in texts), key=len)  # where the prompt ends for every completion
        texts = [c if p == prompt else p[len(prompt):] + c for p, c in texts]
        out.append({**r, "prompt": prompt, **({"completions": texts} if keys == ["completions"]
                                               else dict(zip(keys, texts)))})
    return out


def read_preference_jsonl(path: str | Path, flag: str = "--data", rankings: bool = False) -> list[dict]:
    """Read preference rows from JSONL. Each line is one of (other keys are ignored):

        {"prompt": str, "chosen": str, "rejected": str}                 a pair (TRL's standard format)
        {"prompt": [messages], "chosen": [messages], "rejected": [messages]}      conversational (TRL)
        {"chosen": [messages], "rejected": [messages]}     conversational, implicit prompt: the leading
                                                           messages that chosen and rejected share
        {"prompt": ..., "completions": [best, ..., worst]}     a K-wise ranking, K ≥ 2 (InstructGPT);
                                                           only with `rankings` (reward_model.py)

    A file may mix pairs and rankings (a pair is a ranking of K = 2), but not text and messages.
    A bad line raises `UsageError("FILE:LINE: reason")`: a missing key, a value that is not text or
    messages, an empty prompt or completion, or two completions of one row that are the same.
    """
    kinds: set[bool] = set()  # conversational or not, over the rows so far

    def why_bad(r):
        if "completions" in r and "chosen" not in r:
            if not rankings:
                return "'completions' rows (K-wise rankings) are for reward_model.py; this script needs " \
                       "'chosen' and 'rejected' pairs"
            if "prompt" not in r:
                return "missing key(s) 'prompt'"
            if not isinstance(r["completions"], list) or len(r["completions"]) < 2:
                return "'completions' must be a list of at least 2 completions, best first"
            comps = r["completions"]
        else:
            missing = [k for k in ("chosen", "rejected") if k not in r]
            if missing:
                return f"missing key(s) {', '.join(map(repr, missing))}" + (
                    " (or 'completions', a ranking best first)" if rankings else "")
            comps = [r["chosen"], r["rejected"]]
            # no prompt, or a text prompt beside completions of messages (which then hold the whole
            # conversation): the prompt is implicit, as TRL's maybe_extract_prompt reads such rows
            if "prompt" not in r or (all(map(is_messages, comps)) and isinstance(r["prompt"], str)):
                if not all(map(is_messages, comps)):
                    return "missing key(s) 'prompt' (an implicit prompt needs 'chosen' and 'rejected' as " \
                           "lists of messages)"
                n = next((i for i, (a, b) in enumerate(zip(*comps)) if a != b), min(map(len, comps)))
                # n: how many leading messages chosen and rejected share
                if n == 0:
                    return "no 'prompt', and 'chosen' and 'rejected' share no leading messages"
                r["prompt"], r["chosen"], r["rejected"] = comps[0][:n], comps[0][n:], comps[1][n:]
                comps = [r["chosen"], r["rejected"]]
        names = ["chosen", "rejected"] if "chosen" in r else [f"completions[{i}]" for i in range(len(comps))]
        fields = {"prompt": r["prompt"], **dict(zip(names, comps))}
        reason = next(filter(None, (why_bad_text(fields, k) for k in fields)), None)
        if reason:
            return reason
        conv = [isinstance(v, list) for v in fields.values()]
        if len(set(conv)) > 1:
            return "mixes text and lists of messages: give the prompt and every completion the same way"
        kinds.add(conv[0])
        if len(kinds) > 1:
            return "the file mixes plain-text rows and conversational rows (lists of messages)"
        if len({json.dumps(c, sort_keys=True) for c in comps}) < len(comps):
            return ("'chosen' and 'rejected' are the same text, so the pair says nothing" if "chosen" in r
                    else "two of the 'completions' are the same, so the ranking is not a ranking")
        return None
    rows = read_jsonl(path, flag=flag, validate=why_bad)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} if "chosen" in r
            else {"prompt": r["prompt"], "completions": list(r["completions"])} for r in rows]


def load_preferences(data: str | None, heldout_size: int = PREF_HELDOUT,
                     rankings: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, heldout) preference rows (see `read_preference_jsonl`). No `--data`: the built-in
    task's pairs, sampled from `tiny-pref` (4,000 train, 1,000 held out). With `--data FILE.jsonl`:
    the last `heldout_size` rows (at most a fifth of the file) are held out."""
    if data is None:
        path = MODELS_DIR / "tiny-pref"
        return (read_preference_jsonl(path / "pairs_train.jsonl"),
                read_preference_jsonl(path / "pairs_heldout.jsonl"))
    rows = read_preference_jsonl(data, rankings=rankings)
    check(len(rows) >= 2, f"--data {data}: need at least 2 rows (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


def encode_prompt_completion(tokenizer, prompts, completions, device=None, max_length: int | None = None):
    """Tokenize (prompt, completion) text for scoring: [left-padded prompt | completion + EOS,
    right-padded]. The prompt and the completion are tokenized separately (no special tokens added),
    and EOS is appended to every completion, so a completion ends the way a sampled one does.

    `max_length`: each row's prompt + completion + EOS is cut to its first `max_length` tokens
    (TRL's DPO truncation, `truncation_mode="keep_start"`), so the cut falls in the completion; the
    caller drops the rows whose prompt alone fills `max_length` (dpo.py does), as TRL does.

    Returns input_ids, attention_mask [B, P+T], the completion mask [B, T] (1 on the completion's
    tokens and its EOS) and T. The mask comes from the lengths, so it is right even when the pad
    token equals the EOS token.
    """
    def encode(texts):  # one batched call of the tokenizer, not one call per text
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    prompt_ids = encode(prompts)
    check_prompts_tokenize(zip(prompts, prompt_ids))
    p_ids, p_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)  # [B, P]
    comps = [c + [tokenizer.eos_token_id] for c in encode(completions)]
    if max_length is not None:  # keep_start: the first max_length tokens of prompt + completion
        comps = [c[:max(0, max_length - len(p))] for p, c in zip(prompt_ids, comps)]
    T = max(map(len, comps))
    c_ids = torch.tensor([c + [tokenizer.pad_token_id] * (T - len(c)) for c in comps],
                         dtype=torch.long, device=device)  # [B, T]
    c_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in comps], dtype=torch.long,
                          device=device)  # [B, T]
    ids, mask = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
    return ids, mask, c_mask, T
