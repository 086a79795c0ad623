"""Benchmark for reward_model.py and dpo.py, run by hand (not in CI): learning from preferences,
measured against the hidden gold reward of the built-in task.

    python bench/bench_pref.py                        # every run below, about 15 minutes on 2 CPU cores
    python bench/bench_pref.py --only rm dpo-beta-0.1 dpo-beta-0.5     # just the targets
    python bench/bench_pref.py --only rm dpo-beta-0.1 dpo-beta-0.5 --seeds 2 3 \
        --out bench/results/pref_seeds.json                                # the targets on other seeds

Targets (issue "reward_model.py and dpo.py"):
  * the reward model's held-out pair accuracy is within 3 points of the ceiling (how often the gold
    reward itself agrees with the noisy labels);
  * DPO raises the mean gold reward of sampled completions clearly above the SFT policy's, reported
    with the KL to the reference for at least two values of β;
  * each default run takes under 5 minutes on 2 CPU cores.

The first run is exactly `python reward_model.py` (no arguments), on the shipped `tiny-pref`.
The others change one thing each, on the same seed. Results go to bench/results/pref.json (with the
machine's load average, since the numbers are wall times), and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {  # name: (script, extra flags)
    "rm": ("reward_model.py", []),
    "dpo-beta-0.1": ("dpo.py", []),
    "dpo-beta-0.5": ("dpo.py", ["--beta", "0.5"]),
    "dpo-lr-1e-3": ("dpo.py", ["--lr", "1e-3"]),
    "cdpo-0.1": ("dpo.py", ["--label-smoothing", "0.1"]),
    "ipo": ("dpo.py", ["--loss-type", "ipo", "--beta", "0.5"]),
    "hinge": ("dpo.py", ["--loss-type", "hinge"]),
    "length-norm": ("dpo.py", ["--loss-type", "length_norm", "--beta", "1.0"]),
    "reference-free": ("dpo.py", ["--loss-type", "reference_free"]),
}


def run(name: str, seed: int, out_root: Path) -> dict:
    script, extra = RUNS[name]
    extra = extra + (["--seed", str(seed)] if seed != 1 else [])
    out = out_root / f"{name}__s{seed}"
    cmd = [sys.executable, script, "--out-dir", str(out), "--no-save-model", *extra]
    env = dict(os.environ)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    row = {"run": name, "seed": seed, "command": f"python {script} " + " ".join(extra),
           "process_wall_seconds": round(wall, 1), "train_seconds": s["train_seconds"],
           "load_seconds": s["load_seconds"], "load_average_before": round(load_before, 2),
           "load_average_after": round(os.getloadavg()[0], 2)}
    if script == "reward_model.py":
        row.update({k: s[k] for k in ("start_heldout_accuracy", "heldout_accuracy", "ceiling_accuracy",
                                      "train_accuracy", "train_ceiling_accuracy", "gold_correlation",
                                      "reward_mean", "reward_std")})
        row["gap_to_ceiling_points"] = round(100 * (s["ceiling_accuracy"] - s["heldout_accuracy"]), 2)
        print(f"{name:15} s{seed} held-out {s['heldout_accuracy']:.3f} vs ceiling {s['ceiling_accuracy']:.3f} "
              f"(gap {row['gap_to_ceiling_points']:+.1f} points), train {s['train_accuracy']:.3f}, "
              f"gold correlation {s['gold_correlation']:.3f}; wall {wall:.0f}s (load {load_before:.1f})",
              flush=True)
    else:
        curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["step"], r["eval/gold_reward"], r["eval/kl_to_ref"]) for r in curve if "eval/gold_reward" in r]
        row.update({k: s[k] for k in ("loss_type", "beta", "start_gold_reward", "final_gold_reward", "kl_to_ref",
                                      "heldout_pair_accuracy", "ceiling_accuracy", "start_mean_length",
                                      "final_mean_length", "examples_after")})
        row["curve_step_gold_kl"] = curve
        print(f"{name:15} s{seed} gold {s['start_gold_reward']:+.3f} -> {s['final_gold_reward']:+.3f}, "
              f"KL {s['kl_to_ref']:.3f}, held-out pair acc. {s['heldout_pair_accuracy']:.3f}; "
              f"wall {wall:.0f}s (load {load_before:.1f})", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do (default: all)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[1], help="--seed of every run (default: 1)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pref.json"), help="results file")
    a = ap.parse_args()
    names = a.only or list(RUNS)
    out_root = Path(tempfile.mkdtemp(prefix="bench_pref_runs_"))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = [run(n, seed, out_root) for seed in a.seeds for n in names]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "uptime_before": uptime,
              "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))

    rm_rows = [r for r in rows if "heldout_accuracy" in r]
    if rm_rows:
        print("\n| run | seed | command | held-out pair acc. | ceiling | gap (points) | train acc. (ceiling) "
              "| corr. with gold | wall time (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rm_rows:
            print(f"| {r['run']} | {r['seed']} | `{r['command'].strip()}` | {r['heldout_accuracy']:.3f} | "
                  f"{r['ceiling_accuracy']:.3f} | {r['gap_to_ceiling_points']:+.1f} | "
                  f"{r['train_accuracy']:.3f} ({r['train_ceiling_accuracy']:.3f}) | "
                  f"{r['gold_correlation']:.3f} | {r['process_wall_seconds']:.0f} |")
    dpo_rows = [r for r in rows if "final_gold_reward" in r]
    if dpo_rows:
        print("\n| run | seed | command | gold reward before → after | KL to π_ref (nats) | held-out pair acc. "
              "| wall time (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in dpo_rows:
            print(f"| {r['run']} | {r['seed']} | `{r['command'].strip()}` | {r['start_gold_reward']:+.2f} → "
                  f"{r['final_gold_reward']:+.2f} | {r['kl_to_ref']:.2f} | {r['heldout_pair_accuracy']:.3f} | "
                  f"{r['process_wall_seconds']:.0f} |")
    print(f"\nload: {result['uptime_before']}  ->  {result['uptime_after']}")


if __name__ == "__main__":
    main()
