"""Benchmark of ppo.py's three policy updates, run by hand (not in CI): PPO-clip against the notes'
PPO-penalty and TRPO (`--policy-loss clip|kl-penalty|trpo`), on the built-in preference task.

    python bench/bench_ppo_updates.py                              # 3 losses × 3 seeds, two runs at a time
    python bench/bench_ppo_updates.py --seeds 1 --jobs 1           # one seed of each, one at a time
    python bench/bench_ppo_updates.py --extra "--steps 3" --no-plot   # a smoke test of the harness

Every run is `python ppo.py --policy-loss LOSS --seed SEED` with every other flag at its default
(plus --no-save-model and the run folder), so the three losses see equal rollouts: the same number
of prompts per step (64) and of steps (150), the same reward model, value model and GAE; only the
policy update differs. Claim examined (notes `003`, "Attempt 3"; `004`, "PPO - Penalty"): PPO is
simpler than TRPO and works as well, and the KL-penalty variant does worse than the clip.

Reported per run, and as mean ± std over seeds per loss:
  * gold reward and proxy score (the reward model's, minus the EOS penalty) of 500 held-out samples
    after training, and their KL to π_ref (nats per completion): summary.json's final evaluation;
  * KL(π_old ‖ π_θ) per update: the mean over the 150 updates of `policy/kl_old` (exact over the
    vocabulary, nats per token, measured after each rollout's update; for clip, which keeps no copy
    of π_old's whole distribution, `policy/kl_old_k3`, its unbiased k3 estimate from the sampled
    tokens), and its largest value;
  * TRPO: line-search failures and the mean accepted step fraction; PPO-penalty: the final β_pen;
  * wall time of the process, and the machine's load average before and after each run.

Writes bench/results/ppo_updates.json (with the per-step `policy/kl_old` and the evaluation curves
of every run) and bench/results/ppo_updates.md (the tables), and draws bench/results/ppo_updates.png
with bench/plot.py, run by the interpreter of --plot-python (matplotlib lives only in the bench
environment, see bench/requirements.txt).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ppo  # noqa: E402  (needs sys.path above)
from common import check  # noqa: E402
from harness import main  # noqa: E402

LOSSES = ("clip", "kl-penalty", "trpo")


@dataclass
class Args:
    seeds: str = "1,2,3"
    """comma-separated seeds; every loss runs once per seed"""
    losses: str = ",".join(LOSSES)
    """comma-separated policy losses to run: clip, kl-penalty, trpo"""
    jobs: int = 2
    """runs at once (2 on a 2-core machine, one thread each)"""
    threads: int = 1
    """torch threads per run (the scripts' --threads); 0 leaves the scripts' default (1 for tiny)"""
    extra: str = ""
    """extra flags passed to every ppo.py run (the numbers in the README are for none)"""
    out: str = "bench/results/ppo_updates.json"
    """where the JSON results go (relative to the repo root); the .md and .png sit beside it"""
    plot: bool = True
    """draw the plot with bench/plot.py (needs matplotlib in --plot-python)"""
    plot_python: str = "bench/.venv/bin/python"
    """the interpreter that has matplotlib (relative to the repo root, or absolute)"""


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_one(loss: str, seed: int, extra: list[str], out: Path, threads: int) -> dict:
    """One `python ppo.py --policy-loss LOSS --seed SEED` in a subprocess; its numbers."""
    cmd = [sys.executable, "ppo.py", "--policy-loss", loss, "--seed", str(seed), "--out-dir", str(out),
           "--no-save-model", *extra]
    cmd += ["--threads", str(threads)] if threads else []  # 0: the scripts' own default
    env = dict(os.environ)
    log_path = out.parent / f"{out.name}.log"
    load_before, t0 = load(), time.time()
    with open(log_path, "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    check(p.returncode == 0, f"{' '.join(cmd)} failed:\n{log_path.read_text().strip()[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    kl_old = [r["policy/kl_old"] if "policy/kl_old" in r else r["policy/kl_old_k3"]
              for r in steps]  # KL(π_old ‖ π_θ) of each update, nats per token (clip: the k3 estimate)
    r = {
        "loss": loss, "seed": seed, "command": f"python ppo.py --policy-loss {loss} --seed {seed}"
                                                + (" " + " ".join(extra) if extra else ""),
        "start_gold_reward": s["start_gold_reward"], "final_gold_reward": s["final_gold_reward"],
        "start_score": s["start_score"], "final_score": s["final_score"], "kl_to_ref": s["kl_to_ref"],
        "final_mean_length": s["final_mean_length"],
        "mean_kl_old": float(np.mean(kl_old)), "max_kl_old": float(np.max(kl_old)),
        "process_seconds": round(wall, 1), "wall_seconds": s["wall_seconds"], "train_seconds": s["train_seconds"],
        "load_average_before": load_before, "load_average_after": load(), "threads": s["threads"],
        "kl_old_per_step": kl_old,
        "curve": [{"step": x["step"], "gold": x["eval/gold_reward"], "score": x["eval/score"],
                   "kl": x["eval/kl_to_ref"]} for x in rows if "eval/gold_reward" in x],
        "examples_after": s["examples_after"],
    }
    if loss == "trpo":
        r["line_search_failures"] = int(sum(x["trpo/line_search_failed"] for x in steps))
        r["mean_step_fraction"] = float(np.mean([x["trpo/step_fraction"] for x in steps]))
        r["mean_full_step_kl_over_delta"] = float(np.mean([x["trpo/full_step_kl"] for x in steps])
                                                  / s["config"]["trpo_delta"])
    if loss == "kl-penalty":
        r["final_penalty_beta"] = s["final_penalty_beta"]
        r["penalty_beta_per_step"] = [x["penalty/beta_pen"] for x in steps]
    return r


def mean_std(xs, sign: str = "+") -> str:
    xs = np.asarray(xs, dtype=float)
    m = f"{xs.mean():{sign}.2f}"
    return f"{m} ± {xs.std(ddof=1):.2f}" if len(xs) > 1 else m


def tables(results: list[dict], losses: list[str]) -> str:
    """The markdown: one row per run, then mean ± std (Bessel) over seeds per loss."""
    lines = ["| loss | seed | gold reward | proxy score | KL to π_ref | mean KL(π_old‖π_θ) per update "
             "| max | wall s | load before → after | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        note = ""
        if r["loss"] == "trpo":
            note = (f"line search failed {r['line_search_failures']}×, mean step fraction "
                    f"{r['mean_step_fraction']:.2f}, full-step KL / δ {r['mean_full_step_kl_over_delta']:.2f}")
        elif r["loss"] == "kl-penalty":
            note = f"final β_pen {r['final_penalty_beta']:.3g}"
        lines.append(f"| {r['loss']} | {r['seed']} | {r['start_gold_reward']:+.2f} → {r['final_gold_reward']:+.2f} "
                     f"| {r['start_score']:+.2f} → {r['final_score']:+.2f} | {r['kl_to_ref']:.2f} "
                     f"| {r['mean_kl_old']:.4f} | {r['max_kl_old']:.4f} | {r['process_seconds']:.0f} "
                     f"| {r['load_average_before']:.2f} → {r['load_average_after']:.2f} | {note} |")
    lines += ["", "| loss | seeds | gold reward | proxy score | KL to π_ref | mean KL(π_old‖π_θ) per update "
                  "| wall s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for loss in losses:
        rs = [r for r in results if r["loss"] == loss]
        if not rs:
            continue
        kl_old = np.array([r["mean_kl_old"] for r in rs])
        lines.append(f"| {loss} | {len(rs)} | {mean_std([r['final_gold_reward'] for r in rs])} "
                     f"| {mean_std([r['final_score'] for r in rs])} | {mean_std([r['kl_to_ref'] for r in rs], sign='')} "
                     f"| {kl_old.mean():.4f} | {np.mean([r['process_seconds'] for r in rs]):.0f} |")
    return "\n".join(lines)


def run(args: Args) -> dict:
    seeds = [int(s) for s in args.seeds.split(",") if s]
    losses = [x for x in args.losses.split(",") if x]
    for x in losses:
        check(x in LOSSES, f"--losses: unknown loss {x!r}; expected {', '.join(LOSSES)}")
    check(seeds and args.jobs >= 1, "--seeds needs at least one seed and --jobs must be ≥ 1")
    extra = args.extra.split()
    cmd = "python bench/bench_ppo_updates.py " + shlex.join(sys.argv[1:])
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    record = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "jobs": args.jobs, "threads": args.threads, "extra": args.extra,
              "uptime_before": uptime(), "load_average_start": load(),
              "defaults": {k: getattr(ppo.Args(), k) for k in ("steps", "batch_size", "mini_batches", "ppo_epochs",
                                                               "lr", "epsilon", "penalty_beta", "penalty_target_kl",
                                                               "trpo_delta", "trpo_cg_iters", "trpo_damping",
                                                               "trpo_backtrack", "trpo_backtrack_steps")}}
    print(f"# ppo.py policy updates: {os.cpu_count()} CPUs, load average {record['load_average_start']} at "
          f"start, {args.jobs} run(s) at a time, {args.threads or 'default'} thread(s) each, seeds {seeds}, "
          f"losses {losses}\n", flush=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_updates_") as tmp:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, x, s, extra, Path(tmp) / f"{x}_s{s}", args.threads)
                       for s in seeds for x in losses]
            for f in futures:
                r = f.result()
                results.append(r)
                print(f"{r['loss']:10} seed {r['seed']}: gold {r['start_gold_reward']:+.3f} -> "
                      f"{r['final_gold_reward']:+.3f}, score {r['final_score']:+.3f}, KL to ref "
                      f"{r['kl_to_ref']:.2f}, mean KL(old‖new) {r['mean_kl_old']:.4f}, "
                      f"{r['process_seconds']:.0f} s (load {r['load_average_before']:.2f})", flush=True)
    record.update(uptime_after=uptime(), load_average_end=load(), rows=results)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    md = tables(results, losses)
    out.with_suffix(".md").write_text(f"`{cmd}` ({record['date']}; load average {record['load_average_start']} "
                                      f"at the start, {record['load_average_end']} at the end)\n\n{md}\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}\n\n{md}")
    if args.plot:
        py = Path(args.plot_python)
        py = py if py.is_absolute() else ROOT / py
        if py.is_file():
            p = subprocess.run([str(py), "bench/plot.py", "--ppo-updates", str(out), "--out",
                                str(out.with_suffix(".png"))], cwd=ROOT, capture_output=True, text=True)
            print(p.stdout.strip() or p.stderr.strip()[-2000:])
        else:
            print(f"no plot: {py} is not there (see bench/requirements.txt, or pass --plot-python)")
    return record


if __name__ == "__main__":
    main(Args, run, __doc__)
