"""Benchmark of grpo.py's GRPO family, run by hand (not in CI): GRPO against GSPO, CISPO, DAPO's
dynamic sampling and overlong shaping, and the k1/k2/k3 KL terms, from the shipped `models/tiny`.

    bench/.venv/bin/python bench/bench_grpo_family.py                    # every arm, 3 seeds, 400 steps
    bench/.venv/bin/python bench/bench_grpo_family.py --only grpo gspo-mu2 --seeds 1
    bench/.venv/bin/python bench/bench_grpo_family.py --plot-only        # redraw from the JSON
    bench/.venv/bin/python bench/bench_grpo_family.py --task long-addition   # the family on long sums (LONG_ARMS)

Each arm is `python grpo.py --steps N --seed S --beta 0` plus its flags, at equal steps (β = 0
but in the KL arms, which give --beta 0.04). Every variant has
a control that differs from it by that one switch:
- dynamic sampling and the default GRPO (μ = 1);
- overlong shaping against GRPO with the same --max-new-tokens 6 (at 4 the buffer would punish
  right 3-digit answers, whose 4th token is EOS);
- GSPO and CISPO against GRPO at μ = 2: at μ = 1 every ratio is exactly 1, and both give GRPO's
  update (tests/test_grpo_family.py proves this); CISPO twice, with its default cap on the weight
  (1 + 4 = 5, TRL's recommendation) and with a cap of 1.28 (1 + DAPO's clip-higher 0.28);
- the k2 and k1 KL terms against the k3 term at β = 0.04.

Reported per arm, as the mean and the spread over seeds: held-out greedy accuracy (start, final),
wall time of the process, completions generated, clip fraction, completion length, and the k3
KL to π_ref. Results: bench/results/grpo_family.json (one row per run, written after every run, so
an interrupted benchmark keeps what it finished, and a rerun skips the runs it already has), a
markdown table on stdout and in bench/results/grpo_family.md, and bench/results/grpo_family.png.

With --task long-addition (LONG_ARMS, results in grpo_family_long.*), each run also reports, from
its held-out evaluations: the greedy answers' length and share worked out, the best accuracy and
the largest fall below the best so far (stability), the wrong completions' length (Dr. GRPO), the
share cut off at the token limit, and accuracy at the completions its control generated in all
its steps (dynamic sampling at equal generations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# arm: (grpo.py flags, the control it is compared with)
ARMS = {
    "grpo": ([], None),
    "dynamic-sampling": (["--dynamic-sampling"], "grpo"),
    "grpo-mnt6": (["--max-new-tokens", "6"], None),
    "overlong": (["--max-new-tokens", "6", "--overlong-buffer", "2"], "grpo-mnt6"),
    "grpo-mu2": (["--mu", "2"], None),
    "gspo-mu2": (["--mu", "2", "--ratio", "sequence"], "grpo-mu2"),
    "cispo-mu2": (["--mu", "2", "--policy-loss", "cispo"], "grpo-mu2"),
    # measured when CISPO's default aggregation was seq-mean (now token-mean, as cispo-mu2 runs)
    "cispo-mu2-eh0.28": (["--mu", "2", "--policy-loss", "cispo", "--cispo-epsilon-high", "0.28",
                          "--loss-agg", "seq-mean"], "grpo-mu2"),
    "beta-k3": (["--beta", "0.04"], None),
    "beta-k2": (["--beta", "0.04", "--kl-estimator", "k2"], "beta-k3"),
    "beta-k1": (["--beta", "0.04", "--kl-estimator", "k1"], "beta-k3"),
}

# The same family on the long-addition task (`--task long-addition`, models/tiny-long), whose
# completions are 4 tokens answered directly or 23-31 worked out column by column: every arm runs at
# the task's measured recipe (--lr 1e-4, β = 0, 40 new tokens; at the default 3e-4 accuracy
# collapses) plus its one switch. Dr. GRPO = the constant normaliser and no std scaling; the
# overlong pair at 32 new tokens (the task allows no fewer than its longest worked answer, 31 with
# EOS) with a buffer of 4: the penalty starts at 29 tokens, where the worked answers of sums with
# two or three carries are (29-31 tokens), so the shaping taxes right answers that need the length.
LONG_BASE = ["--task", "long-addition", "--model", "models/tiny-long", "--max-new-tokens", "40", "--lr", "1e-4",
             "--eval-every", "25", "--no-pass-at-k"]
LONG_ARMS = {
    "grpo": ([], None),
    "token-mean": (["--loss-agg", "token-mean"], "grpo"),
    "dr-grpo": (["--loss-agg", "constant", "--no-scale-rewards"], "grpo"),
    "dynamic-sampling": (["--dynamic-sampling"], "grpo"),
    "grpo-mnt32": (["--max-new-tokens", "32"], None),
    "overlong": (["--max-new-tokens", "32", "--overlong-buffer", "4"], "grpo-mnt32"),
    "grpo-mu4": (["--mu", "4"], None),
    "gspo-mu4": (["--mu", "4", "--ratio", "sequence"], "grpo-mu4"),
    "cispo-mu4": (["--mu", "4", "--policy-loss", "cispo"], "grpo-mu4"),
    # grpo.py's own defaults, one at a time: its β = 0.04, and its lr 3e-4 (tuned on 4-token answers)
    "beta0.04": (["--beta", "0.04"], "grpo"),
    "lr3e-4": (["--lr", "3e-4"], "grpo"),
}
TASKS = {"arith": ([], ARMS, "grpo_family"), "long-addition": (LONG_BASE, LONG_ARMS, "grpo_family_long")}


def run(arm: str, seed: int, steps: int, out_root: Path, task: str = "arith") -> dict:
    base, arms, _ = TASKS[task]
    flags = [*base, *arms[arm][0]]
    out = out_root / f"{arm}__s{seed}"
    # β = 0 unless the arm sets it (the KL arms' --beta 0.04 comes later and wins): the arms were
    # measured when grpo.py's default was β = 0, and compare one switch each at that β
    cmd = [sys.executable, "grpo.py", "--steps", str(steps), "--seed", str(seed), "--out-dir", str(out),
           "--overwrite", "--no-save-model", "--beta", "0", *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # threads: the harness's default (1 for tiny)
    load, t0 = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["step"] >= 1]
    gen = np.cumsum([r["sampling/generations"] for r in train])  # completions generated by each step
    curve = [(r["step"], int(gen[r["step"] - 1]) if r["step"] else 0, r["eval/accuracy"])
             for r in rows if "eval/accuracy" in r]
    last = train[-100:]
    out = {
        "arm": arm, "seed": seed, "steps": steps,
        "command": "python grpo.py " + " ".join(["--steps", str(steps), "--seed", str(seed), *flags]),
        "start_accuracy": s["start_accuracy"], "final_accuracy": s["final_accuracy"],
        "final_pass_at_1": (s["final_pass_at_k"] or {}).get("pass_at_1"),
        "process_wall_seconds": round(wall, 1), "train_seconds": s["train_seconds"],
        "load_at_start": round(load, 2), "load_at_end": round(os.getloadavg()[0], 2),
        "completions": s["completions"], "capped_steps": s["sample_rounds_capped_steps"],
        "clip_frac_mean": float(np.mean([r["policy/clip_frac"] for r in train])),
        "clip_frac_last100": float(np.mean([r["policy/clip_frac"] for r in last])),
        "length_mean": float(np.mean([r["completions/mean_length"] for r in train])),
        "length_last100": float(np.mean([r["completions/mean_length"] for r in last])),
        "no_eos_last100": float(np.mean([r["completions/no_eos_frac"] for r in last])),
        "kl_ref_last100": float(np.mean([r["kl/ref"] for r in last])),
        "frac_zero_std_last100": float(np.mean([r["reward/frac_zero_std_groups"] for r in last])),
        "curve": curve,  # (step, completions generated so far, held-out accuracy)
        **curves(train),
    }
    if "eval/worked_frac" in rows[0]:  # the long-addition task's figures
        evals = [r for r in rows if "eval/accuracy" in r]
        accs = [r["eval/accuracy"] for r in evals]
        out.update({
            # held-out greedy answers per evaluation: (step, mean length, share worked out)
            "format_curve": [(r["step"], r["eval/mean_length"], r["eval/worked_frac"]) for r in evals],
            "final_length": evals[-1]["eval/mean_length"], "final_worked_frac": evals[-1]["eval/worked_frac"],
            "len_incorrect_last100": nanmean([r["completions/len_incorrect"] for r in last]),
            "len_correct_last100": nanmean([r["completions/len_correct"] for r in last]),
            "no_eos_mean": float(np.mean([r["completions/no_eos_frac"] for r in train])),
            "best_accuracy": max(accs),
            # the largest fall of held-out accuracy below its best so far: instability
            "max_drop": float(max(np.maximum.accumulate(accs) - np.array(accs))),
        })
    return out


def nanmean(xs) -> float | None:
    """Mean of the numbers that are not None or NaN (a step with no wrong completion logs NaN)."""
    xs = [x for x in xs if x is not None and x == x]
    return float(np.mean(xs)) if xs else None


def curves(train: list[dict]) -> dict:
    """20-step means of the per-step metrics that the plot draws."""
    def c(key):
        return [nanmean([r.get(key) for r in train[i:i + 20]]) for i in range(0, len(train), 20)]
    return {"clip_curve": c("policy/clip_frac"), "length_curve": c("completions/mean_length"),
            "penalty_curve": c("reward/overlong_penalty"), "kl_curve": c("kl/ref"),
            "reward_curve": c("reward/mean"), "len_incorrect_curve": c("completions/len_incorrect"),
            "no_eos_curve": c("completions/no_eos_frac")}


def accuracy_at(curve: list, generations: float) -> float:
    """Held-out accuracy after `generations` completions, linear between evaluations: how an arm
    that samples more per step (dynamic sampling) compares at equal generations."""
    gen = [c[1] for c in curve]
    return float(np.interp(generations, gen, [c[2] for c in curve]))


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0) if xs else (None, None)


LONG_KEYS = ("final_length", "final_worked_frac", "len_incorrect_last100", "len_correct_last100",
             "no_eos_last100", "no_eos_mean", "best_accuracy", "max_drop", "accuracy_at_control_generations")


def per_arm(runs: list[dict], arms: dict = ARMS) -> list[dict]:
    out = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        control = arms[arm][1]
        row = {"arm": arm, "control": control, "flags": " ".join(arms[arm][0]),
               "seeds": [r["seed"] for r in rs]}
        if "format_curve" in rs[0]:
            # equal generations: this arm's accuracy when it had generated what its control (same seed)
            # generated in all its steps; the arm's own final accuracy where it generated no more
            for r in rs:
                c = [x for x in runs if x["arm"] == control and x["seed"] == r["seed"]] if control else []
                r["accuracy_at_control_generations"] = (
                    accuracy_at(r["curve"], c[0]["curve"][-1][1]) if c else None)
        for k in ("start_accuracy", "final_accuracy", "final_pass_at_1", "process_wall_seconds",
                  "completions", "clip_frac_mean", "length_mean", "length_last100", "kl_ref_last100",
                  "frac_zero_std_last100", "capped_steps", *(LONG_KEYS if "format_curve" in rs[0] else ())):
            row[k] = mean_sd([r[k] for r in rs])
        out.append(row)
    return out


def fmt(ms, d=3) -> str:
    return "—" if ms is None or ms[0] is None else f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"


def table(arms: list[dict]) -> str:
    f = fmt
    if arms and "final_length" in arms[0]:
        return long_table(arms)
    lines = ["| arm | flags (vs control) | final acc. | wall (s) | completions | clip frac. | "
             "length (last 100) | k3 KL (last 100) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in arms:
        vs = f" (vs {a['control']})" if a["control"] else ""
        lines.append(f"| {a['arm']} | `{a['flags'] or '(defaults)'}`{vs} | {f(a['final_accuracy'])} | "
                     f"{f(a['process_wall_seconds'], 0)} | {f(a['completions'], 0)} | "
                     f"{f(a['clip_frac_mean'], 4)} | {f(a['length_last100'], 2)} | {f(a['kl_ref_last100'], 4)} |")
    return "\n".join(lines)


def long_table(arms: list[dict]) -> str:
    f = fmt
    lines = ["| arm | flags (vs control) | final acc. | acc. at control's generations | best acc. | "
             "largest fall | greedy length | worked share | wrong length (last 100) | "
             "cut off (last 100) | clip frac. | completions | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in arms:
        vs = f" (vs {a['control']})" if a["control"] else ""
        lines.append(f"| {a['arm']} | `{a['flags'] or '(task recipe)'}`{vs} | {f(a['final_accuracy'])} | "
                     f"{f(a['accuracy_at_control_generations'])} | {f(a['best_accuracy'])} | {f(a['max_drop'])} | "
                     f"{f(a['final_length'], 1)} | {f(a['final_worked_frac'], 2)} | "
                     f"{f(a['len_incorrect_last100'], 1)} | {f(a['no_eos_last100'], 3)} | "
                     f"{f(a['clip_frac_mean'], 4)} | {f(a['completions'], 0)} | {f(a['process_wall_seconds'], 0)} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot (headless), or None with one line when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot (run with bench/.venv/bin/python)")
        return None
    return plt


def accuracy_band(ax, rs: list[dict], arm: str):
    """An arm's held-out accuracy over steps: the mean over its seeds, and a band from min to max."""
    steps = [c[0] for c in rs[0]["curve"]]
    acc = np.array([[c[2] for c in r["curve"]] for r in rs])  # [seeds, evals]
    line, = ax.plot(steps, acc.mean(0), marker="o", ms=3, label=f"{arm} ({len(rs)} seeds)")
    ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
    return line


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    runs = result["runs"]
    groups = [("μ = 1", ["grpo", "dynamic-sampling"]), ("max 6 tokens", ["grpo-mnt6", "overlong"]),
              ("μ = 2", ["grpo-mu2", "gspo-mu2", "cispo-mu2", "cispo-mu2-eh0.28"]), ("β = 0.04", ["beta-k3", "beta-k2", "beta-k1"])]
    bottom = [None, ("length_curve", "length (EOS incl.)"), ("clip_curve", "clip fraction"),
              ("kl_curve", "k3 KL to π_ref")]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for col, (title, arms) in enumerate(groups):
        for arm in arms:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            line = accuracy_band(axes[0, col], rs, arm)
            if col == 0:  # dynamic sampling: the same curves against completions generated
                for r in rs:
                    axes[1, 0].plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]],
                                    color=line.get_color(), lw=0.8)
            else:
                y = np.array([r[bottom[col][0]] for r in rs]).mean(0)
                axes[1, col].plot(np.arange(len(y)) * 20, y, color=line.get_color(), label=arm)
        axes[0, col].set_title(f"held-out greedy accuracy, {title}")
        axes[0, col].set_xlabel("step")
        axes[0, col].legend(fontsize=8)
        axes[0, col].set_ylim(0.4, 1.0)
        if col:
            axes[1, col].set_title(f"{bottom[col][1]}, 20-step means, {title}", fontsize=10)
            axes[1, col].set_xlabel("step")
            axes[1, col].legend(fontsize=8)
    axes[1, 0].set_title("accuracy vs completions generated, μ = 1", fontsize=10)
    axes[1, 0].set_xlabel("completions generated")
    axes[1, 0].set_ylim(0.4, 1.0)
    fig.suptitle(f"grpo.py family on models/tiny, {result['steps']} steps each "
                 f"(mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def plot_long(result: dict, path: Path) -> None:
    """The long-addition family: held-out accuracy (top) and one figure per pair (bottom), mean
    over seeds, band = min..max."""
    plt = pyplot()
    if plt is None:
        return
    runs = result["runs"]
    groups = [("loss normaliser", ["grpo", "token-mean", "dr-grpo"], "len_incorrect_curve",
               "wrong completions' length"),
              ("dynamic sampling", ["grpo", "dynamic-sampling"], None, "accuracy vs completions generated"),
              ("32 new tokens", ["grpo-mnt32", "overlong"], "penalty_curve", "overlong penalty (mean over samples)"),
              ("μ = 4", ["grpo-mu4", "gspo-mu4", "cispo-mu4"], "clip_curve", "clip fraction"),
              ("grpo.py's defaults", ["grpo", "beta0.04", "lr3e-4"], "length_curve", "sampled length")]
    fig, axes = plt.subplots(2, 5, figsize=(23, 8))
    for col, (title, arms, key, label) in enumerate(groups):
        for arm in arms:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            line = accuracy_band(axes[0, col], rs, arm)
            if key is None:
                for r in rs:
                    axes[1, col].plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]],
                                      color=line.get_color(), lw=0.8)
            else:
                y = np.array([[np.nan if v is None else v for v in r[key]] for r in rs])
                axes[1, col].plot(np.arange(y.shape[1]) * 20, np.nanmean(y, 0), color=line.get_color(), label=arm)
        axes[0, col].set_title(f"held-out greedy accuracy, {title}")
        axes[0, col].set_xlabel("step")
        axes[0, col].legend(fontsize=8)
        axes[0, col].set_ylim(0.0, 1.0)
        axes[1, col].set_title(f"{label}" + ("" if key is None else ", 20-step means"), fontsize=10)
        axes[1, col].set_xlabel("completions generated" if key is None else "step")
        if key is not None:
            axes[1, col].legend(fontsize=8)
    fig.suptitle(f"grpo.py family on --task long-addition (models/tiny-long, lr 1e-4, β = 0), "
                 f"{result['steps']} steps each (mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=list(TASKS), default="arith",
                    help="arith: models/tiny's sums (ARMS); long-addition: models/tiny-long (LONG_ARMS)")
    ap.add_argument("--only", nargs="*", help="arms to run (default: all of the task's)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=400, help="steps of every arm (grpo.py's default is 2000; "
                    "the default run passes 0.9 before step 200)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and plot from the JSON")
    a = ap.parse_args()
    _, arms, name = TASKS[a.task]
    bad = [arm for arm in a.only or [] if arm not in arms]
    if bad:
        ap.error(f"--only: {', '.join(bad)} not among the {a.task} arms ({', '.join(arms)})")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("steps") != a.steps:
        result = {"steps": a.steps, "runs": []}
    result.update({"machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.executable,
                   "task": a.task})
    if not a.plot_only:
        have = {(r["arm"], r["seed"]) for r in result["runs"]}
        todo = [(arm, s) for s in a.seeds for arm in (a.only or list(arms)) if (arm, s) not in have]
        out_root = Path(tempfile.mkdtemp(prefix="bench_grpo_family_"))
        lock = threading.Lock()
        result.setdefault("started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))

        def one(job):
            row = run(*job, a.steps, out_root, a.task)
            with lock:
                result["runs"].append(row)
                result["runs"].sort(key=lambda r: (list(arms).index(r["arm"]), r["seed"]))
                result["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                path.write_text(json.dumps(result, indent=1))
                print(f"{row['arm']:17} seed {row['seed']}: {row['start_accuracy']:.3f} -> "
                      f"{row['final_accuracy']:.3f}  wall {row['process_wall_seconds']:6.1f}s  "
                      f"completions {row['completions']}  clip {row['clip_frac_mean']:.4f}  "
                      f"load {row['load_at_start']}..{row['load_at_end']}", flush=True)

        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            list(pool.map(one, todo))
    result["arms"] = per_arm(result["runs"], arms)
    path.write_text(json.dumps(result, indent=1))
    md = table(result["arms"])
    (RESULTS / f"{name}.md").write_text(
        f"{result['steps']} steps per run, seeds {sorted({r['seed'] for r in result['runs']})}, "
        f"mean ± sd over seeds; `bench/bench_grpo_family.py --task {a.task}`\n\n{md}\n")
    print("\n" + md)
    (plot_long if a.task == "long-addition" else plot)(result, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
