"""Benchmark, run by hand (not in CI): how many torch threads make the CPU defaults fastest?

    python bench/bench_threads.py                       # every script, 2 repeats: ~25 minutes on 2 cores
    python bench/bench_threads.py --only dpo grpo --repeats 3

Each default script runs on a fixed slice of its default run (SLICES: the defaults with fewer
steps), as `python SCRIPT.py --threads N` for N in 1, 2 and the machine's core count, in two
conditions:
    idle   nothing else runs
    busy   beside one busy process of the same kind: the same command with the same --threads,
           restarted as often as it ends, for as long as the measured run lasts
The arms are interleaved (every N and condition once per repeat, in turn), so that a drift of the
machine's load falls on every arm alike. It reports the training time (summary.json's
`train_seconds`, which leaves out loading) of every arm, its ratio to one thread, the load average
around each run, and whether the thread count changed any logged number (metrics.jsonl, line by
line, against the one-thread run of the same repeat and condition).

Results: bench/results/threads.json and bench/results/threads.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / ".runs" / "threads"
SLICES = {  # script: the flags of the slice (every other flag at its default)
    "grpo": ["--steps", "100", "--eval-every", "100", "--beta", "0"],  # β = 0, as measured
    "reinforce": ["--steps", "100", "--eval-every", "100"],
    "ppo": ["--steps", "10", "--eval-every", "10"],
    "dpo": ["--max-steps", "60", "--eval-every", "60"],
    "reward_model": ["--max-steps", "60", "--eval-every", "60"],
    "dqn_maze": ["--dqn-steps", "3000"],
}
TIMING = ("time", "second", "sps", "eta", "wall", "per_second")


def command(script: str, threads: int, out: Path) -> list[str]:
    return [sys.executable, f"{script}.py", *SLICES[script], "--threads", str(threads), "--seed", "1",
            "--out-dir", str(out), "--overwrite"]


def numbers(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.append({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not any(s in k.lower() for s in TIMING)})
    return rows


def same_numbers(a: Path, b: Path) -> bool:
    ra, rb = numbers(a), numbers(b)
    return len(ra) == len(rb) and all(
        x.keys() == y.keys() and all(math.isclose(x[k], y[k], rel_tol=1e-9, abs_tol=1e-12) for k in x)
        for x, y in zip(ra, rb))


def train_seconds(summary: dict) -> float:
    """summary.json's training time; dqn_maze.py has none, but a wall time per method: their sum."""
    if "train_seconds" in summary:
        return summary["train_seconds"]
    return sum(v["wall_seconds"] for v in summary.values() if isinstance(v, dict) and "wall_seconds" in v)


def measure(script: str, threads: int, busy: bool, tag: str) -> dict:
    out = RUNS / f"{script}-t{threads}-{tag}"
    neighbour = None
    if busy:  # the same command, in a loop, in its own process group so that it can be stopped whole
        loop = " ".join(command(script, threads, RUNS / f"{script}-busy")) + " >/dev/null 2>&1"
        neighbour = subprocess.Popen(["bash", "-c", f"while true; do {loop}; done"], cwd=ROOT,
                                     start_new_session=True)
        time.sleep(5)  # let it get past loading
    load_before = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # --threads decides
    proc = subprocess.run(command(script, threads, out), cwd=ROOT, env=env, capture_output=True, text=True)
    load_after = os.getloadavg()[0]
    if neighbour is not None:
        os.killpg(neighbour.pid, signal.SIGTERM)
        neighbour.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{script} --threads {threads} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"script": script, "threads": threads, "condition": "busy" if busy else "idle", "tag": tag,
            "train_seconds": train_seconds(summary), "wall_seconds": summary.get("wall_seconds"),
            "threads_recorded": summary.get("threads"), "load_before": load_before, "load_after": load_after,
            "metrics": str(out / "metrics.jsonl")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(SLICES), choices=list(SLICES))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    counts = sorted({1, 2, os.cpu_count() or 1})
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = []
    for script in a.only:
        for rep in range(a.repeats):
            for busy in (False, True):
                for n in counts:
                    r = measure(script, n, busy, f"r{rep}-{'busy' if busy else 'idle'}")
                    rows.append(r)
                    print(f"{script:13} {r['condition']:4} threads {n}: {r['train_seconds']:7.1f} s training "
                          f"(load {r['load_before']:.1f} → {r['load_after']:.1f})", flush=True)
    for r in rows:  # did the thread count change a number? against the 1-thread run of the same tag
        one = next(x for x in rows if x["script"] == r["script"] and x["tag"] == r["tag"] and x["threads"] == 1)
        r["same_numbers_as_1_thread"] = same_numbers(Path(one["metrics"]), Path(r["metrics"]))
    lines = ["| script | condition | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in counts)
             + " | same numbers |", "| --- | --- |" + " --- |" * (len(counts) + 1)]
    for script in a.only:
        for cond in ("idle", "busy"):
            cell = []
            for n in counts:
                ts = [r["train_seconds"] for r in rows if (r["script"], r["condition"], r["threads"]) == (script, cond, n)]
                base = [r["train_seconds"] for r in rows if (r["script"], r["condition"], r["threads"]) == (script, cond, 1)]
                ratio = sum(ts) / sum(base)
                cell.append(" / ".join(f"{t:.1f}" for t in ts) + f" s (×{ratio:.2f})")
            same = all(r["same_numbers_as_1_thread"] for r in rows if (r["script"], r["condition"]) == (script, cond))
            lines.append(f"| {script} | {cond} | " + " | ".join(cell) + f" | {'yes' if same else 'NO'} |")
    table = "\n".join(lines)
    print("\n" + table)
    res = ROOT / "bench" / "results"
    (res / "threads.json").write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    (res / "threads.md").write_text(f"Training seconds per arm ({os.cpu_count()} cores), each repeat's time, "
                                    "and the ratio of the sums to one thread.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
