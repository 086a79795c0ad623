"""Benchmark, run by hand (not in CI): does every default work from any build and any seed?

    python bench/bench_robustness.py               # the whole grid, ~25 minutes on 2 CPU cores
    python bench/bench_robustness.py --only grpo --seeds 1
    python bench/bench_robustness.py --readme      # also write the tables into bench/README.md

What it runs, each as the user would (`python SCRIPT.py --model M --seed S`, every other flag at its
default (one torch thread per run, the scripts' --threads default), `--jobs` runs at a time):

    builds     `tiny` from build seeds 0..4 (0 is the shipped models/tiny; the others are made
               with `python models/build.py tiny --seed N` into bench/.builds/, once), with each
               one's start figures: held-out greedy accuracy, pass@1 and pass@8
    grpo       3 builds (0, 1, 2) × 3 RL seeds (1, 2, 3)
    reinforce  the same grid
    dpo, ppo   3 RL seeds on the shipped tiny-pref (and, for ppo, the shipped tiny-pref-rm)

The targets it checks:
    grpo       ≥ 0.90 held-out accuracy and ≥ +25 points on every RL seed from the shipped build,
               ≥ 0.85 from every other build
    reinforce  ≥ +15 points in every cell
    dpo, ppo   the gold reward rises on every seed
    all        each run under 10 minutes (wall time, at the load that the table states)

Results: bench/results/robustness.json, and markdown tables on stdout (and in bench/README.md
between the `robustness` markers, with --readme).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILDS = ROOT / "bench" / ".builds"  # ignored by git
RUNS = ROOT / "bench" / ".runs"


def tiny_build(seed: int) -> Path:
    """Folder of the `tiny` build with this seed: the shipped one for 0, else built once."""
    if seed == 0:
        return ROOT / "models" / "tiny"
    out = BUILDS / f"tiny-s{seed}"
    if not (out / "build.json").is_file():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "models/build.py", "tiny", "--seed", str(seed), "--out", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"build of tiny seed {seed} failed:\n{proc.stderr[-2000:]}")
    return out


def run(script: str, model: str, seed: int, tag: str) -> dict:
    """`python SCRIPT --model MODEL --seed SEED` with its defaults; returns its summary and timing."""
    out = RUNS / f"{script}-{tag}-s{seed}"
    cmd = [sys.executable, f"{script}.py", "--model", model, "--seed", str(seed), "--out-dir", str(out),
           "--overwrite", "--no-save-model"]
    load0, t0 = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ),  # threads: the harness's default
                          capture_output=True, text=True)
    wall, load1 = time.time() - t0, os.getloadavg()[0]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = {"script": script, "build": tag, "seed": seed, "command": " ".join(["python"] + cmd[1:6]),
           "wall_seconds": round(wall, 1), "load_average": [round(load0, 2), round(load1, 2)]}
    if script in ("grpo", "reinforce"):
        row.update(start=s["start_accuracy"], final=s["final_accuracy"],
                   start_pass=s["start_pass_at_k"], final_pass=s["final_pass_at_k"],
                   min_eval=min(r["eval/accuracy"] for r in rows if "eval/accuracy" in r))
    else:
        row.update(start=s["start_gold_reward"], final=s["final_gold_reward"], kl=s["kl_to_ref"])
    print(f"{script:9} build {tag:6} seed {seed}: {row['start']:+.3f} -> {row['final']:+.3f}  "
          f"wall {wall:5.0f}s  load {load0:.1f}-{load1:.1f}", flush=True)
    return row


def tables(result: dict) -> str:
    """The README's markdown: the builds, then one table per script, then the targets."""
    out = ["Start figures of `tiny` for five build seeds (`python models/build.py tiny --seed N`; "
           "seed 0 is the shipped `models/tiny`), on the 500 held-out problems; pass@k from 8 samples at "
           "temperature 1:", "",
           "| build seed | greedy accuracy | pass@1 | pass@8 | greedy, no carry | greedy, carry | pass@8, carry |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in result["builds"]:
        out.append(f"| {b['seed']}{' (shipped)' if b['seed'] == 0 else ''} | {b['heldout_accuracy']:.3f} | "
                   f"{b['pass_at_1']:.3f} | {b['pass_at_k']:.3f} | {b['heldout_accuracy_no_carry']:.3f} | "
                   f"{b['heldout_accuracy_carry']:.3f} | {b['pass_at_k_carry']:.3f} |")
    rows = result["rows"]
    for script in ("grpo", "reinforce"):
        sel = [r for r in rows if r["script"] == script]
        if not sel:
            continue
        out += ["", f"`python {script}.py --model BUILD --seed S` (defaults otherwise): held-out greedy accuracy "
                    "start → final (lowest evaluation on the way), pass@k start → final, wall time:", "",
                "| build | seed | accuracy | lowest | pass@1 | pass@k | wall (s) | load |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sel:
            k = r["start_pass"]["k"]
            out.append(f"| {r['build']} | {r['seed']} | {r['start']:.3f} → **{r['final']:.3f}** | {r['min_eval']:.3f} | "
                       f"{r['start_pass']['pass_at_1']:.3f} → {r['final_pass']['pass_at_1']:.3f} | "
                       f"{r['start_pass']['pass_at_k']:.3f} → {r['final_pass']['pass_at_k']:.3f} (k={k}) | "
                       f"{r['wall_seconds']:.0f} | {r['load_average'][0]:.1f}–{r['load_average'][1]:.1f} |")
    sel = [r for r in rows if r["script"] in ("dpo", "ppo")]
    if sel:
        out += ["", "`python dpo.py --seed S` and `python ppo.py --seed S` on the shipped `tiny-pref` "
                    "(defaults otherwise): mean gold reward of sampled completions, start → final, and the "
                    "KL to the reference (nats per completion):", "",
                "| script | seed | gold reward | KL | wall (s) | load |", "| --- | --- | --- | --- | --- | --- |"]
        for r in sel:
            out.append(f"| {r['script']} | {r['seed']} | {r['start']:+.3f} → **{r['final']:+.3f}** | {r['kl']:.2f} | "
                       f"{r['wall_seconds']:.0f} | {r['load_average'][0]:.1f}–{r['load_average'][1]:.1f} |")
    out += ["", "Checked by the benchmark: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}"
                                                    for name, ok in result["targets"].items())
            + f". Measured {result['date']} on {result['machine']}, {result['cpus']} cores, "
              f"{result['jobs']} runs at a time, one torch thread each."]
    return "\n".join(out)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def targets(rows: list[dict]) -> dict:
    def cells(script, build=None):
        return [r for r in rows if r["script"] == script and (build is None or (r["build"] == "0") == build)]
    t = {}
    if cells("grpo"):
        t["grpo ≥ 0.90 and ≥ +25 points from the shipped build"] = all(
            r["final"] >= 0.90 and r["final"] - r["start"] >= 0.25 for r in cells("grpo", True))
        if cells("grpo", False):
            t["grpo ≥ 0.85 from the other builds"] = all(r["final"] >= 0.85 for r in cells("grpo", False))
    if cells("reinforce"):
        t["reinforce ≥ +15 points everywhere"] = all(r["final"] - r["start"] >= 0.15 for r in cells("reinforce"))
    for script in ("dpo", "ppo"):
        if cells(script):
            t[f"{script} gold reward rises on every seed"] = all(r["final"] > r["start"] for r in cells(script))
    if rows:
        t["every run under 10 minutes"] = all(r["wall_seconds"] < 600 for r in rows)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=["grpo", "reinforce", "dpo", "ppo"], help="scripts (default: all)")
    ap.add_argument("--builds", default="0,1,2", help="tiny build seeds for grpo and reinforce (0 = shipped)")
    ap.add_argument("--report-builds", default="0,1,2,3,4", help="build seeds whose start figures are tabled")
    ap.add_argument("--seeds", default="1,2,3", help="RL seeds")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (2 cores: 2)")
    ap.add_argument("--readme", action="store_true", help="write the tables into bench/README.md")
    a = ap.parse_args()
    scripts = a.only or ["grpo", "reinforce", "dpo", "ppo"]
    seeds = [int(s) for s in a.seeds.split(",")]
    builds = [int(s) for s in a.builds.split(",")]
    report = sorted(set(builds) | {int(s) for s in a.report_builds.split(",")})
    RUNS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:  # builds first, two at a time
        paths = dict(zip(report, pool.map(tiny_build, report)))
    build_rows = [{"seed": s, **json.loads((paths[s] / "build.json").read_text())} for s in report]
    jobs = []
    for script in scripts:
        if script in ("grpo", "reinforce"):
            jobs += [(script, str(paths[b]), s, str(b)) for b in builds for s in seeds]
        else:
            jobs += [(script, "tiny-pref", s, "tiny-pref") for s in seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: run(*j), jobs))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": cpu_name(),
              "platform": platform.platform(), "cpus": os.cpu_count(), "jobs": a.jobs,
              "bench_seconds": round(time.time() - t0), "builds": build_rows, "rows": rows}
    result["targets"] = targets(rows)
    name = "robustness.json" if a.only is None else f"robustness_{'_'.join(scripts)}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=1) + "\n")
    md = tables(result)
    print("\n" + md)
    if a.readme:
        readme_path = ROOT / "bench" / "README.md"
        readme = readme_path.read_text()
        start, end = "<!-- robustness:start -->", "<!-- robustness:end -->"
        if start in readme and end in readme:
            i, j = readme.index(start) + len(start), readme.index(end)
            readme_path.write_text(readme[:i] + "\n" + md + "\n" + readme[j:])
        else:
            print(f"bench/README.md has no {start} ... {end} block; the tables are printed above", file=sys.stderr)


if __name__ == "__main__":
    main()
