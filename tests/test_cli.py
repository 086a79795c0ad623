"""The command line and run plumbing of harness.py: --help, flag values, the learning-rate schedule,
the progress line, the run folder, and bad input that must stop with one line before a model loads.

All in-process and fast: every error here fires before any model is loaded, and the one training
run (reinforce with a 10-row --data file) is one step of the embedded 0.14M-parameter model.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import common
import harness
import dpo
import dqn_maze
import grpo
import ppo
import reinforce
import reward_model

SCRIPTS = (grpo, reinforce, dpo, reward_model, ppo, dqn_maze)


def help_text(cls, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        harness.parse_args(cls, ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


#####################################################################################################
#####  --help
#####################################################################################################


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_shows_each_flag_once_and_no_underscore_alias(script, capsys):
    out = help_text(script.Args, capsys)
    # "--max-new-tokens INT" is shown; "--max_new_tokens" is not (it still works, see below)
    assert not re.search(r"--[a-z0-9-]*_", out), "an underscore alias is shown in --help"
    for name in (f.name for f in __import__("dataclasses").fields(script.Args)):
        flag = "--" + name.replace("_", "-")
        # each flag starts exactly one help entry (argparse indents an entry by two spaces)
        entries = re.findall(rf"^  {re.escape(flag)}(?=[\s,]|$)", out, flags=re.M)
        assert len(entries) == 1, f"{flag}: {len(entries)} help entries"


def test_help_lists_the_choices_of_fixed_set_flags(capsys):
    out = help_text(reinforce.Args, capsys)
    assert "--psi {return,reward-to-go}" in out
    assert "--baseline {none,mean,rloo,value}" in out
    assert "--dtype {auto,float32,bfloat16,float16}" in out
    out = help_text(grpo.Args, capsys)
    assert "--loss-agg {seq-mean,token-mean,constant,none}" in out and "--dtype {auto," in out


def test_underscore_aliases_still_work():
    a = harness.parse_args(grpo.Args, ["--max_new_tokens", "6", "--no-scale_rewards", "--lr_schedule",
                                      "constant"])
    assert (a.max_new_tokens, a.scale_rewards, a.lr_schedule) == (6, False, "constant")


def test_a_fixed_set_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit) as e:
        harness.parse_args(reinforce.Args, ["--psi", "advantage"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --psi: invalid choice: 'advantage'") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        harness.parse_args(grpo.Args, ["--dtype", "fp8"])
    assert "--dtype: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], "error: --lr: expected a number, got 'abc' (see --help)\n"),
    (["--group-size", "two"], "error: --group-size: expected an integer, got 'two' (see --help)\n"),
    (["--steps", "2.5"], "error: --steps: expected an integer, got '2.5' (see --help)\n"),
    (["--micro-batch", "x"], "error: --micro-batch: expected an integer, got 'x' (or none) (see --help)\n"),
    (["--beta", "nan"], "error: --beta: expected a finite number, got 'nan' (see --help)\n"),
    (["--epsilon", "inf"], "error: --epsilon: expected a finite number, got 'inf' (see --help)\n"),
])
def test_a_bad_number_is_one_line_that_names_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        harness.parse_args(grpo.Args, argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == message  # not argparse's "invalid convert value"


def test_an_unexpanded_tilde_is_expanded(monkeypatch, tmp_path):
    # `--out-dir=~/runs/x` reaches the script as is: the shell expands ~ only at the start of a word
    monkeypatch.setenv("HOME", str(tmp_path))
    a = harness.parse_args(grpo.Args, ["--out-dir=~/runs/x", "--data", "~/gsm8k.jsonl", "--model", "~/m"])
    assert (a.out_dir, a.data, a.model) == (f"{tmp_path}/runs/x", f"{tmp_path}/gsm8k.jsonl", f"{tmp_path}/m")
    a = harness.parse_args(ppo.Args, ["--reward-model", "~/rm", "--model", "tiny-pref"])
    assert (a.reward_model, a.model) == (f"{tmp_path}/rm", "tiny-pref")  # names without ~ are untouched


#####################################################################################################
#####  the learning-rate schedule: one helper, the same numbers as the four copies it replaced
#####################################################################################################


def old_grpo_factor(step, warmup, steps, schedule):  # grpo.py and reinforce.py, before harness.lr_factor
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - warmup))


def old_pref_factor(step, warmup, total):  # dpo.py and reward_model.py: always linear
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def old_ppo_factor(step, warmup):  # ppo.py: warm-up, then constant
    return min(1.0, (step + 1) / (warmup + 1))


def test_lr_factor_hand_values():
    # W = 2, N = 5. Warm-up (s + 1)/(W + 1): 1/3, 2/3 at s = 0, 1. Then linear (N − s)/(N − W):
    # s = 2: 3/3, s = 3: 2/3, s = 4: 1/3 (0 would be at s = 5, after the last step); constant: 1.
    got = [harness.lr_factor(s, 2, 5, "linear") for s in range(5)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3], abs=1e-15)
    got = [harness.lr_factor(s, 2, 5, "constant") for s in range(5)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1, 1, 1], abs=1e-15)
    assert [harness.lr_factor(s, 0, 4) for s in range(4)] == [1, 3 / 4, 2 / 4, 1 / 4]  # no warm-up
    with pytest.raises(ValueError):
        harness.lr_factor(3, 2, 5, "cosine")


@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 7), (3, 10), (10, 10), (20, 5), (5, 150)])
def test_lr_scheduler_matches_the_copies_it_replaced(warmup, total):
    def lrs(factor_fn, new_sched):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=0.3)
        sched = new_sched(opt) if new_sched else torch.optim.lr_scheduler.LambdaLR(opt, factor_fn)
        out = []
        for _ in range(total + 2):  # a little past the end too
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    for schedule in ("linear", "constant"):
        assert lrs(None, lambda o: harness.lr_scheduler(o, warmup, total, schedule)) == \
            lrs(lambda s: old_grpo_factor(s, warmup, total, schedule), None)
    assert lrs(None, lambda o: harness.lr_scheduler(o, warmup, total, "linear")) == \
        lrs(lambda s: old_pref_factor(s, warmup, total), None)
    assert lrs(None, lambda o: harness.lr_scheduler(o, warmup, total, "constant")) == \
        lrs(lambda s: old_ppo_factor(s, warmup), None)


#####################################################################################################
#####  progress: full metric names, step i/N, elapsed time and ETA
#####################################################################################################


def test_progress_line_has_full_names_and_an_eta(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 100.0, 110.0, 130.0])  # the clock at construction, step 0, step 2, step 3
    monkeypatch.setattr(harness.time, "time", lambda: next(clock))
    log = harness.RunLogger(tmp_path, total_steps=4)
    log.log(0, {"eval/accuracy": 0.25})
    log.log(2, {"reward/mean": 0.5, "kl/ref": 0.01, "loss/policy": 1.0}, keys=["reward/mean", "kl/ref"])
    log.log(3, {"reward/mean": 0.5}, keys=[])  # written, not printed (and the clock is not read twice)
    log.close()
    lines = capsys.readouterr().out.splitlines()
    # step 0 at t = 0 s; step 2 at t = 10 s: 5 s a step, 2 steps left -> ETA 10 s. Step 3 at t = 30.
    assert lines == ["step 0/4 | eval/accuracy 0.25 | 0s",
                     "step 2/4 | reward/mean 0.5 | kl/ref 0.01 | 10s, ETA 10s"]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3] and rows[2]["time"] == 30.0


def test_fmt_seconds():
    assert [harness._fmt_seconds(t) for t in (0, 42.4, 59.6, 190, 3599, 3600, 7500)] == \
        ["0s", "42s", "1m00s", "3m10s", "59m59s", "1h00m", "2h05m"]


#####################################################################################################
#####  bad input: one line, exit code 2, and nothing left on disk
#####################################################################################################


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_a_seed_numpy_cannot_take_is_a_usage_error(seed):
    with pytest.raises(common.UsageError, match=r"^--seed must be in \[0, 2\^32 − 1\]"):
        harness.seed_everything(seed)
    harness.seed_everything(2 ** 32 - 1)  # the largest that works


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_seed_minus_one_is_one_line_and_leaves_no_folder(script, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        harness.main(script.Args, script.train, argv=["--seed", "-1", "--out-dir", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --seed must be in [0, 2^32 − 1] (got -1)\n"
    assert not out.exists()


@pytest.mark.parametrize("script", (grpo, reinforce, dpo, reward_model, ppo), ids=lambda m: m.__name__)
@pytest.mark.parametrize("bad", ["folder", "missing", "broken"])
def test_bad_data_leaves_no_run_folder(script, bad, tmp_path):
    data = tmp_path / "data"
    if bad == "folder":
        data.mkdir()
    elif bad == "broken":
        data.write_text('{"prompt": "1+1=", \n')
    out = tmp_path / "run"
    expected = {"folder": "is a folder, not a JSONL file", "missing": "no such file",
                "broken": "not valid JSON"}[bad]
    with pytest.raises(common.UsageError, match=expected):
        script.train(script.Args(data=str(data), out_dir=str(out)))
    assert not out.exists(), "a data error left a run folder behind"


def test_reinforce_with_fewer_rows_than_prompts_per_step(tmp_path):
    # 10 rows: load_task holds out a fifth (2), so 8 train rows for 16 prompts per step; like grpo.py,
    # the step then draws its prompts with replacement instead of failing in numpy
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(10)))
    s = reinforce.train(reinforce.Args(data=str(data), steps=1, prompts_per_step=16, samples_per_prompt=2,
                                       eval_size=2, pass_at_k=False, grad_var=False, save_model=False,
                                       out_dir=str(tmp_path / "run")))
    assert s["completions"] == 32


#####################################################################################################
#####  --overwrite: removes the earlier run's outputs, and nothing that a run did not write
#####################################################################################################


def fill_with_a_run(out):
    out.mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json", "q_network.pt"):
        (out / name).write_text("x")
    for name in ("model", "value_model", "reward_model/model"):
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text("{}")


def test_overwrite_removes_every_output_of_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    fill_with_a_run(out)
    with pytest.raises(common.UsageError, match="already holds a run; pass --overwrite"):
        harness.prepare_run_dir(out, overwrite=False)
    assert len(list(out.iterdir())) == 6  # refused: nothing removed
    assert harness.prepare_run_dir(out, overwrite=True) == out
    # no stale model/ next to the new run's metrics: only the new run's lock
    assert [p.name for p in out.iterdir()] == [harness.LOCK_FILE]
    harness.release_lock(out)
    said = capsys.readouterr().out
    assert said.startswith("--overwrite: removed the earlier run's ") and "value_model/" in said


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_other_files_is_refused_and_kept(tmp_path, overwrite):
    out = tmp_path / "run"
    fill_with_a_run(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(common.UsageError, match=r"holds files that no run writes \(notes.txt\)"):
        harness.prepare_run_dir(out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model" / "config.json").is_file()


def test_an_empty_or_new_folder_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    assert harness.prepare_run_dir(tmp_path / "empty", overwrite=False).is_dir()
    assert harness.prepare_run_dir(tmp_path / "a" / "b", overwrite=False).is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UsageError, match="exists and is not a folder"):
        harness.prepare_run_dir(tmp_path / "file", overwrite=True)
