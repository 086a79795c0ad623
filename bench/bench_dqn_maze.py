"""Benchmark of dqn_maze.py: with its default settings, is the DQN greedy policy optimal in every
reachable state of each built-in maze, and does each whole run take under 2 minutes?

Runs `python dqn_maze.py --maze NAME --seed SEED` as a subprocess (default flags otherwise), reads
its summary.json, and prints one Markdown table row per learner: the environment steps until the
greedy policy became (and stayed) Q*-optimal, the final max |Q − Q*| and the wall time. Exit code
1 when a DQN run is not optimal everywhere or a run takes longer than --time-limit.

    python bench/bench_dqn_maze.py                    # both built-in mazes, seed 1
    python bench/bench_dqn_maze.py --seeds 1,2,3      # robustness across seeds
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import check  # noqa: E402  (needs sys.path above)
from harness import main  # noqa: E402


@dataclass
class Args:
    mazes: str = "2x3,6x6"
    """comma-separated mazes to run (built-in names or files)"""
    seeds: str = "1"
    """comma-separated seeds; each maze runs once per seed"""
    time_limit: float = 120.0
    """seconds one whole run (process start to exit) may take"""
    extra: str = ""
    """extra flags passed to dqn_maze.py, e.g. "--double-dqn" (the benchmark claim is for the defaults)"""


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(maze: str, seed: int, extra: list[str], out: Path) -> tuple[dict, float, float]:
    """-> summary.json, wall seconds and CPU seconds of one whole run (from process start to exit).
    The script runs torch on one thread, so on a machine that other jobs keep busy its CPU
    seconds are close to the wall time it would take on an idle one."""
    cmd = [sys.executable, "dqn_maze.py", "--maze", maze, "--seed", str(seed), "--out-dir", str(out),
           *extra]
    t0, cpu0 = time.time(), cpu_seconds_of_children()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.time() - t0, cpu_seconds_of_children() - cpu0
    check(r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
    return json.loads((out / "summary.json").read_text()), wall, cpu


def bench(args: Args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = args.extra.split()
    print(f"# dqn_maze.py benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"at start, flags: defaults {' '.join(extra)}\n")
    print("| maze | seed | learner | env steps | steps to optimal | max abs(Q - Q*) | optimal everywhere "
          "| learner s | run wall s | run CPU s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for maze in args.mazes.split(","):
            for seed in seeds:
                summary, wall, cpu = run_one(maze, seed, extra, Path(tmp) / f"{Path(maze).stem}_{seed}")
                load = os.getloadavg()[0]  # the 1-minute average just after the run
                for learner in ("tabular", "dqn"):
                    r = summary[learner]
                    print(f"| {maze} | {seed} | {learner} | {r['env_steps']} | {r['steps_to_optimal']} "
                          f"| {r['max_q_error']:.4f} | {r['optimal_everywhere']} | {r['wall_seconds']:.1f} "
                          f"| {wall:.1f} | {cpu:.1f} | {load:.1f} |", flush=True)
                if not summary["dqn"]["optimal_everywhere"]:
                    failures.append(f"{maze} seed {seed}: the DQN greedy policy is not optimal everywhere")
                if wall > args.time_limit:
                    failures.append(f"{maze} seed {seed}: the run took {wall:.0f} s "
                                    f"> {args.time_limit:.0f} s")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("\n".join(["FAIL: " + f for f in failures]) or "PASS: DQN optimal everywhere, every run in time")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main(Args, bench, __doc__)
