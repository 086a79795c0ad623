"""Bad input, stops and conflicts: each ends in one line, and no user's file is lost or mixed.

One table, CASES: a command (script and flags, run through harness.main in-process, as
`python SCRIPT.py FLAGS` runs it), the exit code, a piece of the one line on stderr, and the files
that must and must not exist afterwards. Every case fails before a model's training starts (most in
`validate` or the out-dir check, before any model loads), so the table is fast. `{tmp}` in a flag is
the test's own folder, which `setup` fills first.

Then what a table cannot say: the lock of a run folder (a live holder, a stale one), SIGTERM, SIGHUP
and a SIGINT to a run started with SIGINT ignored (a real kill of a subprocess, as the Ctrl-C test of
test_resume.py), a one-line error after the run folder was made, --resume of a checkpoint folder,
BOM and gzip data files, and characters an embedded tokenizer does not know.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import common
import dpo
import dqn_maze
import grpo
import harness
import ppo
import reinforce
import reward_model
import tasks

ROOT = common.MODELS_DIR.parent
MODULES = {m.__name__: m for m in (grpo, reinforce, ppo, dpo, reward_model, dqn_maze)}
PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def a_run(folder: Path) -> None:
    """A finished run's outputs: what --overwrite may remove."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text('{"step": 0}\n')
    (folder / "summary.json").write_text("{}")


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


SETUPS = {  # name -> what `setup` writes under {tmp}
    "none": lambda t: None,
    "model_in_run": lambda t: (a_run(t / "x"), shutil.copytree(common.MODELS_DIR / "tiny", t / "x" / "model")),
    "data_in_run": lambda t: (a_run(t / "x"), write(t / "x" / "model" / "d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')),
    "run": lambda t: a_run(t / "x"),
    "notes": lambda t: (a_run(t / "x"), write(t / "x" / "notes.txt", "mine")),
    "file": lambda t: write(t / "f", "x"),
    "bad_json": lambda t: write(t / "d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n'),
    "empty": lambda t: write(t / "d.jsonl", "\n\n"),
    "pairs": lambda t: write(t / "d.jsonl", json.dumps(PAIR) + "\n"),
    "tasks": lambda t: write(t / "d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n'),
    "gz": lambda t: write(t / "d.jsonl.gz", gzip.compress(b'{"prompt": "1+1=", "answer": "2"}\n')),
    "latin1": lambda t: write(t / "d.jsonl", '{"prompt": "caf\u00e9", "answer": "2"}\n'.encode("latin-1")),
    "no_run": lambda t: (t / "r").mkdir(),
}

# (id, script, flags, setup, exit code, a piece of the one line, must exist, must not exist)
CASES = [
    # 1. a user's files are never deleted: no input inside --out-dir, even with --overwrite
    ("model_inside_out_dir", "grpo", ["--model", "{tmp}/x/model", "--out-dir", "{tmp}/x", "--overwrite"],
     "model_in_run", 2, "--model {tmp}/x/model lies inside --out-dir {tmp}/x", ["x/model/config.json", "x/metrics.jsonl"], []),
    ("data_inside_out_dir", "grpo", ["--data", "{tmp}/x/model/d.jsonl", "--out-dir", "{tmp}/x", "--overwrite"],
     "data_in_run", 2, "--data {tmp}/x/model/d.jsonl lies inside --out-dir", ["x/model/d.jsonl"], []),
    ("out_dir_inside_model", "reinforce", ["--model", "{tmp}/x/model", "--out-dir", "{tmp}/x/model/run"],
     "model_in_run", 2, "lies inside --model", ["x/model/config.json"], ["x/model/run"]),
    ("a_run_needs_overwrite", "dpo", ["--out-dir", "{tmp}/x"], "run", 2, "already holds a run; pass --overwrite",
     ["x/metrics.jsonl", "x/summary.json"], ["x/run.lock"]),
    ("other_files_kept", "reward_model", ["--out-dir", "{tmp}/x", "--overwrite"], "notes", 2,
     "holds files that no run writes (notes.txt)", ["x/notes.txt", "x/metrics.jsonl"], []),
    # 4. the out-dir checked before anything loads
    ("out_dir_is_a_file", "grpo", ["--out-dir", "{tmp}/f"], "file", 2, "--out-dir {tmp}/f exists and is not a folder", ["f"], []),
    ("out_dir_under_a_file", "ppo", ["--out-dir", "{tmp}/f/run"], "file", 2, "is a file, so no folder can be made", [], ["f/run"]),
    # 6. --resume: a folder that is not a run's
    ("resume_no_such_folder", "reinforce", ["--resume", "{tmp}/nothing"], "none", 2, "no such folder", [], ["nothing"]),
    ("resume_not_a_run", "grpo", ["--resume", "{tmp}/r"], "no_run", 2, "or one of its checkpoint-<step>/ folders", [], []),
    # 7. flags that do nothing in the given combination, and the ranges of numbers
    ("grpo_kl_estimator_beta_0", "grpo", ["--beta", "0", "--kl-estimator", "k1"], "none", 2, "--kl-estimator k1 does nothing with --beta 0", [], []),
    ("grpo_cispo_epsilon_clip", "grpo", ["--cispo-epsilon", "0.2"], "none", 2, "--cispo-epsilon 0.2 does nothing without --policy-loss cispo", [], []),
    ("grpo_gspo_epsilon_token", "grpo", ["--gspo-epsilon", "0.01"], "none", 2, "--gspo-epsilon 0.01 does nothing without --ratio sequence", [], []),
    ("grpo_epsilon_with_cispo", "grpo", ["--policy-loss", "cispo", "--epsilon", "0.3"], "none", 2, "--epsilon 0.3 does nothing with --ratio sequence or --policy-loss cispo", [], []),
    ("grpo_rounds_no_dynamic", "grpo", ["--max-sample-rounds", "3"], "none", 2, "--max-sample-rounds 3 does nothing without --dynamic-sampling", [], []),
    ("grpo_overlong_penalty_no_buffer", "grpo", ["--overlong-penalty", "0.5"], "none", 2, "--overlong-penalty 0.5 does nothing with --overlong-buffer 0", [], []),
    ("grpo_adv_eps_unscaled", "grpo", ["--no-scale-rewards", "--adv-eps", "0.1"], "none", 2, "--adv-eps 0.1 does nothing with --no-scale-rewards", [], []),
    ("grpo_epsilon_2", "grpo", ["--epsilon", "2"], "none", 2, "--epsilon must be in (0, 1) (got 2.0)", [], []),
    ("grpo_grad_clip_negative", "grpo", ["--grad-clip", "-1"], "none", 2, "--grad-clip must be ≥ 0 (got -1.0; 0 disables it)", [], []),
    ("grpo_max_new_tokens_negative", "grpo", ["--max-new-tokens", "-1"], "none", 2, "--max-new-tokens must be ≥ 1 (got -1)", [], []),
    ("grpo_lr_1e300", "grpo", ["--lr", "1e300"], "none", 2, "--lr must be in (0, 1] (got 1e+300)", [], []),
    ("grpo_lr_nan", "grpo", ["--lr", "nan"], "none", 2, "--lr: expected a finite number, got 'nan'", [], []),
    ("grpo_lr_word", "grpo", ["--lr", "abc"], "none", 2, "--lr: expected a number, got 'abc'", [], []),
    ("grpo_group_size_1", "grpo", ["--group-size", "1"], "none", 2, "--group-size must be ≥ 2", [], []),
    ("ppo_target_kl_fixed", "ppo", ["--target-kl", "3"], "none", 2, "--target-kl 3.0 does nothing with --kl-control fixed", [], []),
    ("ppo_kl_horizon_adaptive", "ppo", ["--beta", "0.1", "--kl-control", "adaptive", "--kl-horizon", "50"], "none", 2, "--kl-horizon 50 does nothing without --kl-control proportional", [], []),
    ("ppo_penalty_beta_clip", "ppo", ["--penalty-beta", "2"], "none", 2, "--penalty-beta 2.0 does nothing without --policy-loss kl-penalty", [], []),
    ("ppo_trpo_delta_clip", "ppo", ["--trpo-delta", "0.05"], "none", 2, "--trpo-delta 0.05 does nothing without --policy-loss trpo", [], []),
    ("ppo_epsilon_trpo", "ppo", ["--policy-loss", "trpo", "--epsilon", "0.1"], "none", 2, "--epsilon 0.1 does nothing with --policy-loss trpo", [], []),
    ("ppo_ptx_batch_no_ptx", "ppo", ["--ptx-batch", "8"], "none", 2, "--ptx-batch 8 does nothing with --ptx-coef 0", [], []),
    ("ppo_epsilon_1", "ppo", ["--epsilon", "1"], "none", 2, "--epsilon must be in (0, 1)", [], []),
    ("ppo_lr_2", "ppo", ["--lr", "2"], "none", 2, "--lr must be in (0, 1]", [], []),
    ("ppo_grad_clip_negative", "ppo", ["--grad-clip", "-0.5"], "none", 2, "--grad-clip must be ≥ 0", [], []),
    ("reinforce_value_lr_no_value", "reinforce", ["--value-lr", "0.1"], "none", 2, "--value-lr 0.1 does nothing without --baseline value", [], []),
    ("reinforce_value_lr_huge", "reinforce", ["--baseline", "value", "--value-lr", "5"], "none", 2, "--value-lr must be in (0, 1]", [], []),
    ("reinforce_save_total_limit_alone", "reinforce", ["--save-total-limit", "2"], "none", 2, "--save-total-limit 2 does nothing without --save-every N", [], []),
    ("reward_model_norm_samples_off", "reward_model", ["--no-normalize", "--norm-samples", "8"], "none", 2, "--norm-samples 8 does nothing with --no-normalize", [], []),
    ("reward_model_lr_huge", "reward_model", ["--lr", "10"], "none", 2, "--lr must be in (0, 1]", [], []),
    ("dpo_label_smoothing_ipo", "dpo", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "none", 2, "--label-smoothing applies to the logistic losses", [], []),
    ("dpo_lr_zero", "dpo", ["--lr", "0"], "none", 2, "--lr must be > 0", [], []),
    ("reward_model_micro_batch_0", "reward_model", ["--micro-batch", "0"], "none", 2, "--micro-batch must be ≥ 1 (got 0)", [], []),
    ("reward_model_micro_batch_over_batch", "reward_model", ["--batch-size", "4", "--micro-batch", "8"], "none", 2, "--micro-batch 8 must be ≤ --batch-size 4", [], []),
    ("dpo_micro_batch_0", "dpo", ["--micro-batch", "0"], "none", 2, "--micro-batch must be ≥ 1 (got 0)", [], []),
    ("dpo_micro_batch_over_batch", "dpo", ["--micro-batch", "64"], "none", 2, "--micro-batch 64 must be ≤ --batch-size 32", [], []),
    ("dqn_gamma_1", "dqn_maze", ["--gamma", "1"], "none", 2, "--gamma 1.0: must be in (0, 1)", [], []),
    ("unknown_choice", "grpo", ["--loss-agg", "sum"], "none", 2, "--loss-agg: invalid choice", [], []),
    ("unknown_flag", "ppo", ["--no-such-flag", "1"], "none", 2, "unrecognized arguments", [], []),
    # data files: malformed, empty, the wrong format, compressed, not UTF-8 (8. and what already behaves)
    ("data_bad_json", "grpo", ["--data", "{tmp}/d.jsonl"], "bad_json", 2, "{tmp}/d.jsonl:2: not valid JSON", [], []),
    ("data_empty", "reinforce", ["--data", "{tmp}/d.jsonl"], "empty", 2, "the file holds no rows", [], []),
    ("data_no_such_file", "dpo", ["--data", "{tmp}/nothing.jsonl"], "none", 2, "no such file", [], []),
    ("data_pairs_for_grpo", "grpo", ["--data", "{tmp}/d.jsonl"], "pairs", 2, "{tmp}/d.jsonl:1:", [], []),
    ("data_tasks_for_dpo", "dpo", ["--data", "{tmp}/d.jsonl"], "tasks", 2, "{tmp}/d.jsonl:1:", [], []),
    ("data_gzip", "grpo", ["--data", "{tmp}/d.jsonl.gz"], "gz", 2, "a gzip-compressed file; decompress it first", [], []),
    ("data_not_utf8", "grpo", ["--data", "{tmp}/d.jsonl"], "latin1", 2, "not UTF-8 text", [], []),
    # --model that is not a model
    ("model_no_such_folder", "grpo", ["--model", "{tmp}/nothing"], "none", 2, "--model {tmp}/nothing: no such folder", [], []),
    ("model_empty_folder", "reinforce", ["--model", "{tmp}/r", "--out-dir", "{tmp}/out"], "no_run", 2, "--model {tmp}/r", [], ["out"]),
]


def run_main(module, argv: list[str], capsys) -> tuple[int, list[str]]:
    """`python SCRIPT.py argv` in this process: (exit code, the non-blank lines on stderr)."""
    with pytest.raises(SystemExit) as e:
        harness.main(module.Args, module.train, argv=argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return e.value.code, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_keeps_the_files(case, tmp_path, capsys, monkeypatch):
    name, script, flags, setup, code, line, present, absent = case
    monkeypatch.chdir(tmp_path)  # a default run folder would go to {tmp}/runs
    SETUPS[setup](tmp_path)
    argv = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    got, err = run_main(MODULES[script], argv, capsys)
    assert got == code, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert line.replace("{tmp}", str(tmp_path)) in err[0], err
    for rel in present:
        assert (tmp_path / rel).exists(), rel
    for rel in absent:
        assert not (tmp_path / rel).exists(), rel
    assert not (tmp_path / "runs").exists()  # no default run folder was made
    assert not list(tmp_path.rglob(harness.LOCK_FILE))  # no lock left behind


def numeric_fields():
    for module in (grpo, ppo, reinforce, dpo, reward_model):
        hints = typing.get_type_hints(module.Args)
        for f in dataclasses.fields(module.Args):
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Union:  # Optional[X]
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            if tp in (int, float):
                yield pytest.param(module, f.name, -10 ** 6 if tp is int else -1e6, id=f"{module.__name__}-{f.name}")


@pytest.mark.parametrize("module, name, value", list(numeric_fields()))
def test_every_numeric_flag_refuses_a_value_far_out_of_its_range(module, name, value):
    """Every int and float flag of every script (dqn_maze's are in CASES): a large negative value
    stops at the start of train (`harness.resume_run`, then `validate`), with one line naming it."""
    args = module.Args(**{name: value})
    with pytest.raises(common.UsageError) as e:
        args, _ = harness.resume_run(args)
        module.validate(args)
    assert "--" + name.replace("_", "-") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("module, kw, note", [
    (ppo, {"kl_estimator": "k3"}, "with --beta 0 the KL is no part of the reward; --kl-estimator k3 changes only the logged KL"),
    (ppo, {"policy_loss": "trpo", "ppo_epochs": 2}, "--ppo-epochs and --mini-batches set the value model's passes only"),
    (ppo, {"policy_loss": "trpo", "mini_batches": 2}, "--ppo-epochs and --mini-batches set the value model's passes only"),
    (grpo, {"epsilon_high": 0.28}, "with --mu 1 every ratio is exactly 1, so the clip range (--epsilon, --epsilon-high) never binds"),
    (grpo, {"ratio": "sequence"}, "with --mu 1 every ratio is exactly 1, so --ratio sequence and --policy-loss cispo"),
])
def test_a_legitimate_but_idle_combination_gets_a_note(module, kw, note, capsys):
    module.validate(module.Args(**{"beta": 0.0, **kw}))
    said = capsys.readouterr().out.strip()
    assert said.startswith("note: ") and note in said and len(said.splitlines()) == 1, said
    module.validate(module.Args(beta=0.0))  # the defaults: no note
    assert capsys.readouterr().out == ""


def test_a_run_folder_never_holds_an_input_even_without_a_run(tmp_path):
    """The containment rule on its own: an input equal to the out-dir is refused too."""
    args = grpo.Args(model=str(tmp_path / "m"), out_dir=str(tmp_path / "m"))
    shutil.copytree(common.MODELS_DIR / "tiny", tmp_path / "m")
    with pytest.raises(common.UsageError, match="lies inside --out-dir"):
        harness.check_out_dir(args)


def test_a_read_only_or_immutable_out_dir_is_one_line_before_loading(tmp_path, monkeypatch):
    """os.access is what check_out_dir asks (root may write anywhere but on a read-only mount or
    into an immutable folder, where it answers no): faked here, as a test cannot mount."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(common.UsageError, match=r"--out-dir .*: .* is not writable \(no permission, or an immutable folder\)"):
        harness.check_out_dir(grpo.Args(out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


#####################################################################################################
#####  one run per folder: the lock
#####################################################################################################


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_locked_folder_is_refused_naming_the_process(tmp_path, capsys, live_pid):
    out = tmp_path / "run"
    a_run(out)
    (out / harness.LOCK_FILE).write_text(f"{live_pid} {os.uname().nodename}\n")
    for argv in (["--out-dir", str(out), "--overwrite"], ["--out-dir", str(out)]):
        code, err = run_main(reinforce, argv, capsys)
        assert code == 2 and len(err) == 1, err
        assert f"another run is using this folder (PID {live_pid})" in err[0]
    with pytest.raises(common.UsageError, match=f"PID {live_pid}"):  # prepare_run_dir asks again
        harness.prepare_run_dir(out, overwrite=True)
    assert (out / "metrics.jsonl").is_file() and (out / harness.LOCK_FILE).read_text().startswith(str(live_pid))


def test_a_stale_lock_is_taken_over_and_an_unfinished_run_replaced(tmp_path, capsys):
    """A run killed with -9 (or crashed) leaves its lock and metrics.jsonl: a rerun needs no
    --overwrite, takes the folder over and says so. With a checkpoint it could resume: kept."""
    out, pid = tmp_path / "run", dead_pid()
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / harness.LOCK_FILE).write_text(f"{pid} {os.uname().nodename}\n")
    harness.check_out_dir(grpo.Args(out_dir=str(out)))  # the early check agrees
    assert harness.prepare_run_dir(out, overwrite=False) == out
    said = capsys.readouterr().out
    assert f"locked by PID {pid}, which is gone" in said and "leftovers of a run that never finished" in said
    assert [p.name for p in out.iterdir()] == [harness.LOCK_FILE]
    assert (out / harness.LOCK_FILE).read_text().split()[0] == str(os.getpid())
    harness.release_lock(out)
    assert not (out / harness.LOCK_FILE).exists()
    # a finished run, or one with a checkpoint, is no leftover: --overwrite is still needed
    for name in ("summary.json", "checkpoint-3/checkpoint.json"):
        a_run(out)
        write(out / name, "{}")
        (out / harness.LOCK_FILE).write_text(f"{pid} {os.uname().nodename}\n")
        with pytest.raises(common.UsageError, match="already holds a run; pass --overwrite"):
            harness.prepare_run_dir(out, overwrite=False)
        shutil.rmtree(out)


def test_a_lock_on_another_host_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / harness.LOCK_FILE).write_text("123 some-other-host\n")
    with pytest.raises(common.UsageError, match="PID 123 on host some-other-host"):
        harness.check_out_dir(grpo.Args(out_dir=str(out)))


#####################################################################################################
#####  no half-made folders
#####################################################################################################


def failing_train(out, after):
    def train(args):
        harness.prepare_run_dir(out, args.overwrite)
        (out / "model").mkdir()  # something it wrote
        raise after
    return train


@pytest.mark.parametrize("made", [True, False], ids=["new_folder", "existing_empty_folder"])
def test_a_one_line_error_after_the_folder_was_made_removes_what_the_run_made(tmp_path, capsys, made):
    out = tmp_path / "run"
    if not made:
        out.mkdir()
    with pytest.raises(SystemExit) as e:
        harness.main(reinforce.Args, failing_train(out, common.UsageError("the vocabularies differ")),
                     argv=["--out-dir", str(out)])
    assert e.value.code == 2 and capsys.readouterr().err == "error: the vocabularies differ\n"
    assert out.exists() == (not made) and (made or list(out.iterdir()) == [])


def test_a_crash_leaves_its_lock_so_that_a_rerun_replaces_the_leftovers(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        harness.main(reinforce.Args, failing_train(out, RuntimeError("CUDA out of memory")),
                     argv=["--out-dir", str(out)])
    assert (out / "model").is_dir() and (out / harness.LOCK_FILE).is_file()  # what the crash left
    (out / harness.LOCK_FILE).write_text(f"{dead_pid()} {os.uname().nodename}\n")  # as its process ended
    harness.prepare_run_dir(out, overwrite=False)
    assert [p.name for p in out.iterdir()] == [harness.LOCK_FILE]
    harness.release_lock(out)


#####################################################################################################
#####  --resume RUN/checkpoint-N
#####################################################################################################


def fake_run(tmp_path, steps):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time": i}) + "\n" for i in range(7)))
    args = reinforce.Args(save_every=3, out_dir=str(run))
    for s in steps:
        harness.save_checkpoint(run, s, args, {}, {"x": s})
    return run


def test_resume_accepts_the_last_checkpoint_folder_and_refuses_an_earlier_one(tmp_path, capsys):
    run = fake_run(tmp_path, (3, 6))
    args = harness.resume_config(reinforce.Args(resume=str(run / "checkpoint-6")))
    assert args.resume == str(run) and args.out_dir == str(run) and args.save_every == 3
    assert harness.resume_target(run / "checkpoint-6") == (run, run / "checkpoint-6")
    code, err = run_main(reinforce, ["--resume", str(run / "checkpoint-3")], capsys)
    assert code == 2 and len(err) == 1 and "the run went on to checkpoint-6" in err[0], err
    assert f"pass --resume {run} to continue from checkpoint-6" in err[0]
    assert (run / "checkpoint-6").is_dir()


#####################################################################################################
#####  every stop is a clean stop: a real kill of a run in its loop
#####################################################################################################

LONG_RUN = ["--steps", "2000", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-size", "10",
            "--no-pass-at-k", "--log-every", "1"]


def start_run(out, ignore_sigint: bool = False, flags=(), ready=r"step +\d+") -> subprocess.Popen:
    """reinforce.py in a subprocess, returned once a line of stdout matches `ready` (the first
    progress line: it is in its loop). `ignore_sigint`: started as a shell starts `cmd &` from a
    script, with SIGINT ignored."""
    def preexec():
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen([sys.executable, "reinforce.py", *LONG_RUN, *flags, "--out-dir", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    for line in proc.stdout:
        if re.match(ready, line):
            return proc
    raise AssertionError(proc.communicate()[1])


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP"),
                                       (signal.SIGINT, "SIGINT in the background")])
def test_sigterm_sighup_and_a_background_sigint_stop_cleanly(tmp_path, capsys, sig, name):
    out = tmp_path / "run"
    proc = (start_run(out, flags=["--save-every", "2"], ready=r"step 2: checkpoint saved") if sig == signal.SIGTERM
            else start_run(out, ignore_sigint=sig == signal.SIGINT))
    try:
        assert (out / harness.LOCK_FILE).read_text().split()[0] == str(proc.pid)
        if sig == signal.SIGTERM:  # meanwhile, a second run into the folder: one line naming it
            code, err = run_main(reinforce, LONG_RUN + ["--out-dir", str(out), "--overwrite"], capsys)
            assert code == 2 and len(err) == 1 and f"another run is using this folder (PID {proc.pid})" in err[0]
            code, err = run_main(reinforce, ["--resume", str(out)], capsys)
            assert code == 2 and f"(PID {proc.pid})" in err[-1], err
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    by = "" if sig == signal.SIGINT else f" by {signal.Signals(sig).name}"
    where = (rf"resume with --resume {re.escape(str(out))} \(from checkpoint-\d+\)" if sig == signal.SIGTERM
             else r"no checkpoint to resume from \(--save-every N writes them\)")
    assert len(lines) == 1 and re.fullmatch(
        rf"interrupted{by} at step \d+/2000: {re.escape(str(out / 'summary.json'))} written; {where}", lines[0]), stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["step"] == s["last"]["step"] and s["start"]["step"] == 0
    assert s.get("signal") == (None if sig == signal.SIGINT else signal.Signals(sig).name)
    assert not (out / harness.LOCK_FILE).exists()  # released at the stop


def test_nohup_keeps_its_run_going_when_the_terminal_closes():
    """SIGHUP ignored at the start (nohup) stays ignored; SIGTERM is caught; a SIGINT ignored at the
    start (a script's `cmd &`) is caught. The handlers go back as they were after main."""
    old = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        before = harness._catch_stop_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is harness._raise_stopped
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert set(before) == {signal.SIGTERM, signal.SIGINT}
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


#####################################################################################################
#####  the small ones: data files, unknown characters
#####################################################################################################


def test_a_bom_at_the_start_of_a_jsonl_file_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4"}\n')
    assert [r["prompt"] for r in tasks.read_jsonl(path)] == ["1+1=", "2+2="]
    assert tasks.jsonl_line(path, 1) == 3


def test_characters_the_tiny_tokenizer_does_not_know_are_named(capsys):
    import torch
    model, tok = common.load_model("tiny", torch.device("cpu"), trainable=False)
    tasks.check_context(tok, model, ["1+1=", "2+2="], 4)
    assert "warning" not in capsys.readouterr().out
    tasks.check_context(tok, model, ["1+1=", "caf\u00e9+2="], 4)
    said = capsys.readouterr().out.strip()
    assert said.startswith("warning: 1 prompt(s) hold characters that the tokenizer of --model does not know")
    assert "'caf\u00e9+2='" in said and len(said.splitlines()) == 1


def test_dpo_max_length_that_leaves_chosen_and_rejected_equal_is_refused():
    import torch
    _, tok = common.load_model("tiny-pref", torch.device("cpu"), trainable=False)
    pairs = [{"prompt": "the class", "chosen": "was good but the story", "rejected": "was good but the view"}]
    P = len(common.encode_prompts(tok, ["the class"])[0])  # a word-level tokenizer: one token a word
    assert dpo.fit_max_length(tok, pairs, P + 5)[0] == pairs  # story ≠ view: still a pair
    with pytest.raises(common.UsageError, match=rf"--max-length {P + 4} cuts every pair's chosen and rejected"):
        dpo.fit_max_length(tok, pairs, P + 4)


def test_the_eta_follows_the_recent_pace(tmp_path, monkeypatch, capsys):
    """1 s a step for 30 steps, then 3 s a step (the machine got busy): at step 40 of 100 the ETA is
    the pace of the last 20 rows (steps 21..40: 39 s for 19 steps) times the 60 steps left, 2m03s,
    not the whole run's 1.5 s a step (1m30s)."""
    clock = {"t": 1000.0}
    monkeypatch.setattr(harness.time, "time", lambda: clock["t"])
    log = harness.RunLogger(tmp_path, total_steps=100)
    for step in range(41):
        clock["t"] = 1000.0 + (step if step <= 30 else 30 + 3 * (step - 30))
        log.log(step, {"x": 1.0})
    log.close()
    assert capsys.readouterr().out.splitlines()[-1] == "step  40/100 | x 1 | 1m00s, ETA 2m03s"
