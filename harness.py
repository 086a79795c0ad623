"""The harness: what runs an algorithm, and what a reader of the algorithm may skip.

  #####  command line   `parse_args(Args)`: a dataclass whose field docstrings become `--help`;
                        `main(Args, train)`: bad input -> one line on stderr, exit code 2
  #####  runs           device, seed, run folder, the LR schedule
  #####  checkpoints    `--save-every N`, `--resume RUN_DIR`
  #####  logging        `RunLogger` (metrics.jsonl, summary.json, one line per logging step)
  #####  precision      `MixedPrecision`: float32 weights, autocast forward passes, loss scaling;
                        `freeze`: frozen models at the compute precision; `gradient_checkpointing`
  #####  LoRA           --lora-r R: `apply_lora`, `reference_of` (π_ref = the base, adapters off)

No step of an algorithm is here: the reward, the advantage, the loss, the clipping and the optimiser
step are in each algorithm's own file. Nothing here needs a network connection.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import collections
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import json
import os
import random
import shutil
import signal
import sys
import textwrap
import threading
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch
import torch.utils.checkpoint

import common
from common import UsageError, check

#####################################################################################################
#####  command line
#####################################################################################################


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


def check_lr(lr: float, flag: str = "--lr") -> None:
    """A learning rate must be in (0, 1]: AdamW moves each weight by about lr per step, so a rate
    above 1 wrecks a model in one step, and one past float32's range (1e300) cannot even be applied
    to the float32 weights (torch raises an overflow deep inside the optimiser)."""
    check(0 < lr <= 1, f"{flag} must be in (0, 1] (got {lr}): AdamW moves each weight by about lr per "
                       "step" + (", and this one overflows float32, the weights' dtype" if lr > 3.4e38 else ""))


def check_idle_flags(args, rules: dict[str, tuple[bool, str]]) -> None:
    """No flag is silently ignored: `rules` maps a field to (whether it acts in this run, the words
    that say what it needs), and a field set to another value than its default where it does not act
    is a UsageError: `--cispo-epsilon 0.2 does nothing without --policy-loss cispo`."""
    defaults = type(args)()
    for name, (acts, needs) in rules.items():
        value = getattr(args, name)
        check(acts or value == getattr(defaults, name),
              f"--{name.replace('_', '-')} {value} does nothing {needs}; leave it out")


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
    checked too). The out-dir is checked before anything loads (`check_out_dir`).

    Every stop is a clean stop: Ctrl-C (SIGINT), SIGTERM (kill, Slurm, docker stop) and SIGHUP (the
    terminal closed) write summary.json with "interrupted": true and the figures logged so far
    (`RunLogger.interrupted`), print one line with the resume hint, and exit with 128 + the signal's
    number (130, 143, 129), without a traceback. SIGINT is caught even where the shell started the
    run in the background with SIGINT ignored. A one-line error after the run folder was made
    removes what the run made (`abandon_runs`)."""
    args = parse_args(cls, argv, description=doc)
    handlers, earlier = _catch_stop_signals(), set(_RUNS)  # earlier: runs of an earlier main() in this process
    try:
        if getattr(args, "resume", None) is not None:
            args = resume_config(args, given_flags(cls, argv))
        check_out_dir(args)
        return train(args)
    except UsageError as e:
        abandon_runs(earlier)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        log = RunLogger.active
        if log is None:
            abandon_runs(earlier)
            _say(f"interrupted{by} before the run had logged anything: nothing written")
        else:
            s = log.interrupted(Path(sys.argv[0]).stem, dataclasses.asdict(args),
                                None if signum == signal.SIGINT else signal.Signals(signum).name)
            where = (f"resume with --resume {log.out_dir} (from {s['checkpoint']})" if s["checkpoint"]
                     else "no checkpoint to resume from (--save-every N writes them)")
            total = f"/{log.total_steps}" if log.total_steps is not None else ""
            at = f"at step {s['step']}{total}" if s["step"] is not None else "before its first row"
            _say(f"interrupted{by} {at}: {log.out_dir / 'summary.json'} written; {where}")
        sys.exit(128 + int(signum))
    except Exception:  # a crash: its lock stays, so that a rerun knows the folder's run did not finish
        for out in set(_RUNS) - earlier:
            del _RUNS[out]
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the run is, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # a second one while the summary is written: ignored
    raise Stopped(signum)


def _catch_stop_signals() -> dict:
    """SIGTERM and SIGHUP raise `Stopped`, unless the process started with them ignored (`nohup`
    ignores SIGHUP so that the run outlives its terminal: kept so); SIGINT raises KeyboardInterrupt
    even if the process started with it ignored (a shell's `cmd &` in a script ignores it, and
    `kill -INT` is then the way to stop the run). -> the handlers before, to put back."""
    before = {}
    if threading.current_thread() is not threading.main_thread():
        return before
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            before[sig] = signal.signal(sig, _raise_stopped)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        before[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    return before


def _say(line: str) -> None:
    """One line on stderr; nothing if stderr is gone (SIGHUP: the terminal closed)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


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


# On the CPU, one operation of a small model is too small to split across threads: torch's default,
# a thread per core, makes them wait for each other, and for the cores whenever anything else runs
# (measured in bench/bench_threads.py). Above this many parameters, torch's own choice is kept.
SMALL_MODEL = 20_000_000
TORCH_THREADS = torch.get_num_threads()  # torch's own choice, before any script changes it


def set_threads(requested: int | None, device: torch.device, *models) -> int | None:
    """--threads: torch's intra-op CPU threads. Default: 1 for models of under SMALL_MODEL parameters
    in all, else torch's own choice (a thread per core, or OMP_NUM_THREADS). On a GPU nothing
    changes (returns None). Printed once; summary.json records it ("threads")."""
    check(requested is None or requested >= 1, f"--threads must be ≥ 1 (got {requested})")
    if device.type != "cpu":
        return None
    n_params = sum(p.numel() for m in models for p in m.parameters())
    n = requested or (1 if n_params < SMALL_MODEL else TORCH_THREADS)
    torch.set_num_threads(n)
    why = ("--threads" if requested else f"the default for a model {'under' if n_params < SMALL_MODEL else 'of'} "
           f"{SMALL_MODEL / 1e6:.0f}M parameters{'' if n_params < SMALL_MODEL else ' or more'}; --threads N to change")
    print(f"CPU threads: {n} ({why})")
    return n


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
    """Create the run folder, take its lock (`LOCK_FILE`) and return it. A folder that already
    holds a run is refused (UsageError), unless `overwrite`: then the earlier run's outputs
    (RUN_OUTPUTS) are removed, and the names of what was removed printed. A folder that holds
    anything else is refused even with `overwrite`, since those files are not ours to delete.
    The leftovers of a run that never finished (no summary.json, no checkpoint, and the lock of a
    process that is gone: a crash or a `kill -9`) are replaced without --overwrite, with a note.

    `resume` (--resume, see `resume_run`): the run continues in its own folder. Nothing is
    removed but the rows of metrics.jsonl after the checkpoint's step, which the run writes again."""
    if resume is not None:
        _take_lock(resume.run_dir, made=False, resume=True)
        truncate_metrics(resume.run_dir, resume.step)
        return resume.run_dir
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {out}: cannot create it ({e.strerror})") from None
    stale = _take_lock(out, made=made)
    try:
        present = _outputs_to_remove(out, overwrite, stale)
    except UsageError:
        release_lock(out)
        raise
    removed = []
    for name in present:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(name + "/")
        else:
            p.unlink()
            removed.append(name)
    if removed:
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}" if overwrite else
              f"note: removed {', '.join(removed)} from {out}: the leftovers of a run that never finished")
    return out


# The lock of a run folder: "<pid> <host>" of the process that runs in it. Taken before the run's
# first write, removed when its logger closes (the end of the run, or the summary of a stop) and at
# exit; a crash leaves it, so that a rerun knows that the folder's run never finished.
LOCK_FILE = "run.lock"
_RUNS: dict[Path, dict] = {}  # the folders whose lock this process holds -> {"made", "resume", "logged"}


def _lock_owner(out: Path) -> tuple[int, str] | None:
    """(pid, host) written in out/LOCK_FILE, or None when there is none (an unreadable one: pid 0)."""
    try:
        pid, _, host = (out / LOCK_FILE).read_text().strip().partition(" ")
        return int(pid), host
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 0, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lock_holder(out: Path) -> str | None:
    """Who else holds out's lock, in words ("PID 123", "PID 123 on host h"), or None when no live
    process does (none, ours, or stale)."""
    owner = _lock_owner(out)
    if owner is None or owner[0] in (0, os.getpid()) and owner[1] in ("", os.uname().nodename):
        return None
    pid, host = owner
    if host and host != os.uname().nodename:
        return f"PID {pid} on host {host}"  # no way to ask from here whether it still runs
    return f"PID {pid}" if _alive(pid) else None


def _take_lock(out: Path, made: bool, resume: bool = False) -> int | None:
    """Write out/LOCK_FILE for this process, or refuse (UsageError naming the process that holds
    it). A lock whose process is gone is taken over with a note. -> that process's PID, or None."""
    holder = _lock_holder(out)
    check(holder is None, f"--out-dir {out}: another run is using this folder ({holder}); wait for it "
                          f"to end, stop it, or choose another --out-dir (if that run is gone, remove "
                          f"{out / LOCK_FILE})")
    owner = _lock_owner(out)
    stale = owner[0] if owner is not None and owner[0] not in (0, os.getpid()) else None
    tmp = out / f"{LOCK_FILE}.{os.getpid()}"
    try:
        tmp.write_text(f"{os.getpid()} {os.uname().nodename}\n")
        if owner is None:
            try:
                os.link(tmp, out / LOCK_FILE)  # atomic: of two runs starting at once, one gets it
            except FileExistsError:
                tmp.unlink()
                return _take_lock(out, made, resume)
            tmp.unlink()
        else:
            tmp.replace(out / LOCK_FILE)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"--out-dir {out}: cannot write in it ({e.strerror})") from None
    if stale:
        print(f"note: {out} was locked by PID {stale}, which is gone (it crashed or was killed); "
              "this run takes the folder over")
    _RUNS[out] = {"made": made, "resume": resume, "logged": False}
    return stale


def release_lock(out: Path) -> None:
    """Remove out's lock if this process holds it (at the end of a run, and at exit)."""
    out = Path(out)
    _RUNS.pop(out, None)
    owner = _lock_owner(out)
    if owner is not None and owner[0] == os.getpid():
        with contextlib.suppress(OSError):
            (out / LOCK_FILE).unlink()


@atexit.register
def _release_locks() -> None:
    for out in list(_RUNS):
        release_lock(out)


def abandon_runs(earlier=()) -> None:
    """After a one-line error or a stop before the first logged row: remove what the run made in
    its folder (its outputs; the folder itself if the run created it) and its lock. A resumed run
    and one that has logged rows are kept as they are (only their lock goes)."""
    for out, run in list(_RUNS.items()):
        if out in earlier:
            continue
        if not (run["resume"] or run["logged"]):
            for name in _run_outputs(out):
                p = out / name
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        release_lock(out)
        if run["made"] and not run["resume"] and not run["logged"]:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty


def _run_outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_OUTPUTS))


def _outputs_to_remove(out: Path, overwrite: bool, stale: int | None = None) -> list[str]:
    """What prepare_run_dir removes from an existing `out` (the earlier run's outputs), or a
    UsageError when it may not: files no run writes, or a run and no --overwrite. `stale`: the PID
    of a dead process whose lock was found there (its run never finished)."""
    if not out.is_dir():
        return []
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE
                     and not p.name.startswith(LOCK_FILE + "."))
    unknown = [name for name in present if not any(fnmatch.fnmatchcase(name, pat) for pat in RUN_OUTPUTS)]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UsageError(f"--out-dir {out} holds files that no run writes ({shown}); choose another "
                         "--out-dir" + " (--overwrite removes only a run's own outputs)" * overwrite)
    unfinished = stale is not None and not (out / "summary.json").exists() and not checkpoints(out)
    check(not present or overwrite or unfinished,
          f"--out-dir {out} already holds a run; pass --overwrite to replace it, or choose another --out-dir")
    return present


# The flags whose files or folders a run reads: --overwrite never removes them, and no run writes
# into them (`check_out_dir`).
INPUT_FLAGS = ("model", "reward_model", "data", "ptx_data", "maze", "resume")


def check_out_dir(args) -> None:
    """Before anything loads: the run folder (--out-dir, or runs/ for the default one) can be made
    and written (not under a file, not on a read-only file system, permitted), no other live run
    holds it, it neither holds nor lies inside a file or folder that a flag of this run reads, and
    it holds no run unless --overwrite (or --resume, which continues its own). One line each."""
    resuming = getattr(args, "resume", None) is not None
    given = getattr(args, "out_dir", None)
    out = Path(given).expanduser() if given is not None else Path("runs")
    flag = f"--out-dir {given}" if given is not None else "the default run folder runs/"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} exists and is not a folder")
    near = out.absolute()
    while not near.exists():  # the nearest folder that exists: where the run's folders are made
        near = near.parent
    check(near.is_dir(), f"{flag}: {near} is a file, so no folder can be made under it")
    if hasattr(os, "statvfs") and os.statvfs(near).f_flag & os.ST_RDONLY:
        raise UsageError(f"{flag}: {near} is on a read-only file system; choose another --out-dir")
    check(os.access(near, os.W_OK | os.X_OK),
          f"{flag}: {near} is not writable (no permission, or an immutable folder); choose another --out-dir")
    if given is None:
        return
    holder = _lock_holder(out) if out.is_dir() else None
    check(holder is None, f"{flag}: another run is using this folder ({holder}); wait for it to end, "
                          f"stop it, or choose another --out-dir (if that run is gone, remove {out / LOCK_FILE})")
    if resuming:
        return
    here = out.resolve()
    for name in INPUT_FLAGS:
        value = getattr(args, name, None)
        if not isinstance(value, str):
            continue
        path = Path(common.resolve_model_path(value) if name in ("model", "reward_model") else value).expanduser()
        if not path.exists():
            continue
        it = path.resolve()
        input_flag = "--" + name.replace("_", "-")
        check(it != here and here not in it.parents,
              f"{input_flag} {value} lies inside {flag}: a run's folder must not hold what it reads "
              "(--overwrite would remove it); move it out, or choose another --out-dir")
        check(it not in here.parents, f"{flag} lies inside {input_flag} {value}: a run must not write "
                                      "into what it reads; choose another --out-dir")
    owner = _lock_owner(out) if out.is_dir() else None
    _outputs_to_remove(out, getattr(args, "overwrite", False),
                       owner[0] if owner is not None and owner[0] not in (0, os.getpid()) else None)


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

# what --resume may change: nothing else changes a step
LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")  # every script's last Args
RESUME_MAY_CHANGE = ("device", "threads", "log_every", "save_every", "save_total_limit")
ADDED_FLAGS = {"threads", *LORA_FLAGS}  # flags newer than some checkpoints: a checkpoint without one takes its default
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
                with common.quiet_transformers():  # no "Writing model shards" bar at every checkpoint
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
    check((run / "metrics.jsonl").is_file(), f"--resume {run}: not a run folder (it has no metrics.jsonl); "
                                             "pass the run's folder (the --out-dir it was started with) "
                                             "or one of its checkpoint-<step>/ folders")
    found = checkpoints(run)
    check(len(found) > 0, f"--resume {run}: the run has no checkpoint-<step>/ to resume from "
                          "(only runs started with --save-every N write them)")
    return found[-1]


def resume_target(resume: str | Path) -> tuple[Path, Path]:
    """--resume's argument -> (the run folder, the checkpoint to continue from). A run folder
    continues from its last checkpoint; one of its checkpoint-<step>/ folders (the way
    transformers' resume_from_checkpoint is given) from that one. The run goes on in its own folder
    either way, and the rows of metrics.jsonl after the checkpoint's step are written again, so a
    checkpoint with later ones beside it is refused: their rows and theirs would mix."""
    path = Path(resume).expanduser()
    if path.name.removeprefix("checkpoint-").isdigit() and (path / "checkpoint.json").is_file():
        check((path.parent / "metrics.jsonl").is_file(),
              f"--resume {path}: a checkpoint, but {path.parent} is not its run folder (it has no "
              "metrics.jsonl)")
        last = checkpoints(path.parent)[-1]
        check(last == path, f"--resume {path}: the run went on to {last.name}, and continuing from an "
                            f"earlier checkpoint would mix the two runs' rows and checkpoints; pass "
                            f"--resume {path.parent} to continue from {last.name}, or remove the "
                            f"checkpoints after {path.name} first")
        return path.parent, path
    return path, latest_checkpoint(path)


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
    if is_lora(module):  # --lora-r: the adapter's weights, as `save_pretrained` wrote them
        from peft import load_peft_weights, set_peft_model_state_dict
        set_peft_model_state_dict(module, load_peft_weights(str(path), device=str(next(module.parameters()).device)))
        return
    if path.is_dir():
        state = type(module).from_pretrained(path, dtype=torch.float32).state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state)


def resume_config(args, given: set[str] | None = None):
    """--resume RUN_DIR: the config to continue with, the one saved in the run's last checkpoint.

    A flag given beside --resume must equal the run's own value, or name one of RESUME_MAY_CHANGE
    (--device, --threads, --log-every, --save-every, --save-total-limit), which change no step of the run;
    anything else is refused with one line naming the flag. --out-dir may only name the run's own
    folder. `given`: the fields given on the command line (`given_flags`); None (a caller of
    `train`): those that differ from their default."""
    run, ckpt = resume_target(args.resume)
    saved = json.loads((ckpt / "checkpoint.json").read_text())["config"]
    names = [f.name for f in dataclasses.fields(args)]
    check(set(saved) <= set(names) and set(names) - set(saved) <= ADDED_FLAGS,
          f"--resume {run}: its checkpoints were written by another script (their config has other flags)")
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
    check_idle_flags(args, {"save_total_limit": (args.save_every > 0, "without --save-every N")})
    check(getattr(args, "threads", None) is None or args.threads >= 1, f"--threads must be ≥ 1 (got {args.threads})")
    check(0 <= getattr(args, "seed", 0) < 2 ** 32, f"--seed must be in [0, 2^32 − 1] (got {getattr(args, 'seed', 0)})")
    if args.resume is None:
        check_lora(args)  # --lora-r: its flags, and peft installed, before anything is loaded
        check_out_dir(args)  # before anything loads
        return args, None
    args = resume_config(args)
    check_lora(args)
    check_out_dir(args)  # writable, and no other run in it
    ckpt = load_checkpoint(resume_target(args.resume)[1])
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


ETA_WINDOW = 20  # logged rows whose pace gives the ETA


class RunLogger:
    """One compact line per logging step on stdout, and the same numbers in `metrics.jsonl`.

    Metric names are namespaced, as in CleanRL and TRL: `reward/mean`, `loss/policy`, `eval/accuracy`,
    and printed in full:  step   50/2000 | reward/mean 0.5 | kl/ref 0.01 | 1m02s, ETA 3m10s
    With `total_steps`, each line says how far the run is and when it should end: the ETA is the
    time per step over the last ETA_WINDOW logged rows times the steps left, so that it follows the
    machine's load as it changes (a whole-run average lags it), and periodic evaluations that fall
    within the window are counted in it.

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
        self.recent: collections.deque = collections.deque(maxlen=ETA_WINDOW)  # (step, time) of the last rows
        self.rows: dict[str, dict] = {}  # "start", "last_eval", "last": rows, for `interrupted`
        path, elapsed = self.out_dir / "metrics.jsonl", 0.0
        if path.is_file():  # --resume: the rows up to the checkpoint
            for line in path.read_text(encoding="utf-8").splitlines():
                self._remember(json.loads(line))
                elapsed = self.rows["last"].get("time", elapsed)
        self.t0 = time.time() - elapsed
        self.file = open(path, "a", buffering=1)
        RunLogger.active = self
        if self.out_dir in _RUNS:  # its rows are the run's record now: a later error keeps them
            _RUNS[self.out_dir]["logged"] = True

    def _remember(self, row: dict) -> None:
        self.rows.setdefault("start", row)
        self.rows["last"] = row
        if row is not self.rows["start"] and any(k.startswith("eval/") for k in row):
            self.rows["last_eval"] = row

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 3)

    def log(self, step: int, metrics: dict, keys: list[str] | None = None) -> None:
        now = time.time()
        self.recent.append((step, now))
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
                done, spent = step - self.recent[0][0], now - self.recent[0][1]
                if done > 0:
                    tail += f", ETA {_fmt_seconds(spent / done * max(0, self.total_steps - step))}"
            print(" | ".join([head, *parts, tail]), flush=True)
        if os.environ.get(SIGINT_HOOK) == str(step):  # tests: Ctrl-C at a known step, as a user's
            os.kill(os.getpid(), signal.SIGINT)

    def summary(self, summary: dict) -> dict:
        with open(self.out_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=_jsonable)
        return summary

    def interrupted(self, script: str, config: dict, signal_name: str | None = None) -> dict:
        """The summary.json of a run stopped by Ctrl-C (or `signal_name`, SIGTERM or SIGHUP, which
        the summary then names): what is known without more work. `step` is the last step logged;
        `start` its first row (the start evaluation), `last_eval` the latest row with eval/ figures
        after it, `last` the last row; `checkpoint` the newest checkpoint (what --resume would
        continue from), or None."""
        found = checkpoints(self.out_dir)
        last = self.rows.get("last", {})
        summary = self.summary({
            "script": script, "interrupted": True, "step": last.get("step"), "steps": self.total_steps,
            "start": self.rows.get("start"), "last_eval": self.rows.get("last_eval"), "last": last,
            "checkpoint": found[-1].name if found else None, "wall_seconds": self.elapsed(),
            "config": config, **({"signal": signal_name} if signal_name else {})})
        self.close()
        return summary

    def close(self):
        self.file.close()
        if RunLogger.active is self:
            RunLogger.active = None
        release_lock(self.out_dir)  # the run is over: its folder is free


def run_facts(args, device, t_start: float, train_seconds: float, load_seconds: float) -> dict:
    """The facts that end every summary.json: wall time (process start of `train` to now), time in
    the training loop, time spent loading and preparing, the full config, and where it ran."""
    return {"wall_seconds": round(time.time() - t_start, 2), "train_seconds": round(train_seconds, 2),
            "load_seconds": round(load_seconds, 2), "config": dataclasses.asdict(args),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}


def save_policy(model, tokenizer, out: Path, enabled: bool = True) -> str | None:
    """`save_pretrained` the model and its tokenizer into out/model, so that `from_pretrained`
    loads it; returns that folder (None when saving is off). With --lora-r the folder holds the
    adapter as peft writes it (adapter_config.json, adapter_model.safetensors: the base model is
    --model, named in the config), which `peft.AutoPeftModelForCausalLM.from_pretrained` loads."""
    if not enabled:
        return None
    with common.quiet_transformers():  # no "Writing model shards" bar
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
#####  precision: float32 weights, autocast forward passes, float16 loss scaling
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
      - Frozen models (π_ref, r_φ) at the compute precision, but not simply cast to it (`freeze`):
        a copy cast to bf16 whole would also run its norms, embeddings and residual adds in bf16,
        where the policy under autocast runs them in float32, so at step 0 log π_θ − log π_ref would
        be ~1e-2 per token instead of exactly 0. `freeze` stores in bf16 only the matmul weights,
        which autocast rounds to bf16 anyway, and keeps the rest in float32: the same numbers, bit
        for bit, at about half the memory.
      - float16 (GPUs without bf16): its 5-bit exponent underflows small gradients, so the loss is
        scaled before `backward` and the gradients unscaled before clipping (`GradScaler`); a step
        whose gradients overflowed is skipped and the scale lowered.
      - float32: no autocast, no scaler; this is the CPU default.

        prec = MixedPrecision(device, args.dtype)
        with prec.autocast():
            loss = ...
        prec.backward(loss)      # instead of loss.backward()
        prec.unscale_(opt)       # float16: .grad back to the true gradient, before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the algorithm's own clipping
        prec.step(opt)           # instead of opt.step() (float16: skipped if the gradients overflowed)
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

    def unscale_(self, opt) -> None:
        """float16: divide every .grad of `opt` by the loss scale, so that clipping sees the true
        gradient (and remember whether it overflowed). Else nothing."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        """`opt.step()`; float16: skipped when the gradients held inf or NaN, and the scale updated."""
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
            # a step skipped on overflow is the scaler's design, not a misuse: without this, torch's
            # LR scheduler warns "lr_scheduler.step() before optimizer.step()" when the first is skipped
            opt._opt_called = True
        else:
            opt.step()


#####################################################################################################
#####  LoRA: --lora-r R trains low-rank adapters on a frozen base model (peft, optional)
#####################################################################################################
#
# W x  becomes  W x + (α/r) B A x,  A: [r, d_in], B: [d_out, r], B = 0 at the start (Hu et al. 2021),
# so π_θ = the base model exactly before the first step. Only A and B are trained: AdamW's
# 12 bytes per weight (gradient and two moments, float32) are paid for the adapters alone, and the
# base model is stored once. π_ref is the same model with its adapters disabled (`reference_of`),
# as TRL does with a peft model: no second copy of the weights, and log π_θ − log π_ref = 0 exactly
# at step 0. peft is imported only when --lora-r is given (`pip install peft`).


def is_lora(model) -> bool:
    """Whether `model` is a peft model (`apply_lora`'s)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _peft():
    try:
        import peft
    except ImportError:
        raise UsageError("--lora-r needs the peft library, which is not installed: pip install peft") from None
    return peft


def check_lora(args) -> None:
    """The LoRA flags: one line naming the flag when a value is out of range, or when peft is missing."""
    r = getattr(args, "lora_r", 0)
    check(r >= 0, f"--lora-r must be ≥ 0 (got {r}; 0: no LoRA, every weight trained)")
    if r == 0:  # the other LoRA flags act only with adapters
        check_idle_flags(args, {f: (False, "without --lora-r R") for f in LORA_FLAGS[1:] if hasattr(args, f)})
        return
    check(args.lora_alpha is None or args.lora_alpha > 0, f"--lora-alpha must be > 0 (got {args.lora_alpha})")
    # every script computes its forward passes in eval mode (π_θ = π_old exactly at the first inner
    # step, π_θ = π_ref at the start), where peft's dropout does nothing: a value above 0 would be ignored
    check(args.lora_dropout == 0, f"--lora-dropout {args.lora_dropout}: these scripts run every forward pass "
          "in eval mode (no dropout, so that the first ratio is exactly 1), where LoRA dropout has no effect; "
          "leave it at 0")
    check(bool(args.lora_target_modules.strip()), "--lora-target-modules is empty: give all-linear or "
          "module names, comma-separated (q_proj,v_proj)")
    _peft()


def lora_config(args, **overrides):
    """The peft.LoraConfig of the --lora-* flags: r = --lora-r, α = --lora-alpha (default 2r), dropout
    --lora-dropout (0), --lora-target-modules (all-linear, or names), task CAUSAL_LM; `overrides`
    replace or add fields (bench/to_trl.py: a reward model's task and head). None without --lora-r."""
    check_lora(args)
    if not getattr(args, "lora_r", 0):
        return None
    targets = args.lora_target_modules.strip()
    return _peft().LoraConfig(**{
        "r": args.lora_r, "lora_alpha": args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        "lora_dropout": args.lora_dropout, "task_type": "CAUSAL_LM",
        "target_modules": targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        **overrides})


def apply_lora(model, args, ckpt: Checkpoint | None = None, name: str = "model"):
    """--lora-r R: `model` with LoRA adapters on --lora-target-modules, only they trainable (the base
    frozen); on --resume, with the checkpoint's adapter weights (<checkpoint>/<name>/). Without
    --lora-r: `model` itself. The adapters are those of peft's `get_peft_model` with `lora_config`;
    the base model is changed in place (its linear layers wrapped), so code that holds the base sees
    the adapters."""
    config = lora_config(args)
    if config is None:
        return model
    peft = _peft()
    targets = args.lora_target_modules.strip()
    training = model.training
    try:
        lora = peft.get_peft_model(model, config)
    except ValueError as e:  # no module of that name
        raise UsageError(f"--lora-target-modules {targets}: {str(e).strip().splitlines()[0]}") from None
    lora.train(training)  # the new adapter layers in the model's mode (the scripts': eval)
    if ckpt is not None:
        load_weights(lora, ckpt.path / name)
    return lora


def start_weights(ckpt: Checkpoint | None, base: str, args, name: str = "model") -> str:
    """Where a trained model's weights are loaded from: on --resume the checkpoint's <name>/, else
    `base` (--model). With --lora-r always `base`: the checkpoint holds only the adapter, which
    `apply_lora` puts back on it."""
    return str(ckpt.path / name) if ckpt is not None and not args.lora_r else base


class AdaptersOff:
    """π_ref under --lora-r: the policy's own weights with its adapters disabled for each call (peft's
    `disable_adapter`), i.e. the frozen base model, with no second copy of it. Called as a model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, attr):  # .config, .device, ...: the policy's
        if attr == "model":  # not set yet (a copy being made): no recursion
            raise AttributeError(attr)
        return getattr(self.model, attr)


def reference_of(policy, args, base: str, device, prec: MixedPrecision):
    """π_ref, the frozen start model: a copy of `base` (--model) in eval mode without gradients, its
    matmul weights as autocast rounds them (`freeze`); with --lora-r, the policy with its adapters
    off (`AdaptersOff`). Either way the same numbers as π_θ at step 0 (B = 0 for the adapters), and
    with --lora-r no second copy of the weights."""
    if getattr(args, "lora_r", 0):
        return AdaptersOff(policy)
    return freeze(common.load_model(base, device, trainable=False)[0], prec)


def unwrap(model):
    """The transformers model inside a peft model (its adapters still in it and active), for code
    that reads its parts (`.base_model`, the transformer without the LM head); else `model`."""
    return model.get_base_model() if is_lora(model) else model


def merge_lora(model):
    """The base model with the adapters added into its weights (W + (α/r) B A), no peft layers left
    (peft's `merge_and_unload`); `model` itself when it has no adapters."""
    return model.merge_and_unload() if is_lora(model) else model


def freeze(model: torch.nn.Module, prec: MixedPrecision) -> torch.nn.Module:
    """A frozen model (π_ref, r_φ's LM, PPO's θ_old) at the compute precision, in place: eval mode,
    no gradients, and under bf16/fp16 autocast the weight of every matmul layer (`nn.Linear`, GPT-2's
    `Conv1D`) stored in the compute dtype. -> the model.

    Why the numbers stay the same, bit for bit: under autocast a Linear casts its float32 weight to
    the compute dtype (`.to(dtype)`, round to nearest even) before the matmul, so storing that rounded
    weight gives the matmul the very same operands. Everything autocast runs in float32 keeps its
    float32 weights: the embedding lookup (autocast does not cast it; a weight tied to the LM head is
    shared with the lookup, so it stays float32 too), the norms, the biases (autocast rounds a
    Linear's bias as well, so either way is the same) and the rotary tables. The model must then run
    under `prec.autocast()`, as every forward pass of the scripts does; a Linear run with autocast off
    would stop with a dtype error, never a silent difference. The saving: 2 bytes per matmul weight,
    36% of Qwen2.5-0.5B's bytes (its tied embedding stays float32) and 42% of 1.5B's.
    float32 runs (the CPU default): nothing is cast.
    """
    model.eval().requires_grad_(False)
    if prec.dtype == torch.float32:
        return model
    from transformers.pytorch_utils import Conv1D

    matmuls = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    elsewhere = {id(p) for m in model.modules() if not isinstance(m, (torch.nn.Linear, Conv1D))
                 for p in m.parameters(recurse=False)}  # e.g. the embedding, tied to the LM head
    for m in matmuls:
        if id(m.weight) not in elsewhere:
            m.weight.data = m.weight.data.to(prec.dtype)  # what autocast would round it to
    return model


def gradient_checkpointing(model, enabled: bool = True):
    """--gradient-checkpointing on a trained model (a transformers causal LM), in place: each decoder
    layer keeps only its inputs for the backward pass and recomputes its activations there (TRL:
    gradient_checkpointing). Memory: the activations of one layer at a time instead of all of them,
    for about one more forward pass per backward. The gradients are the same up to float rounding
    (bit for bit on the CPU here; tests/test_memory_options.py). -> the model.

    Why not transformers' `gradient_checkpointing_enable`: it checkpoints a layer only while the
    layer is in training mode, and the scripts keep every model in eval mode (no dropout, so that
    ρ = 1 exactly on the first update). Switching the layers to training mode would turn on the
    dropout that some layers apply themselves (OPT's, Falcon's), silently. So each decoder layer's
    forward is wrapped in `torch.utils.checkpoint` (non-reentrant, PyTorch's recommended mode) in
    any mode, whenever gradients are being recorded. Without gradients (generation, the old and
    reference log-probs) and in a forward pass that fills a KV cache (`use_cache=True`), the layer
    runs as it is, so generation is unchanged. The wrapper is a method of the layer, so a deepcopy
    of the model (PPO's value model and θ_old) recomputes its own layers.
    """
    if not enabled:
        return model
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    check(len(layers) > 0, f"--gradient-checkpointing: {type(model).__name__} has no decoder layers that "
                           "transformers can checkpoint")
    for layer in layers:
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return model


def _checkpointed_forward(layer, *args, **kwargs):
    """A decoder layer's forward, recomputed in the backward pass (`gradient_checkpointing`)."""
    forward = type(layer).forward.__get__(layer)  # the layer's own forward, bound to this layer
    if not torch.is_grad_enabled() or kwargs.get("use_cache"):
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)
