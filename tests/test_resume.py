"""--save-every N, --resume RUN_DIR and Ctrl-C, end to end on the CPU.

For each script, three runs of the same flags and seed (6 steps, tiny evaluations):
  A   uninterrupted, no checkpoints (in-process);
  B   --save-every 3, stopped by a real SIGINT once step 4 is logged (a subprocess; the test hook
      harness.SIGINT_HOOK sends the signal, so the stop is at a known step): exit code 130, one
      line, summary.json with "interrupted": true, and checkpoint-3/ in the folder;
  B'  `--resume B` (in-process, through harness.main as the command line goes): drops B's row of
      step 4, takes steps 4..6 again from checkpoint-3 and appends them.
B' must end with A's metrics.jsonl rows and summary figures, exactly (float tolerance 0), and the
same final weights, byte for byte: what a checkpoint holds is all that the steps after it need.
A Ctrl-C from outside (SIGINT after the first progress line) is tested on its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
import harness
import dpo
import grpo
import ppo
import reinforce
import reward_model

ROOT = common.MODELS_DIR.parent
# float16: a step whose gradients overflowed is skipped (GradScaler), and torch then warns that the
# scheduler stepped without the optimiser; that is the intended behaviour of MixedPrecision
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
STEPS = ["--steps", "6"]  # dpo.py and reward_model.py count --max-steps
# script: (module, flags); each keeps its own state busy: reinforce's value head and float16's loss
# scale (GradScaler: on the CPU it backs off from 2¹⁶ in these steps), grpo's rounds of dynamic
# sampling (their draws and counts), ppo's β, β_pen and ptx
CASES = {
    "reinforce": (reinforce, STEPS + ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-every", "3",
                                      "--eval-size", "20", "--baseline", "value", "--dtype", "float16"]),
    "grpo": (grpo, STEPS + ["--prompts-per-step", "2", "--group-size", "2", "--eval-every", "3", "--eval-size", "20",
                            "--dynamic-sampling", "--max-sample-rounds", "2", "--mu", "2"]),
    "ppo": (ppo, STEPS + ["--batch-size", "8", "--mini-batches", "2", "--ppo-epochs", "1", "--eval-samples", "16",
                          "--eval-every", "3", "--policy-loss", "kl-penalty", "--kl-control", "adaptive",
                          "--ptx-coef", "0.1"]),
    "dpo": (dpo, ["--max-steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-size", "40",
                  "--eval-samples", "16"]),
    "reward_model": (reward_model, ["--max-steps", "6", "--batch-size", "4", "--eval-every", "3",
                                    "--eval-size", "40", "--norm-samples", "16"]),
}
TIMING = re.compile(r"^time($|/)|seconds|per_second")  # clock figures: never equal between two runs
SUMMARY_PATHS = {"config", "model_dir"}  # hold the run folder's name


def interrupted_run(script: str, argv: list[str], out, at_step: int) -> subprocess.CompletedProcess:
    env = {**os.environ, harness.SIGINT_HOOK: str(at_step), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, f"{script}.py", *argv, "--out-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{script: {"A": folder, "B": folder, "B_result": CompletedProcess, "B_summary": dict,
    "B_rows": [...]}}: the B subprocesses run while the A runs go in-process (one torch thread,
    as in the subprocesses, so that both compute the same floats)."""
    base = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=2)
    b_jobs = {name: pool.submit(interrupted_run, name, argv + ["--save-every", "3"], base / f"{name}_B", 4)
              for name, (_, argv) in CASES.items()}
    out = {}
    try:
        for name, (module, argv) in CASES.items():
            module.train(harness.parse_args(module.Args, argv + ["--out-dir", str(base / f"{name}_A")]))
        for name, (module, argv) in CASES.items():
            b = base / f"{name}_B"
            result = b_jobs[name].result()
            summary = json.loads((b / "summary.json").read_text()) if (b / "summary.json").is_file() else None
            rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
            # the resumed run, as typed: its flags come from the checkpoint; --log-every may change
            harness.main(module.Args, module.train, argv=["--resume", str(b), "--log-every", "2"])
            out[name] = {"A": base / f"{name}_A", "B": b, "B_result": result, "B_summary": summary, "B_rows": rows}
    finally:
        torch.set_num_threads(threads)
        pool.shutdown(wait=True)
    return out


def rows_without_clocks(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not TIMING.search(k)} for r in rows]


@pytest.mark.parametrize("name", list(CASES))
def test_sigint_after_step_4_writes_an_interrupted_summary_and_keeps_checkpoint_3(runs, name):
    r = runs[name]
    result = r["B_result"]
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"interrupted at step 4/6: {r['B'] / 'summary.json'} written; resume with "
                         f"--resume {r['B']} (from checkpoint-3)"), result.stderr
    s = r["B_summary"]
    assert s["interrupted"] is True and s["step"] == 4 and s["steps"] == 6 and s["checkpoint"] == "checkpoint-3"
    assert s["script"] == name and s["start"]["step"] == 0 and s["last_eval"]["step"] == 3
    assert s["last"]["step"] == 4 and s["config"]["save_every"] == 3
    assert [row["step"] for row in r["B_rows"]] == [0, 1, 2, 3, 4]  # step 4 was logged, then stopped
    # only checkpoint-6 joined it on resume (checkpoint-3 is kept: no --save-total-limit)
    assert sorted(p.name for p in r["B"].glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    ckpt = r["B"] / "checkpoint-3"
    assert (ckpt / "model" / "config.json").is_file() and (ckpt / "state.pt").is_file()
    info = json.loads((ckpt / "checkpoint.json").read_text())
    assert info["step"] == 3 and info["config"] == s["config"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpt / "model")  # the policy (or the reward model's LM) loads
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3
    if "--dtype" in CASES[name][1]:  # float16: the loss scale has moved, so restoring it matters
        assert state["scaler"]["scale"] < 2.0 ** 16


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_ends_with_the_uninterrupted_metrics_and_weights(runs, name):
    a, b = runs[name]["A"], runs[name]["B"]
    rows_a, rows_b = rows_without_clocks(a), rows_without_clocks(b)
    assert [row["step"] for row in rows_b] == list(range(7))  # step 4's first row dropped, written once
    assert rows_b == rows_a  # exactly, every figure of every step
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert "interrupted" not in sb
    strip = lambda s: {k: v for k, v in s.items() if not TIMING.search(k) and k not in SUMMARY_PATHS}  # noqa: E731
    assert strip(sb) == strip(sa)
    config_b = {**sb["config"], "out_dir": None, "resume": None, "save_every": 0, "log_every": sa["config"]["log_every"]}
    assert config_b == {**sa["config"], "out_dir": None}
    assert sb["config"]["resume"] == str(b) and sb["config"]["log_every"] == 2  # the one flag that changed
    weights = sorted(p.relative_to(a) for p in a.glob("*/*.safetensors"))  # model/, value_model/, the RM head
    assert weights and all((b / w).read_bytes() == (a / w).read_bytes() for w in weights)


#####################################################################################################
#####  Ctrl-C from outside, after the first progress line
#####################################################################################################


@pytest.mark.parametrize("script, argv", [
    ("reinforce", ["--steps", "2000", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-size", "10",
                   "--no-pass-at-k", "--log-every", "1"]),
    ("dqn_maze", ["--tabular-steps", "200000", "--eval-every", "100", "--log-lines", "2000"]),
])
def test_ctrl_c_writes_summary_and_exits_130(tmp_path, script, argv):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, f"{script}.py", *argv, "--out-dir", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the first progress line: the run is in its loop
            if re.match(r"step +\d+", line):
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(
        rf"interrupted at step \d+(/\d+)?: {re.escape(str(out / 'summary.json'))} written; no checkpoint to "
        r"resume from \(--save-every N writes them\)", lines[0]), stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["checkpoint"] is None and s["script"] == script
    assert s["step"] == s["last"]["step"] and s["start"]["step"] == 0 and s["config"]["out_dir"] == str(out)
    assert not list(out.glob("checkpoint-*"))


#####################################################################################################
#####  the plumbing: bad --resume, the flags rule, the RNG states, --save-total-limit, --overwrite
#####################################################################################################


def fake_run(tmp_path, steps=(3,), config=None):
    """A run folder with metrics rows 0..5 and checkpoints at `steps` of a small module."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time": i}) + "\n" for i in range(6)))
    args = reinforce.Args(**(config or {}), save_every=3, out_dir=str(run))
    for s in steps:
        harness.save_checkpoint(run, s, args, {"head": torch.nn.Linear(2, 1)}, {"x": s})
    return run


def one_line(capsys, argv, module=reinforce) -> str:
    with pytest.raises(SystemExit) as e:
        harness.main(module.Args, module.train, argv=argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_resume_refuses_a_folder_that_is_no_run_or_has_no_checkpoint(tmp_path, capsys):
    assert "no such folder" in one_line(capsys, ["--resume", str(tmp_path / "nothing")])
    assert "not a run folder" in one_line(capsys, ["--resume", str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "checkpoint-3.tmp").mkdir()  # a checkpoint cut short counts as none
    assert "no checkpoint-<step>/ to resume from" in one_line(capsys, ["--resume", str(tmp_path)])


def test_resume_takes_the_saved_config_and_refuses_a_differing_flag(tmp_path, capsys):
    run = fake_run(tmp_path, config={"lr": 1e-3})
    args = harness.resume_config(reinforce.Args(resume=str(run), log_every=7))
    assert args.lr == 1e-3 and args.log_every == 7 and args.out_dir == str(run) and args.save_every == 3
    # the saved value given again, or a flag left out: accepted (tested above); another value: refused
    assert harness.resume_config(reinforce.Args(resume=str(run), lr=1e-3)).lr == 1e-3
    err = one_line(capsys, ["--resume", str(run), "--lr", "2e-3"])
    assert err.startswith("error: --lr 0.002: the run in") and "--lr 0.001" in err
    # given with its default value, which differs from the run's: refused too (main sees the flag)
    assert one_line(capsys, ["--resume", str(run), "--lr", "3e-4"]).startswith("error: --lr 0.0003")
    assert "--out-dir" in one_line(capsys, ["--resume", str(run), "--out-dir", str(tmp_path / "other")])
    assert "another script" in one_line(capsys, ["--resume", str(run)], module=ppo)


def test_truncate_metrics_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    run = fake_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "ti')  # a line cut short by the stop
    harness.truncate_metrics(run, 3)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_rng_states_read_back_from_a_checkpoint_replay_the_same_numbers(tmp_path):
    import random

    import numpy as np
    args = reinforce.Args(save_every=1)
    harness.seed_everything(5)
    gen = np.random.default_rng(9)  # a script's own generator (data order)
    harness.save_checkpoint(tmp_path, 1, args, {}, {"rng": harness.rng_state(), "gen": gen.bit_generator.state})

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(())), float(gen.random())
    expect = draws()
    harness.seed_everything(6)  # move every generator elsewhere
    gen = np.random.default_rng(0)
    ckpt = harness.load_checkpoint(tmp_path / "checkpoint-1")  # torch.load(weights_only=True) reads it all
    harness.set_rng_state(ckpt.state["rng"])
    gen.bit_generator.state = ckpt.state["gen"]
    assert ckpt.step == 1 and draws() == expect


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    args = reinforce.Args(save_every=1, save_total_limit=2)
    for step in (1, 2, 3):
        harness.save_checkpoint(tmp_path, step, args, {"head": torch.nn.Linear(2, 1)}, {})
    assert [p.name for p in harness.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == ["checkpoint.json", "head.pt", "state.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_overwrite_removes_checkpoints_and_the_value_head(tmp_path):
    run = fake_run(tmp_path, steps=(3, 6))
    (run / "value_head.pt").write_bytes(b"")
    (run / "checkpoint-9.tmp").mkdir()
    harness.prepare_run_dir(run, overwrite=True)
    assert [p.name for p in run.iterdir()] == [harness.LOCK_FILE]  # only the new run's lock
    harness.release_lock(run)


@pytest.mark.parametrize("module", [m for m, _ in CASES.values()], ids=lambda m: m.__name__)
def test_help_names_the_trl_flags(module, capsys):
    with pytest.raises(SystemExit):
        harness.parse_args(module.Args, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(TRL: save_steps)" in out and "(TRL: resume_from_checkpoint)" in out and "(TRL: save_total_limit)" in out
