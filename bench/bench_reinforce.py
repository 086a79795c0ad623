"""Benchmark of reinforce.py: does the default run learn, and what does each Ψ_t do to the variance
of the policy-gradient estimator ĝ?

1. Training runs. `python reinforce.py --seed S --steps N` for each Ψ variant and seed, every
   other flag at its default (so the `rloo` rows are the default configuration):
       return        --psi return       --baseline none    Ψ_t = R(τ)        (notes 002 §4.4, 1.)
       reward-to-go  --psi reward-to-go --baseline none    Ψ_t = G_t         (2.)
       mean          --psi reward-to-go --baseline mean    Ψ_t = G_t − mean R over the batch (3.)
       rloo          --psi reward-to-go --baseline rloo    Ψ_t = G_t − the mean R of the other K−1
       value         --psi reward-to-go --baseline value   Ψ_t = G_t − V_ψ(s_t), a learned linear head
   It reports the held-out greedy accuracy before and after, the wall time, and the run's averages
   of `policy/grad_var` (the split-half estimate of tr Cov(ĝ)) and `psi/second_moment` (E[Ψ²]).
   Claim checked: every default (`rloo`) run gains ≥ --min-gain accuracy in < --time-limit seconds.
2. Paired variance at a fixed θ. The runs above move θ along different paths, so their variances
   are measured at different policies. Here θ is held fixed (the embedded start, and the policy
   trained by the first `rloo` run, with π_ref = the start): --probe-batches batches are sampled
   once, and ĝ is computed from the SAME samples with each Ψ. tr Cov(ĝ) is measured across the
   batches. This is the notes' claim (004, "REINFORCE": same expectation, lower variance), measured.
   For `value` at a fixed θ there is no trained head, so the head is fitted first, by least squares
   (the exact minimiser of the MSE to G_t) on --fit-batches batches of its own, not reused.

    python bench/bench_reinforce.py                          # 2 seeds, default budget, 1 run at a time
    python bench/bench_reinforce.py --seeds 1 --jobs 2 --threads 1    # two runs at once, 1 thread each
    python bench/bench_reinforce.py --probe-batches 0 --threads 1 --variants value \
        --out bench/results/reinforce_value.json      # only the learned-baseline row, training runs only

Writes the numbers to --out (JSON) and prints Markdown tables. Exit code 1 when a default run
misses the claim (checked only when --steps and --extra are left at their defaults).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (needs sys.path above)

import harness  # noqa: E402

import tasks  # noqa: E402
import reinforce  # noqa: E402
from common import check  # noqa: E402
from harness import main  # noqa: E402

VARIANTS = {  # name: (--psi, --baseline)
    "return": ("return", "none"),
    "reward-to-go": ("reward-to-go", "none"),
    "mean": ("reward-to-go", "mean"),
    "rloo": ("reward-to-go", "rloo"),
    "value": ("reward-to-go", "value"),
}


@dataclass
class Args:
    seeds: str = "1,2"
    """comma-separated seeds; every variant runs once per seed (the same seeds for all)"""
    steps: int = reinforce.Args.steps
    """the fixed budget of every training run (default: reinforce.py's default, so rloo = default)"""
    variants: str = ",".join(VARIANTS)
    """comma-separated Ψ variants to run: return, reward-to-go, mean, rloo, value"""
    jobs: int = 1
    """training runs at once (1: each run has the whole machine, as the time claim assumes)"""
    threads: int = 0
    """torch threads per run (the scripts' --threads); 0 leaves the scripts' default (1 for tiny)"""
    probe_batches: int = 48
    """batches (of prompts_per_step × K, the defaults) sampled at each fixed θ; 0 skips part 2"""
    fit_batches: int = 8
    """batches, beside the probe batches, on which the `value` head is fitted at each fixed θ"""
    min_gain: float = 0.15
    """accuracy gain (held-out, greedy) that every default run must reach"""
    time_limit: float = 600.0
    """seconds one whole default run (process start to exit) may take"""
    out: str = "bench/results/reinforce.json"
    """where the JSON results go (relative to the repo root)"""
    extra: str = ""
    """extra flags passed to every reinforce.py run (the claims are for the defaults)"""


def run_one(name: str, seed: int, steps: int, extra: list[str], out: Path, threads: int) -> dict:
    psi, baseline = VARIANTS[name]
    cmd = [sys.executable, "reinforce.py", "--seed", str(seed), "--steps", str(steps), "--psi", psi,
           "--baseline", baseline, "--out-dir", str(out), "--log-every", "1000000", *extra]
    cmd += ["--threads", str(threads)] if threads else []  # 0: the scripts' own default
    env = dict(os.environ)
    log_path = out.parent / f"{out.name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own CPU time, whatever else runs
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    check(p.returncode == 0,
          f"{' '.join(cmd)} failed:\n{log_path.read_text().strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r["step"] > 0]
    curve = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    return {
        "variant": name, "seed": seed, "psi": psi, "baseline": baseline,
        "start_accuracy": summary["start_accuracy"], "final_accuracy": summary["final_accuracy"],
        "gain": summary["final_accuracy"] - summary["start_accuracy"],
        "process_seconds": round(wall, 1), "wall_seconds": summary["wall_seconds"],
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "mean_grad_var": float(np.mean([r["policy/grad_var"] for r in steps_rows])),
        "mean_psi_second_moment": float(np.mean([r["psi/second_moment"] for r in steps_rows])),
        "mean_reward": float(np.mean([r["reward/mean"] for r in steps_rows])),
        "final_kl_ref": steps_rows[-1].get("kl/ref"),
        "accuracy_curve": curve, "model_dir": summary["model_dir"], "threads": summary["threads"],
    }


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def paired_variance(model_path, ref_path, names: list[str], batches: int, seed: int,
                    norm_batches: int = 4, fit_batches: int = 8) -> dict:
    """tr Cov(ĝ) of each Ψ variant at a fixed θ, from the same `batches` batches of samples.

    On the first `norm_batches` batches it also measures ‖∇log π(y|x)‖² of every completion, split
    by its score, and the constant baseline that would minimise E[‖∇log π(y|x)‖² (R − b)²]:
        b* = E[‖∇log π‖² R] / E[‖∇log π‖²]
    (a baseline lowers the variance of ĝ only when it is near b*, not near the mean of R)."""
    a = reinforce.Args()  # the defaults: prompts, K, β, γ, temperature
    harness.seed_everything(seed)
    device = torch.device("cpu")
    policy, tok = common.load_model(str(model_path), device)
    policy.eval()
    ref = common.load_model(str(ref_path), device, trainable=False)[0]
    params = [p for p in policy.parameters() if p.requires_grad]
    train_rows, _ = tasks.load_task(None)
    rng = np.random.default_rng(seed)
    K = a.samples_per_prompt
    grads = {n: [] for n in names}
    second = {n: [] for n in names}
    sq_norms, sq_scores = [], []
    fit_x, fit_y, w = [], [], None  # the value head's least-squares fit: [h_t, 1] -> G_t
    first = -fit_batches if "value" in names else 0
    for batch in range(first, batches):
        rows = [train_rows[i] for i in rng.choice(len(train_rows), a.prompts_per_step, replace=False)]
        prompts = [r["prompt"] for r in rows for _ in range(K)]
        answers = [r["answer"] for r in rows for _ in range(K)]
        p_ids, p_mask, c_ids, c_mask, texts, finished = common.generate_text(
            policy, tok, prompts, a.max_new_tokens, a.temperature)  # [B, T]
        ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
        T = c_ids.shape[1]
        scores = torch.tensor([tasks.score(t, y, f) for t, y, f in zip(texts, answers, finished)])  # [B]
        logp, _ = common.token_logprobs(policy, ids, mask, T, a.temperature)  # [B, T]
        with torch.no_grad():
            ref_logp, _ = common.token_logprobs(ref, ids, mask, T, a.temperature)  # [B, T]
        rewards = reinforce.per_token_rewards(scores, c_mask, logp.detach() - ref_logp, a.beta)  # [B, T]
        values = None
        if "value" in names:
            h = reinforce.state_features(policy, ids, mask, T)  # h_t   [B, T, d]
            x = torch.cat([h, torch.ones_like(h[..., :1])], -1)  # [h_t, 1]   [B, T, d+1]
            if batch < 0:  # a fitting batch: keep (x, G_t) of its completion tokens, and go on
                fit_x.append(x[c_mask.bool()])  # [n, d+1]
                fit_y.append(reinforce.reward_to_go(rewards, c_mask, a.gamma)[c_mask.bool()])  # [n]
                continue
            if w is None:  # argmin_w Σ (x·w − G)², a tiny ridge for rank deficiency
                X, y = torch.cat(fit_x).double(), torch.cat(fit_y).double()
                w = torch.linalg.solve(X.T @ X + 1e-6 * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y).float()
            values = x @ w  # V(s_t) = w·[h_t, 1]   [B, T]
        for n in names:
            psi_kind, baseline = VARIANTS[n]
            psi = reinforce.psi_values(rewards, c_mask, a.gamma, psi_kind, baseline, K, values)  # [B, T]
            loss, m = reinforce.reinforce_loss(logp, psi, c_mask)
            grads[n].append(-flat(torch.autograd.grad(loss, params, retain_graph=True)))  # ĝ
            second[n].append(float(m["psi_second_moment"]))
        if batch < norm_batches:
            seq_logp = common.masked_sum(logp, c_mask, dim=1)  # log π(y|x)   [B]
            for i in range(len(seq_logp)):
                s_i = flat(torch.autograd.grad(seq_logp[i], params, retain_graph=True))  # ∇log π(y_i|x_i)
                sq_norms.append(float(s_i.pow(2).sum()))
                sq_scores.append(float(scores[i]))
    out = {}
    for n in names:
        G = torch.stack(grads[n])  # [batches, P]
        mean = G.mean(0)  # the estimate of E[ĝ]
        out[n] = {"trace_cov": float(((G - mean) ** 2).sum() / (len(G) - 1)),  # tr Cov(ĝ)
                  "mean_grad_norm": float(mean.norm()),
                  "psi_second_moment": float(np.mean(second[n]))}
    sq, R = np.array(sq_norms), np.array(sq_scores)
    out["score_norms"] = {
        "completions": len(sq), "mean_score": float(R.mean()),
        "mean_sq_norm_right": float(sq[R == 1].mean()) if (R == 1).any() else None,
        "mean_sq_norm_wrong": float(sq[R == 0].mean()) if (R == 0).any() else None,
        "optimal_constant_baseline": float((sq * R).sum() / sq.sum()),
    }
    return out


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def bench(args: Args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    for n in names:
        check(n in VARIANTS, f"--variants: unknown variant {n!r}; expected {', '.join(VARIANTS)}")
    check(args.jobs >= 1 and args.steps >= 1, "--jobs and --steps must be ≥ 1")
    extra = args.extra.split()
    t_start = time.time()
    load_start = load()
    cmd = "python bench/bench_reinforce.py " + " ".join(sys.argv[1:])
    print(f"# reinforce.py benchmark: {os.cpu_count()} CPUs, load average {load_start} at start, "
          f"{args.jobs} run(s) at a time, {args.threads or 'default'} thread(s) each, "
          f"budget {args.steps} steps, seeds {seeds}\n", flush=True)

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        futures = [pool.submit(run_one, n, s, args.steps, extra, Path(tmp) / f"{n}_s{s}", args.threads)
                   for s in seeds for n in names]
        print("| variant | seed | start acc | final acc | gain | run s | CPU s | mean tr Cov(ĝ) in run "
              "| mean E[Ψ²] |")
        print("|---|---|---|---|---|---|---|---|---|")
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"| {r['variant']} | {r['seed']} | {r['start_accuracy']:.3f} | {r['final_accuracy']:.3f} "
                  f"| {100 * r['gain']:+.1f} | {r['process_seconds']:.0f} | {r['cpu_seconds']:.0f} "
                  f"| {r['mean_grad_var']:.3g} "
                  f"| {r['mean_psi_second_moment']:.3f} |", flush=True)
        pool.shutdown()

        print("\n| variant | mean final acc | mean gain (points) | mean tr Cov(ĝ) in run | mean E[Ψ²] |")
        print("|---|---|---|---|---|")
        table = {}
        for n in names:
            rs = [r for r in results if r["variant"] == n]
            table[n] = {k: float(np.mean([r[k] for r in rs]))
                        for k in ("final_accuracy", "gain", "mean_grad_var", "mean_psi_second_moment")}
            t = table[n]
            print(f"| {n} | {t['final_accuracy']:.3f} | {100 * t['gain']:+.1f} | {t['mean_grad_var']:.3g} "
                  f"| {t['mean_psi_second_moment']:.3f} |")

        paired = {}
        if args.probe_batches > 1:
            start = str(common.MODELS_DIR / "tiny")
            thetas = {"start (π_θ = π_ref)": start}
            trained = [r for r in results if r["variant"] == "rloo" and r["seed"] == seeds[0]]
            if trained and trained[0]["model_dir"]:
                thetas[f"after the rloo run, seed {seeds[0]}"] = trained[0]["model_dir"]
            for label, path in thetas.items():
                t0 = time.time()
                paired[label] = paired_variance(path, start, names, args.probe_batches, seed=seeds[0],
                                                fit_batches=args.fit_batches)
                norms = paired[label].pop("score_norms")
                base = paired[label].get("rloo", next(iter(paired[label].values())))["trace_cov"]
                print(f"\nPaired, θ fixed at {label}: {args.probe_batches} batches of "
                      f"{reinforce.Args.prompts_per_step}×{reinforce.Args.samples_per_prompt}, every Ψ on the "
                      f"same samples ({time.time() - t0:.0f} s)\n")
                print("| variant | tr Cov(ĝ) | relative to rloo | ‖mean ĝ‖ | E[Ψ²] |")
                print("|---|---|---|---|---|")
                for n, v in paired[label].items():
                    print(f"| {n} | {v['trace_cov']:.4g} | {v['trace_cov'] / base:.2f} | "
                          f"{v['mean_grad_norm']:.3g} | {v['psi_second_moment']:.3f} |")
                print(f"\n‖∇log π(y|x)‖² over {norms['completions']} completions: right answers "
                      f"{norms['mean_sq_norm_right']:.3g}, wrong answers {norms['mean_sq_norm_wrong']:.3g}; "
                      f"mean score {norms['mean_score']:.3f}, variance-minimising constant baseline "
                      f"b* = E[‖∇log π‖² R]/E[‖∇log π‖²] = {norms['optimal_constant_baseline']:.3f}")
                paired[label]["score_norms"] = norms

    failures = []
    default = [r for r in results if r["variant"] == "rloo"]
    is_default = args.steps == reinforce.Args.steps and not extra
    for r in default if is_default else []:  # the claim is about the default configuration
        if r["gain"] < args.min_gain:
            failures.append(f"rloo seed {r['seed']}: gain {100 * r['gain']:+.1f} points < {100 * args.min_gain:.0f}")
        if r["process_seconds"] > args.time_limit:
            failures.append(f"rloo seed {r['seed']}: {r['process_seconds']:.0f} s > {args.time_limit:.0f} s")
    load_end = load()
    record = {"command": cmd, "cpus": os.cpu_count(), "load_average_start": load_start,
              "load_average_end": load_end, "bench_seconds": round(time.time() - t_start, 1),
              "args": asdict(args), "runs": [{k: v for k, v in r.items() if k != "model_dir"} for r in results], "table": table, "paired": paired,
              "default_claim": {"checked_on_default_config": is_default, "failures": failures},
              "torch": torch.__version__}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    print(f"\nload average at the end {load_end}; {time.time() - t_start:.0f} s in all; results in {out}")
    if not is_default:
        print("not checked: --steps or --extra differ from the defaults, so no rloo row is the default run")
    elif not default:
        print("not checked: --variants leaves out rloo, the default configuration")
    else:
        print("\n".join(["FAIL: " + f for f in failures]) or
              f"PASS: every rloo run gained ≥ {100 * args.min_gain:.0f} points in < {args.time_limit:.0f} s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main(Args, bench, __doc__)
