"""Benchmark for grpo.py, run by hand (not in CI): the learning target and the variants side by side.

    python bench/bench_grpo.py                 # all variants, about 15 minutes on 2 CPU cores
    python bench/bench_grpo.py --only default  # just the headline run

The headline run is exactly `python grpo.py` (no arguments), on the shipped `models/tiny`. The
target: held-out greedy accuracy ≥ 0.90, at least 25 points above the start, in under 10 minutes
on 2 CPU cores. The other variants change one thing each, on the same seed. (The spread over
builds and seeds is bench/bench_robustness.py's job.)

Results go to bench/results/grpo.json (grpo_<variants>.json with --only), and a markdown table is printed for the README.
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

VARIANTS = {  # the default is β = 0.04; the variants were measured at β = 0, the default before
    "default": [],
    "beta-0": ["--beta", "0"],
    "process": ["--beta", "0", "--reward", "process"],
    "dr-grpo": ["--beta", "0", "--loss-agg", "constant", "--no-scale-rewards"],
}


def run(name: str, extra: list[str], out_root: Path) -> dict:
    out = out_root / name
    cmd = [sys.executable, "grpo.py", "--out-dir", str(out), "--no-save-model", *extra]
    env = dict(os.environ)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval/accuracy"]) for r in curve if "eval/accuracy" in r]
    first_090 = next((step for step, acc in curve if acc >= 0.90), None)
    row = {"variant": name, "command": "python grpo.py " + " ".join(extra),
           "start_accuracy": s["start_accuracy"], "final_accuracy": s["final_accuracy"],
           "process_wall_seconds": round(wall, 1), "train_seconds": s["train_seconds"],
           "load_seconds": s["load_seconds"], "first_step_at_0.90": first_090, "curve": curve}
    print(f"{name:10} {row['start_accuracy']:.3f} -> {row['final_accuracy']:.3f}  "
          f"wall {wall:6.1f}s (load {s['load_seconds']:.1f}s)  first ≥0.90 at step {first_090}",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (default: all)")
    a = ap.parse_args()
    names = a.only or list(VARIANTS)
    out_root = Path(tempfile.mkdtemp(prefix="bench_grpo_runs_"))
    load = os.getloadavg()[0]
    rows = [run(n, VARIANTS[n], out_root) for n in names]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_before": load, "rows": rows}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    name = "grpo.json" if a.only is None else f"grpo_{'_'.join(names)}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=1))
    print("\n| variant | command | start acc. | final acc. | wall time (s) | first step ≥ 0.90 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | `{r['command'].strip()}` | {r['start_accuracy']:.3f} | "
              f"{r['final_accuracy']:.3f} | {r['process_wall_seconds']:.0f} | {r['first_step_at_0.90']} |")


if __name__ == "__main__":
    main()
