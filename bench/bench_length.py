"""Benchmark, run by hand (not in CI): Dr. GRPO's length claim, measured.

    python bench/bench_length.py                     # 3 arms × 3 seeds × 1000 steps, 2 runs at a time:
                                                     #   21 min on 2 cores at load 5-8 (bench/results/length.json)
    python bench/bench_length.py --arms dr-grpo --out bench/results/length_dr-grpo.json
    python bench/bench_length.py --plot-only         # redraw the plot from bench/results/length.json

The claim (notes `000`, "GRPO Done Right"; Liu et al. 2025, arXiv:2503.20783 §3.1): with the
notes' GRPO loss, 1/|y_i| Σ_t inside and a mean over sequences (`--loss-agg seq-mean`), a token of
a completion with a negative advantage is pushed down by |Â|/|y_i|, so a long wrong answer is
punished less per token than a short one, and wrong answers grow long. Summing the tokens with one
constant for the whole batch (`token-mean`, DAPO; `constant`, Dr. GRPO) weights every token alike.

The setting: `models/tiny-ramble` (models/build.py), the arithmetic policy whose annotator, when it
forgot a carry, also wrote 1..8 filler dots (`57+33=` -> `80....`), so that at the start the right
answers are 2-4 tokens and the wrong ones about 7.5; `--max-new-tokens 16` leaves them room to
grow. The strict reward of `80.` and of `80........` is the same 0: the ramble carries no reward, so
the expected policy gradient on its length is 0 under token-mean and constant, and only the 1/|y|
weighting of seq-mean can move it. The right answers cannot ramble at all (a strict answer is the
digits alone), so only the wrong side of the claim can show here.

Every run is `python grpo.py --model models/tiny-ramble --max-new-tokens 16 --steps N --seed S
--loss-agg A --no-pass-at-k`, every other flag at its default (16 prompts × G = 8, lr 3e-4 with
the linear decay to 0 at step N, β = 0), one torch thread each, `--jobs` at a time. The arms:

    seq-mean    the notes' GRPO: 1/|y| inside
    token-mean  DAPO: Σ over all the batch's tokens / their number
    constant    Dr. GRPO's aggregation: Σ / (B · 16), the std scaling of Â kept, so that the
                aggregation is the one thing that differs from seq-mean
    dr-grpo     constant and --no-scale-rewards (not in the default set: the std scaling is Dr.
                GRPO's other bias, about questions, not lengths, and it changes the step size)

What it records (bench/results/length.json): for every run, per window of steps, the mean length
|y| (tokens up to and including EOS) of the right and of the wrong sampled completions, each
weighted by how many there were (grpo.py's `completions/len_correct`, `completions/len_incorrect`
and `reward/mean`), the fraction of wrong ones and of unfinished ones, and the held-out greedy
accuracy; then a table of the first and last tenth of training, mean ± sd over seeds. The plot is
bench/results/length.png (needs matplotlib: bench/requirements.txt).

The mean length of the wrong answers mixes two things: how many of them ramble (a slip followed by
dots; the other errors are short) and how long a ramble is. So each run also keeps its final
model, and 8 samples per held-out prompt at temperature 1 (a fixed seed) measure both, beside the
same figures of the start model (`samples_final`, `samples_start`, and the second table).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RUNS = ROOT / "bench" / ".runs"  # ignored by git
RESULT = ROOT / "bench" / "results" / "length.json"
MODEL = "models/tiny-ramble"
MAX_NEW_TOKENS = 16
ARMS = {
    "seq-mean": ["--loss-agg", "seq-mean"],
    "token-mean": ["--loss-agg", "token-mean"],
    "constant": ["--loss-agg", "constant"],
    "dr-grpo": ["--loss-agg", "constant", "--no-scale-rewards"],
}
WINDOWS = 40  # points per curve; the table's "first" and "last" are the first and last tenth


def windows(rows: list[dict], steps: int, n: int) -> list[dict]:
    """Per window of steps: the count-weighted mean length of the right and the wrong completions,
    the fraction of wrong ones and of unfinished ones. A window with no completion of a kind gives
    None for its length."""
    out = []
    edges = np.linspace(0, steps, n + 1).round().astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [r for r in rows if lo < r["step"] <= hi]
        right = np.array([r["reward/mean"] for r in sel])  # fraction right per step (same B each)
        len_c = np.array([r["completions/len_correct"] or 0.0 for r in sel])
        len_i = np.array([r["completions/len_incorrect"] or 0.0 for r in sel])
        w_c, w_i = right.sum(), (1 - right).sum()
        out.append({"steps": [int(lo) + 1, int(hi)],
                    "len_correct": float((right * len_c).sum() / w_c) if w_c > 0 else None,
                    "len_incorrect": float(((1 - right) * len_i).sum() / w_i) if w_i > 0 else None,
                    "frac_incorrect": float(1 - right.mean()),
                    "no_eos_frac": float(np.mean([r["completions/no_eos_frac"] for r in sel]))})
    return out


def sample_figures(model_dir: str | Path, k: int = 8, seed: int = 0) -> dict:
    """k samples per held-out prompt at temperature 1 from the model in `model_dir`: the mean |y|
    of the right and the wrong answers, the fraction of the wrong answers that ramble (end in
    filler dots before EOS) and the mean number of dots among those, and the fraction unfinished."""
    import torch

    import common
    import harness
    import tasks
    from models import build

    model, tok = common.load_model(str(model_dir), torch.device("cpu"), trainable=False)
    harness.set_threads(None, torch.device("cpu"), model)  # the scripts' own setting
    heldout = tasks.arithmetic_task()[1]
    prompts = [r["prompt"] for r in heldout for _ in range(k)]
    answers = [r["answer"] for r in heldout for _ in range(k)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        *_, c_mask, texts, finished = common.generate_text(model, tok, prompts, MAX_NEW_TOKENS)
    lengths = c_mask.sum(1).tolist()  # |y_i|, EOS included
    right = [tasks.score(t, a, f) > 0 for t, a, f in zip(texts, answers, finished)]
    wrong = [(t, n) for t, n, ok in zip(texts, lengths, right) if not ok]
    dots = [len(t) - len(t.rstrip(build.RAMBLE)) for t, _ in wrong]  # trailing filler characters
    rambles = [d for d in dots if d > 0]
    return {"len_correct": float(np.mean([n for n, ok in zip(lengths, right) if ok])) if any(right) else None,
            "len_incorrect": float(np.mean([n for _, n in wrong])) if wrong else None,
            "frac_incorrect": len(wrong) / len(texts),
            "frac_wrong_that_ramble": len(rambles) / len(wrong) if wrong else None,
            "ramble_dots": float(np.mean(rambles)) if rambles else None,
            "no_eos_frac": 1.0 - float(np.mean(finished))}


def run(arm: str, seed: int, steps: int) -> dict:
    out = RUNS / f"length-{arm}-s{seed}"
    cmd = [sys.executable, "grpo.py", "--model", MODEL, "--max-new-tokens", str(MAX_NEW_TOKENS),
           "--steps", str(steps), "--seed", str(seed), "--beta", "0", *ARMS[arm], "--no-pass-at-k",
           "--out-dir", str(out), "--overwrite"]
    load0, t0 = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # threads: the harness's default
    wall, load1 = time.time() - t0, os.getloadavg()[0]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["step"] >= 1]
    row = {"arm": arm, "seed": seed, "command": " ".join(["python"] + cmd[1:-3]),
           "start_accuracy": s["start_accuracy"], "final_accuracy": s["final_accuracy"],
           "eval": [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r],
           "windows": windows(train_rows, steps, WINDOWS), "tenths": windows(train_rows, steps, 10),
           "model_dir": s["model_dir"],
           "wall_seconds": round(wall, 1), "load_average": [round(load0, 2), round(load1, 2)]}
    first, last = row["tenths"][0], row["tenths"][-1]
    print(f"{arm:10} seed {seed}: acc {row['start_accuracy']:.3f} -> {row['final_accuracy']:.3f}  "
          f"len wrong {fmt(first['len_incorrect'])} -> {fmt(last['len_incorrect'])}  "
          f"len right {fmt(first['len_correct'])} -> {fmt(last['len_correct'])}  "
          f"wall {wall:4.0f}s  load {load0:.1f}-{load1:.1f}", flush=True)
    return row


def fmt(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def mean_sd(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def table(result: dict) -> str:
    """The README's markdown: per arm, mean ± sd over seeds, first tenth → last tenth of training."""
    out = ["| arm | `--loss-agg` | len wrong, first → last tenth | len right, first → last tenth | "
           "wrong fraction, first → last | unfinished, last | greedy accuracy, start → final |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm in result["arms"]:
        rs = [r for r in result["rows"] if r["arm"] == arm]
        f, la = [r["tenths"][0] for r in rs], [r["tenths"][-1] for r in rs]
        out.append(f"| {arm} | `{' '.join(ARMS[arm][1:])}` | "
                   f"{mean_sd([x['len_incorrect'] for x in f])} → **{mean_sd([x['len_incorrect'] for x in la])}** | "
                   f"{mean_sd([x['len_correct'] for x in f])} → {mean_sd([x['len_correct'] for x in la])} | "
                   f"{mean_sd([x['frac_incorrect'] for x in f])} → {mean_sd([x['frac_incorrect'] for x in la])} | "
                   f"{mean_sd([x['no_eos_frac'] for x in la])} | "
                   f"{mean_sd([r['start_accuracy'] for r in rs])} → {mean_sd([r['final_accuracy'] for r in rs])} |")
    return "\n".join(out)


def sample_table(result: dict) -> str:
    """The README's second table: the start model and each arm's final models, sampled."""
    keys = ("frac_incorrect", "frac_wrong_that_ramble", "ramble_dots", "len_incorrect", "len_correct", "no_eos_frac")
    out = ["| model | wrong fraction | wrong answers that ramble | dots per ramble | len wrong | len right | "
           "unfinished |", "| --- | --- | --- | --- | --- | --- | --- |",
           f"| start ({MODEL}) | " + " | ".join(fmt(result["samples_start"][k]) for k in keys) + " |"]
    for arm in result["arms"]:
        rs = [r["samples_final"] for r in result["rows"] if r["arm"] == arm]
        out.append(f"| {arm}, final | " + " | ".join(mean_sd([x[k] for x in rs]) for k in keys) + " |")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """Two panels against the step, the mean length of the wrong and of the right sampled
    completions: each seed a thin line, the mean over seeds a thick one, one colour per arm."""
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("len_incorrect", "mean |y| of wrong completions (tokens)"),
              ("len_correct", "mean |y| of right completions (tokens)"),
              ("frac_incorrect", "fraction of sampled completions wrong")]
    for i, arm in enumerate(result["arms"]):
        colour = f"C{i}"
        rs = [r for r in result["rows"] if r["arm"] == arm]
        for ax, (key, title) in zip(axes, panels):
            curves = []
            for r in rs:
                x = [np.mean(w["steps"]) for w in r["windows"]]
                y = [np.nan if w[key] is None else w[key] for w in r["windows"]]
                ax.plot(x, y, color=colour, lw=0.7, alpha=0.45)
                curves.append(y)
            ax.plot(x, np.nanmean(np.array(curves, dtype=float), axis=0), color=colour, lw=2.2,
                    label=f"{arm} ({len(rs)} seeds)")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("GRPO step")
    axes[0].legend(fontsize=9)
    fig.suptitle(f"grpo.py on {MODEL}, --max-new-tokens {MAX_NEW_TOKENS}, {result['steps']} steps "
                 f"(windows of {result['steps'] // WINDOWS} steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="*", choices=list(ARMS), default=["seq-mean", "token-mean", "constant"],
                    help="loss aggregations to compare (default: seq-mean token-mean constant)")
    ap.add_argument("--seeds", default="1,2,3", help="RL seeds, comma-separated")
    ap.add_argument("--steps", type=int, default=1000,
                    help="GRPO steps of every run (1000: the 9 runs fit in ~20-45 min on a shared 2-core machine)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (2 cores: 2)")
    ap.add_argument("--out", default=str(RESULT), help="results JSON; the plot goes beside it as .png")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and plot from --out")
    a = ap.parse_args()
    path = Path(a.out)
    if a.plot_only:
        result = json.loads(path.read_text())
    else:
        seeds = [int(s) for s in a.seeds.split(",")]
        RUNS.mkdir(parents=True, exist_ok=True)
        t0, load = time.time(), os.getloadavg()
        jobs = [(arm, s) for s in seeds for arm in a.arms]  # seed-major: every arm sees the same load
        with ThreadPoolExecutor(a.jobs) as pool:
            rows = list(pool.map(lambda j: run(*j, a.steps), jobs))
        for r in rows:  # one at a time, after the runs
            r["samples_final"] = sample_figures(r.pop("model_dir"))
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(),
                  "cpus": os.cpu_count(), "jobs": a.jobs, "threads_per_run": "the harness's default (1)", "load_before": load,
                  "load_after": os.getloadavg(), "bench_seconds": round(time.time() - t0),
                  "model": MODEL, "max_new_tokens": MAX_NEW_TOKENS, "steps": a.steps, "seeds": seeds,
                  "arms": a.arms, "samples_start": sample_figures(ROOT / MODEL), "rows": rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table(result) + "\n\n" + sample_table(result))
    try:
        plot(result, path.with_suffix(".png"))
    except ImportError:
        print("no matplotlib here: no plot (bench/.venv/bin/python bench/bench_length.py --plot-only draws it)")


if __name__ == "__main__":
    main()
