"""Benchmark, run by hand (not in CI): the length dynamics of GRPO on long addition, and pass@k.

    python bench/bench_long_addition.py                  # seeds 1,2,3 × 1000 steps, 2 runs at a time
    python bench/bench_long_addition.py --seeds 1 --steps 300 --out bench/results/long_addition_s1.json
    python bench/bench_long_addition.py --table-only     # print the tables of --out again

The task (tasks.py, "the long-addition task"): three-digit sums, answered directly (`632`) or worked
out column by column (`(7+5=12,4+8+1=13,3+2+1=6)632`), the reward 1 for a right final answer and
nothing else. The start model `models/tiny-long` (models/build.py) imitates an annotator who
answers directly seven times in ten, forgetting carries, and otherwise works the sum out: both
formats are in it, the worked one rare, long and right.

Every run is `python grpo.py --task long-addition --model models/tiny-long --max-new-tokens 40
--steps N --seed S --no-pass-at-k --beta 0`, every other flag at its default (16 prompts × G = 8, lr 3e-4 with
the linear decay, β = 0, seq-mean), one torch thread each, `--jobs` at a time.

What it records (bench/results/long_addition.json) for every seed: grpo.py's per-evaluation figures
(held-out greedy accuracy, mean completion length, share worked out, accuracy of each format) every
100 steps; the share of worked samples during training, per tenth of the run; and pass@k of the
start and the end model for k = 1..64, from n = 64 samples per held-out prompt at temperature 1
(the unbiased estimator of Chen et al. 2021, 1 − C(n−c, k)/C(n, k), c right of n), beside the end
model's greedy accuracy: the smallest k at which the start model's pass@k reaches it says whether
RL found answers that sampling the start model did not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from math import comb
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RUNS = ROOT / "bench" / ".runs"  # ignored by git
RESULT = ROOT / "bench" / "results" / "long_addition.json"
MODEL = "models/tiny-long"
MAX_NEW_TOKENS = 40
KS = (1, 2, 4, 8, 16, 32, 64)
N_SAMPLES = 64


def pass_at_k_curve(model_dir: str, n_prompts: int, n: int = N_SAMPLES, seed: int = 0) -> dict:
    """pass@k for k in KS from n samples per held-out prompt (the first n_prompts), the unbiased
    estimator 1 − C(n−c, k)/C(n, k) averaged over prompts; and the greedy accuracy on the same prompts."""
    import torch

    import common
    import harness
    import tasks

    model, tok = common.load_model(model_dir, torch.device("cpu"), trainable=False)
    harness.set_threads(None, torch.device("cpu"), model)
    rows = tasks.long_addition_task()[1][:n_prompts]
    greedy = tasks.greedy_format_figures(model, tok, rows, MAX_NEW_TOKENS)
    right = np.zeros((len(rows), n))  # [prompts, n]
    per = max(1, 512 // n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            *_, c_ids, _, _, finished = common.generate_text(model, tok, [r["prompt"] for r in chunk for _ in range(n)],
                                                             MAX_NEW_TOKENS)
            ids = c_ids.tolist()
            for j, r in enumerate(chunk):
                right[i + j] = [tasks.score(ids[j * n + s], r["answer"], finished[j * n + s], "worked", tok)
                                for s in range(n)]
    c = right.sum(1).astype(int)  # right samples per prompt   [prompts]
    curve = {k: float(np.mean([1.0 - comb(n - ci, k) / comb(n, k) for ci in c])) for k in KS if k <= n}
    return {"greedy": greedy, "pass_at_k": curve, "n_prompts": len(rows), "n": n}


def run(seed: int, steps: int) -> dict:
    out = RUNS / f"long-addition-s{seed}"
    cmd = [sys.executable, "grpo.py", "--task", "long-addition", "--model", MODEL, "--max-new-tokens",
           str(MAX_NEW_TOKENS), "--steps", str(steps), "--seed", str(seed), "--no-pass-at-k", "--beta", "0",
           "--out-dir", str(out), "--overwrite"]
    load0, t0 = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, load1 = time.time() - t0, os.getloadavg()[0]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    row = collect(out, seed, steps)
    row.update(command=" ".join(["python"] + cmd[1:-3]), wall_seconds=round(wall, 1),
               load_average=[round(load0, 2), round(load1, 2)])
    evals = row["evals"]
    print(f"seed {seed}: acc {evals[0]['accuracy']:.3f} -> {evals[-1]['accuracy']:.3f}  worked "
          f"{evals[0]['worked_frac']:.2f} -> {evals[-1]['worked_frac']:.2f}  length {evals[0]['mean_length']:.1f} -> "
          f"{evals[-1]['mean_length']:.1f}  wall {wall:.0f}s  load {load0:.1f}-{load1:.1f}", flush=True)
    return row


def collect(out: Path, seed: int, steps: int) -> dict:
    """The figures of the run folder `out` (finished or not: an unfinished run gives the steps it
    logged, and its last checkpoint as its model)."""
    summary = out / "summary.json"
    s = json.loads(summary.read_text()) if summary.is_file() else {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("accuracy", "mean_length", "worked_frac", "accuracy_worked", "accuracy_direct")
    evals = [{"step": r["step"], **{k: r[f"eval/{k}"] for k in keys}} for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if r["step"] >= 1]
    steps = min(steps, train[-1]["step"])
    edges = np.linspace(0, steps, 11).round().astype(int)
    tenths = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [r for r in train if lo < r["step"] <= hi]
        tenths.append({"steps": [int(lo) + 1, int(hi)],
                       "reward": float(np.mean([r["reward/mean"] for r in sel])),
                       "worked_frac": float(np.mean([r["completions/worked_frac"] for r in sel])),
                       "mean_length": float(np.mean([r["completions/mean_length"] for r in sel]))})
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    model_dir = s.get("model_dir") or (str(ckpts[-1] / "model") if ckpts else None)
    return {"seed": seed, "steps_done": train[-1]["step"], "evals": evals, "tenths": tenths, "model_dir": model_dir,
            "model_step": train[-1]["step"] if s else (int(ckpts[-1].name.split("-")[1]) if ckpts else None),
            "train_seconds": s.get("train_seconds"),
            "step_seconds": float(np.median([r["time/step_seconds"] for r in train]))}


def fmt(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def tables(result: dict) -> str:
    lines = ["Held-out greedy figures per evaluation (mean over seeds; min–max where more than one seed):", "",
             "| step | accuracy | mean length | worked share | accuracy worked | accuracy direct |",
             "|---:|---:|---:|---:|---:|---:|"]
    runs = result["runs"]
    for i, e in enumerate(runs[0]["evals"]):
        cells = []
        for k, d in (("accuracy", 3), ("mean_length", 1), ("worked_frac", 3), ("accuracy_worked", 3),
                     ("accuracy_direct", 3)):
            v = [r["evals"][i][k] for r in runs if i < len(r["evals"]) and r["evals"][i][k] is not None]
            cells.append("—" if not v else fmt(float(np.mean(v)), d) + (f" ({fmt(min(v), d)}–{fmt(max(v), d)})"
                                                                          if len(v) > 1 else ""))
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    lines += ["", "pass@k on the first {} held-out prompts, n = {} samples each at temperature 1:".format(
        result["start"]["n_prompts"], result["start"]["n"]), "",
        "| model | greedy | " + " | ".join(f"pass@{k}" for k in KS) + " |", "|---" * (len(KS) + 2) + "|"]
    for name, p in [("start", result["start"])] + [(f"end, seed {r['seed']} (step {r['model_step']})", r["end"])
                                                         for r in runs if "end" in r]:
        lines.append(f"| {name} | {fmt(p['greedy']['accuracy'])} | "
                     + " | ".join(fmt(p["pass_at_k"][str(k)] if str(k) in p["pass_at_k"] else p["pass_at_k"].get(k))
                                  for k in KS) + " |")
    start = {int(k): v for k, v in result["start"]["pass_at_k"].items()}
    for r in runs:
        if "end" in r:
            g = r["end"]["greedy"]["accuracy"]
            k = next((k for k in KS if start[k] >= g), None)
            lines.append(f"\nseed {r['seed']}: the end model's greedy accuracy {g:.3f} is reached by the start "
                         f"model's pass@k at k = {k if k is not None else f'> {KS[-1]} (not within 64)'}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3", help="RL seeds, comma-separated")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (2 cores: 2)")
    ap.add_argument("--pass-prompts", type=int, default=200, help="held-out prompts for pass@k (64 samples each)")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--from-runs", nargs="*", metavar="RUN_DIR",
                    help="collect these grpo.py run folders (one per seed) instead of running; an unfinished "
                         "run counts up to its last logged step, its last checkpoint as its end model")
    ap.add_argument("--start-curve", metavar="FILE", help="the start model's curve, as --curve printed it")
    ap.add_argument("--end-curves", nargs="*", metavar="FILE", help="each run's end-model curve (--from-runs)")
    ap.add_argument("--curve", metavar="MODEL_DIR", help="only print the pass@k curve of this model (JSON)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.curve:
        print(json.dumps(pass_at_k_curve(a.curve, a.pass_prompts)))
        return
    if a.table_only:
        print(tables(json.loads(out.read_text())))
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.from_runs:  # run folders made before (finished or not), one per seed, in --seeds order
        runs = [collect(Path(d), s, a.steps) for d, s in zip(a.from_runs, seeds)]
    else:
        with ThreadPoolExecutor(a.jobs) as pool:  # the runs are subprocesses
            runs = list(pool.map(lambda s: run(s, a.steps), seeds))
    start = (json.loads(Path(a.start_curve).read_text()) if a.start_curve  # in this process, one after another:
             else pass_at_k_curve(str(ROOT / MODEL), a.pass_prompts))
    for i, r in enumerate(runs):  # the sampling seeds torch's global RNG
        if a.end_curves:
            r["end"] = json.loads(Path(a.end_curves[i]).read_text())
        elif r["model_dir"]:
            r["end"] = pass_at_k_curve(r["model_dir"], a.pass_prompts)
    import torch
    result = {"steps": a.steps, "seeds": seeds, "start": start, "runs": runs,
              "torch": torch.__version__, "cpus": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(tables(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
