"""Benchmark for ppo.py, run by hand (not in CI): RLHF with PPO against the hidden gold reward of the
built-in preference task, beside DPO and best-of-n.

    python bench/bench_ppo.py                          # every run below, about 20 minutes on 2 CPU cores
    python bench/bench_ppo.py --only default           # just `python ppo.py`
    python bench/bench_ppo.py --only overopt-beta-0 overopt-beta-0.05 best-of-n

Targets (issue "ppo.py: RLHF with PPO"):
  * from the SFT start, PPO raises the mean gold reward of samples clearly, at a KL we report, in
    under 10 minutes on 2 CPU cores with the defaults (the first run: `python ppo.py`, on the
    shipped `tiny-pref` and its shipped reward model `tiny-pref-rm`);
  * over-optimisation, measured: with room to write past the lengths the reward model was trained
    on (--max-new-tokens 40) and no KL penalty (β = 0), the proxy score keeps rising while the gold
    reward peaks and falls; the same run with β = 0.05 for contrast;
  * gold reward against KL for PPO (a β sweep), DPO at its two β values, and best-of-n against the
    reward model (n = 1..64; KL = log n − (n−1)/n in closed form), in one table.

Every evaluation is the same: 500 completions for the held-out prompts, temperature 1, seed 2 (the
scripts' seed + 1), scored by the gold reward, the reward model (minus the EOS penalty, as PPO sees
it) and the KL to π_ref summed over the completion (nats). Results go to bench/results/ppo.json with
the machine's load average, and markdown tables are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {  # name: (script, extra flags)
    "default": ("ppo.py", []),
    "beta-0.1": ("ppo.py", ["--beta", "0.1"]),
    "beta-0.2": ("ppo.py", ["--beta", "0.2"]),
    "beta-0.5": ("ppo.py", ["--beta", "0.5"]),
    "adaptive-2": ("ppo.py", ["--kl-control", "adaptive", "--target-kl", "2"]),
    "ptx-1": ("ppo.py", ["--ptx-coef", "1.0"]),
    "overopt-beta-0": ("ppo.py", ["--beta", "0", "--max-new-tokens", "40", "--steps", "100",
                                  "--eval-every", "5"]),
    "overopt-beta-0.05": ("ppo.py", ["--max-new-tokens", "40", "--steps", "100", "--eval-every", "5"]),
    "dpo-beta-0.1": ("dpo.py", []),
    "dpo-beta-0.5": ("dpo.py", ["--beta", "0.5"]),
    "best-of-n": (None, []),
}


def run(name: str, out_root: Path) -> dict:
    script, extra = RUNS[name]
    out = out_root / name
    cmd = [sys.executable, script, "--out-dir", str(out), "--no-save-model", *extra]
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "kl": r["eval/kl_to_ref"], "gold": r["eval/gold_reward"],
              "score": r.get("eval/score"), "length": r["eval/mean_length"]}
             for r in rows if "eval/gold_reward" in r]
    row = {"run": name, "command": f"python {script} " + " ".join(extra),
           "process_wall_seconds": round(wall, 1), "train_seconds": s["train_seconds"],
           "load_seconds": s["load_seconds"], "load_average_before": round(load_before, 2),
           "load_average_after": round(os.getloadavg()[0], 2),
           "start_gold_reward": s["start_gold_reward"], "final_gold_reward": s["final_gold_reward"],
           "kl_to_ref": s["kl_to_ref"], "final_mean_length": s["final_mean_length"],
           "examples_after": s["examples_after"], "curve": curve}
    if script == "ppo.py":
        row.update(start_score=s["start_score"], final_score=s["final_score"], final_beta=s["final_beta"])
        if "ptx" in name:  # how far the SFT likelihood moved: the last logged PPO-ptx loss
            row["final_ptx_nll"] = [r["loss/ptx"] for r in rows if "loss/ptx" in r][-1]
    print(f"{name:18} gold {s['start_gold_reward']:+.3f} -> {s['final_gold_reward']:+.3f}  "
          f"KL {s['kl_to_ref']:.2f}  " + (f"score {s['start_score']:+.3f} -> {s['final_score']:+.3f}  "
                                          if script == "ppo.py" else "")
          + f"wall {wall:.0f}s (load {load_before:.1f})", flush=True)
    return row


def best_of_n(ns=(1, 2, 4, 8, 16, 32, 64), n_prompts: int = 500, seed: int = 2) -> dict:
    """Best-of-n against the reward model: for each held-out prompt, sample max(ns) completions from
    the SFT policy, and for each n keep the best-scored of the first n. The KL of the best-of-n
    policy to π_SFT is log n − (n−1)/n (Stiennon et al. 2020, appendix; exact when the n scores are
    distinct). Scores are the reward model's minus the EOS penalty of ppo.py's default."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    import common

    import tasks
    import ppo

    t0 = time.time()
    args = ppo.Args()
    torch.manual_seed(seed)
    device = torch.device("cpu")
    policy, tok = common.load_model("tiny-pref", device, trainable=False)
    rm_path = ppo.default_reward_model(args, None)  # the shipped tiny-pref-rm
    rm, _ = tasks.load_reward_model(rm_path, device)
    _, heldout = tasks.load_preferences(None)
    prompts = [heldout[i % len(heldout)]["prompt"] for i in range(n_prompts)]
    N = max(ns)
    scores, golds = np.zeros((n_prompts, N)), np.zeros((n_prompts, N))
    with torch.no_grad():
        for k in range(N):  # one completion per prompt per pass
            p_ids, p_mask, c_ids, c_mask, texts, fin = common.generate_text(policy, tok, prompts,
                                                                            args.max_new_tokens)
            ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
            s = rm(ids, mask) - args.missing_eos_penalty * (~torch.tensor(fin)).float()  # [n_prompts]
            scores[:, k] = s.numpy()
            golds[:, k] = [tasks.gold_reward(t) for t in texts]
    rows = []
    for n in ns:
        best = scores[:, :n].argmax(1)  # [n_prompts]
        rows.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                     "gold": float(golds[np.arange(n_prompts), best].mean()),
                     "score": float(scores[np.arange(n_prompts), best].mean())})
        print(f"best-of-{n:<3} KL {rows[-1]['kl']:.3f}  gold {rows[-1]['gold']:+.3f}  "
              f"score {rows[-1]['score']:+.3f}", flush=True)
    return {"run": "best-of-n", "rows": rows, "seconds": round(time.time() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo.json"),
                    help="where to write the results (JSON)")
    a = ap.parse_args()
    names = a.only or list(RUNS)
    out_root = Path(tempfile.mkdtemp(prefix="bench_ppo_runs_"))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpus": os.cpu_count(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "uptime_before": uptime,
               "rows": []}
    for name in names:
        results["rows"].append(best_of_n() if name == "best-of-n" else run(name, out_root))
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}\n")
    print_tables(results)


def print_tables(results: dict) -> None:
    rows = {r["run"]: r for r in results["rows"]}
    print("| method | setting | KL to π_ref (nats) | gold reward | proxy score |")
    print("| --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        if r["run"] == "best-of-n":
            for b in r["rows"]:
                print(f"| best-of-n | n = {b['n']} | {b['kl']:.2f} | {b['gold']:+.2f} | {b['score']:+.2f} |")
        elif not r["run"].startswith("overopt"):
            print(f"| {r['command'].split()[1].removesuffix('.py').upper()} | `{r['command']}` | "
                  f"{r['kl_to_ref']:.2f} | {r['final_gold_reward']:+.2f} | "
                  + (f"{r['final_score']:+.2f} |" if "final_score" in r else "– |"))
    for name in ("overopt-beta-0", "overopt-beta-0.05"):
        if name in rows:
            print(f"\n{name}: `{rows[name]['command']}`\n\n| step | KL | proxy score | gold reward | length |")
            print("| --- | --- | --- | --- | --- |")
            for c in rows[name]["curve"]:
                print(f"| {c['step']} | {c['kl']:.1f} | {c['score']:+.2f} | {c['gold']:+.2f} | {c['length']:.1f} |")


if __name__ == "__main__":
    main()
