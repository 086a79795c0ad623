"""Side by side with TRL: `grpo.py` and TRL's `GRPOTrainer` on the same model, task and settings.
Run by hand (not in CI), in a separate virtual environment (TRL is a bench-only dependency):

    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -r requirements.txt -r bench/requirements.txt
    HF_HUB_OFFLINE=1 bench/.venv/bin/python bench/bench_trl_grpo.py        # both runs, ~9 min
    HF_HUB_OFFLINE=1 bench/.venv/bin/python bench/bench_trl_grpo.py --seed 2 --out bench/results/trl_grpo_seed2.json
    HF_HUB_OFFLINE=1 bench/.venv/bin/python bench/bench_trl_grpo.py --profile --steps 300   # where a step goes

(`torch==2.13.0` is the CPU build that pip finds on this machine's disk; check that the second
command does not upgrade it.) The two systems run one after the other, each in its own child
process of this script, with the same torch thread count (`--threads`, default 1, also set as
OMP_NUM_THREADS). Results: bench/results/trl_grpo.json and .md, and the table printed at the end.

What is the same in both runs (TRL's name in brackets):
    model           the embedded `tiny` (models/tiny), fp32, loaded with common.load_model
    task            tasks.arithmetic_task(): 9,500 train prompts, the same 500 held out
    reward          tasks.score(completion, answer, finished, strict=True)
    G               8 completions per prompt                     [num_generations=8]
    prompts/step    16, so 128 completions per optimiser step    [per_device_train_batch_size=128,
                                                                  gradient_accumulation_steps=1]
    max tokens      4                                            [max_completion_length=4]
    sampling        temperature 1, no top-k/top-p                [temperature=1.0, top_k=0, top_p=1]
    μ               1                                            [num_iterations=1]
    ε               0.2 (both bounds)                            [epsilon=0.2]
    β               0: no reference model in either              [beta=0.0]
    advantage       (r − mean) / (std + 1e-4), Bessel std        [scale_rewards="group"]
    loss            seq-mean: 1/|y_i| Σ_t per completion, then   [loss_type="grpo"; TRL 1.16's
                    the mean over completions                     default is "dapo" = token-mean]
    optimiser       torch AdamW(lr 3e-4, weight_decay 0), grad-norm clip 1.0 [max_grad_norm=1.0]
    schedule        linear warm-up over 20 steps, (s+1)/21, then linear decay to 0 at the last
                    step: TRL gets the very same LambdaLR through `optimizers=(opt, sched)`
                    (HF's own "linear" schedule would start at lr 0 and differ by one step)
    steps           --steps (default 2000 = grpo.py's default), the schedule spans them
    TRL extras off  report_to="none", use_cpu, bf16/fp16 off, activation checkpointing off (TRL's
                    GRPOConfig turns it on by default; grpo.py does not recompute activations),
                    dataloader_num_workers=0, no checkpoints, no tqdm, logging every 10 steps
                    (TRL's default) to the child's stdout

Both runs start from one grpo.Args (`bench_args`): grpo.py trains it, and the TRL run is the code
path of `bench/to_trl.py grpo.py`: its config is `to_trl.grpo_fields(args)` (only the logging
differs: every 10 steps, no tqdm) and its trainer `to_trl.build_grpo` (model, data, reward, AdamW
and the exact LambdaLR).

How TRL's reward function knows `finished` (EOS emitted within 4 tokens): TRL 1.16 passes
`completion_ids` to reward functions, each row cut just after its first EOS (the same rule as
common.completion_mask). So `finished = ids[-1] == eos_id`; the text TRL passes is the same
`batch_decode(..., skip_special_tokens=True)` that common.generate_text makes.

Timing. Held-out greedy accuracy (tasks.greedy_accuracy on all 500 held-out prompts,
max_new_tokens=4, strict) is measured on both every --eval-every steps; its time is excluded from
both clocks. grpo.py runs in-process (`grpo.train(grpo.Args(...))`), with tasks.greedy_accuracy
wrapped by a timer (grpo.py is not modified); the clock starts when the start evaluation returns,
which is where grpo.py starts its training loop. TRL's clock starts at the `on_train_begin`
callback and evaluations run in `on_step_end`. Model loading and trainer construction are outside
both clocks (the JSON keeps them as setup_seconds; they are not comparable: grpo.py's includes
importing transformers, which the TRL child has done before its clock). CPU seconds
(time.process_time, evaluations excluded alike) are reported beside wall seconds: on this shared
machine they vary less with the other jobs.

Differences that remain: the two draw different random prompts and samples (same seed number,
different random streams), so one seed's curve is one draw: compare several seeds (--seed). TRL
generates with HF `generate` while grpo.py uses its own KV-cache loop (both sample from the same
softmax(logits / T)), and TRL scores the completions with its fused LM head (log-probs computed in
tiles, without the full logits) and without position ids (harmless: RoPE sees only relative
positions, and left padding shifts all of a row's positions alike).

--profile times the parts of a step of both systems (sampling, of which the generation loop,
reward, log-prob forward + loss, backward, optimiser step, the rest) by wrapping the functions
that do them (common.generate_text, common.generate, tasks.score, common.token_logprobs,
grpo.grpo_loss; GRPOTrainer._generate, GenerationMixin.generate, GRPOTrainer._calculate_rewards,
GRPOTrainer._compute_loss; torch's Tensor.backward and optimiser step hooks for both) and writes
<out>_profile.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # to_trl

P, G, MAX_NEW, LR, WARMUP, EPS = 16, 8, 4, 3e-4, 20, 0.2  # grpo.py's defaults


def bench_args(a):
    """The settings of both runs, as grpo.py's Args: grpo.py trains them, and bench/to_trl.py turns
    the very same Args into TRL's GRPOConfig (the code path of `bench/to_trl.py grpo.py`)."""
    import grpo
    out = Path(tempfile.mkdtemp(prefix="bench_trl_grpo_")) / "run"
    return grpo.Args(
        model="tiny", steps=a.steps, prompts_per_step=P, group_size=G, max_new_tokens=MAX_NEW,
        temperature=1.0, lr=LR, warmup_steps=WARMUP, lr_schedule="linear", mu=1, epsilon=EPS,
        beta=0.0, loss_agg="seq-mean", scale_rewards=True, grad_clip=1.0, seed=a.seed,
        eval_every=a.eval_every, eval_size=500, log_every=a.eval_every * 10, save_model=False,
        out_dir=str(out), device="cpu")


#####################################################################################################
#####  --profile: where each system spends a training step
#####################################################################################################

PROFILE: dict[str, float] = {}  # category -> seconds, summed over the training steps
IN_EVAL = [False]  # evaluations are not part of a step


def _timer(category: str, fn):
    def timed(*args, **kw):
        if IN_EVAL[0]:
            return fn(*args, **kw)
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            PROFILE[category] = PROFILE.get(category, 0.0) + time.perf_counter() - t
    return timed


def install_timers(system: str) -> None:
    """Wrap the parts of a step in timers (the code of neither system changes). Shared by both:
    torch's backward pass and the optimiser step (global optimiser hooks)."""
    import torch
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)
    torch.Tensor.backward = _timer("backward", torch.Tensor.backward)
    starts = []
    register_optimizer_step_pre_hook(lambda *a: starts.append(time.perf_counter()))

    def post(*a):
        if not IN_EVAL[0]:
            PROFILE["optimiser step"] = PROFILE.get("optimiser step", 0.0) + time.perf_counter() - starts.pop()
    register_optimizer_step_post_hook(post)
    if system == "grpo.py":
        import common
        import tasks
        import grpo
        common.generate_text = _timer("sampling: tokenize, generate, decode", common.generate_text)
        common.generate = _timer("  of which the generation loop", common.generate)
        tasks.score = _timer("reward", tasks.score)
        common.token_logprobs = _timer("log-prob forward + loss", common.token_logprobs)
        grpo.grpo_loss = _timer("log-prob forward + loss", grpo.grpo_loss)
    else:
        from transformers.generation.utils import GenerationMixin
        from trl import GRPOTrainer
        GRPOTrainer._generate = _timer("sampling: tokenize, generate, decode", GRPOTrainer._generate)
        GenerationMixin.generate = _timer("  of which the generation loop", GenerationMixin.generate)
        GRPOTrainer._calculate_rewards = _timer("reward", GRPOTrainer._calculate_rewards)
        GRPOTrainer._compute_loss = _timer("log-prob forward + loss", GRPOTrainer._compute_loss)


def profile_table(res: dict) -> str:
    cats = ["sampling: tokenize, generate, decode", "  of which the generation loop", "reward",
            "log-prob forward + loss", "backward", "optimiser step"]
    rows = ["| part of a step (ms per step) | grpo.py | TRL GRPOTrainer |", "| --- | --- | --- |"]
    per = {k: {c: 1000 * v.get(c, 0.0) / res[k]["steps"] for c in cats} for k, v in
           ((k, res[k]["profile"]) for k in ("grpo.py", "TRL"))}
    tot = {k: 1000 * res[k]["train_seconds"] / res[k]["steps"] for k in ("grpo.py", "TRL")}
    for c in cats:
        rows.append(f"| {c.strip() if not c.startswith('  ') else '&nbsp;&nbsp;' + c.strip()} | "
                    f"{per['grpo.py'][c]:.1f} | {per['TRL'][c]:.1f} |")
    other = {k: tot[k] - sum(v for c, v in per[k].items() if not c.startswith("  ")) for k in tot}
    rows.append(f"| everything else (data, advantages, bookkeeping, logging, clipping, ...) | "
                f"{other['grpo.py']:.1f} | {other['TRL']:.1f} |")
    rows.append(f"| **whole step** | **{tot['grpo.py']:.1f}** | **{tot['TRL']:.1f}** |")
    return "\n".join(rows)


#####################################################################################################
#####  the two runs (each in its own child process)
#####################################################################################################


def run_ours(a) -> dict:
    import tasks
    import grpo

    evals = []  # (start, seconds, accuracy, CPU start, CPU seconds) of every greedy_accuracy call
    plain = tasks.greedy_accuracy

    def timed(*args, **kw):
        t, c = time.perf_counter(), time.process_time()
        IN_EVAL[0] = True
        acc = plain(*args, **kw)
        IN_EVAL[0] = False
        evals.append((t, time.perf_counter() - t, acc, c, time.process_time() - c))
        return acc
    tasks.greedy_accuracy = timed  # grpo.evaluate() looks it up through the module at call time

    args = bench_args(a)
    out = Path(args.out_dir)
    t_setup = time.perf_counter()
    summary = grpo.train(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in rows if "eval/accuracy" in r]
    assert len(eval_steps) == len(evals), (eval_steps, len(evals))
    t0 = evals[0][0] + evals[0][1]  # the training loop starts when the start evaluation returns
    c0 = evals[0][3] + evals[0][4]
    curve, spent, spent_cpu = [], 0.0, 0.0
    for step, (t, dt, acc, c, dc) in zip(eval_steps, evals):
        curve.append({"step": step, "train_seconds": 0.0 if step == 0 else t - t0 - spent,
                      "train_cpu_seconds": 0.0 if step == 0 else c - c0 - spent_cpu, "accuracy": acc})
        if step > 0:
            spent += dt
            spent_cpu += dc
    steps_rows = [r for r in rows if "time/step_seconds" in r]
    return {"system": "grpo.py", "curve": curve, "train_seconds": curve[-1]["train_seconds"],
            "train_cpu_seconds": curve[-1]["train_cpu_seconds"],
            "eval_seconds": spent, "setup_seconds": evals[0][0] - t_setup,
            "generate_seconds": sum(r["time/generate_seconds"] for r in steps_rows),
            "sum_step_seconds": sum(r["time/step_seconds"] for r in steps_rows),
            "mean_reward": sum(r["reward/mean"] for r in steps_rows) / len(steps_rows),
            "summary_train_seconds": summary["train_seconds"]}


def run_trl(a) -> dict:
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig


    import tasks
    import to_trl

    t_setup = time.perf_counter()
    args = bench_args(a)
    train_rows, heldout = tasks.arithmetic_task()
    # the mapping of bench/to_trl.py; the bench logs every 10 steps to the child's stdout, no tqdm
    cfg = GRPOConfig(**{**to_trl.grpo_fields(args), "logging_steps": 10, "disable_tqdm": True})

    class Clock(TrainerCallback):
        def __init__(self):
            self.curve, self.spent, self.spent_cpu, self.t0, self.c0, self.lrs = [], 0.0, 0.0, None, None, {}

        def evaluate(self, step, mdl):
            t, c = time.perf_counter(), time.process_time()
            IN_EVAL[0] = True
            acc = tasks.greedy_accuracy(mdl, trainer.processing_class, heldout, max_new_tokens=MAX_NEW, strict=True)
            IN_EVAL[0] = False
            dt, dc = time.perf_counter() - t, time.process_time() - c
            train = 0.0 if step == 0 else t - self.t0 - self.spent
            train_cpu = 0.0 if step == 0 else c - self.c0 - self.spent_cpu
            if step > 0:
                self.spent += dt
                self.spent_cpu += dc
            self.curve.append({"step": step, "train_seconds": train, "train_cpu_seconds": train_cpu,
                               "accuracy": acc})
            print(f"[trl] step {step:5d}  held-out accuracy {acc:.3f}  train {train:7.1f}s  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.evaluate(0, model)  # before the clock starts, like grpo.py's start evaluation
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            s = state.global_step
            if s in (1, WARMUP, a.steps // 2):
                self.lrs[s] = optimizer.param_groups[0]["lr"]  # the lr after the step: checks the schedule
            if s % a.eval_every == 0 or s == a.steps:
                self.evaluate(s, model)

    clock = Clock()
    trainer = to_trl.build_grpo(args, cfg, train_rows, heldout, callbacks=[clock])
    assert trainer.loss_type == "grpo" and trainer.beta == 0.0 and trainer.num_iterations == 1
    setup = time.perf_counter() - t_setup
    trainer.train()
    ours_lr = to_trl.lr_factor_fn(a.steps, WARMUP)
    for s, lr in clock.lrs.items():  # the same schedule as grpo.py: lr after step s is f(s) · LR
        assert abs(lr - LR * ours_lr(s)) < 1e-12, (s, lr, LR * ours_lr(s))
    return {"system": "TRL", "trl": trl.__version__, "curve": clock.curve,
            "train_seconds": clock.curve[-1]["train_seconds"], "eval_seconds": clock.spent,
            "train_cpu_seconds": clock.curve[-1]["train_cpu_seconds"],
            "setup_seconds": setup}


#####################################################################################################
#####  the comparison
#####################################################################################################


def first_reach(curve, target=0.90):
    return next((c for c in curve if c["accuracy"] >= target), None)


def acc_at_time(curve, t):
    """The accuracy of the last evaluation made at or before train time t."""
    return [c for c in curve if c["train_seconds"] <= t + 1e-9][-1]


def compare(ours: dict, trl: dict, steps: int) -> tuple[dict, str]:
    B = P * G
    so, st = ours["train_seconds"] / steps, trl["train_seconds"] / steps
    rows = [("seconds per step (evaluation excluded)", f"{so:.4f}", f"{st:.4f}", f"{st / so:.2f}× faster"),
            ("completions per second", f"{B / so:.0f}", f"{B / st:.0f}", f"{st / so:.2f}×")]
    co_, ct_ = ours["train_cpu_seconds"] / steps, trl["train_cpu_seconds"] / steps
    rows.append(("CPU seconds per step (process time; less sensitive to other jobs)", f"{co_:.4f}",
                 f"{ct_:.4f}", f"{ct_ / co_:.2f}× less"))
    by_step_t = {c["step"]: c for c in trl["curve"]}
    marks = [s for s in (0, steps // 8, steps // 4, steps // 2, 3 * steps // 4, steps)]
    for s in sorted(set(marks)):
        co = next((c for c in ours["curve"] if c["step"] == s), None)
        ct = by_step_t.get(s)
        if co and ct:
            rows.append((f"held-out accuracy at step {s}", f"{co['accuracy']:.3f}", f"{ct['accuracy']:.3f}",
                         f"{co['accuracy'] - ct['accuracy']:+.3f}"))
    t_end = min(ours["train_seconds"], trl["train_seconds"])  # the faster run's whole budget
    for frac in (0.25, 0.5, 1.0):
        t = frac * t_end
        co, ct = acc_at_time(ours["curve"], t), acc_at_time(trl["curve"], t)
        rows.append((f"held-out accuracy after {t:.0f} s of training", f"{co['accuracy']:.3f} (step {co['step']})",
                     f"{ct['accuracy']:.3f} (step {ct['step']})", f"{co['accuracy'] - ct['accuracy']:+.3f}"))
    ro, rt = first_reach(ours["curve"]), first_reach(trl["curve"])
    fmt = lambda r: "not reached" if r is None else f"{r['train_seconds']:.0f} s (step {r['step']})"
    ratio = (f"{ro['train_seconds'] / rt['train_seconds']:.2f} of TRL's time" if ro and rt else "—")
    rows.append(("wall time to 0.90 held-out accuracy", fmt(ro), fmt(rt), ratio))
    rows.append(("final held-out accuracy", f"{ours['curve'][-1]['accuracy']:.3f}",
                 f"{trl['curve'][-1]['accuracy']:.3f}", ""))
    rows.append(("training wall time (evaluation excluded)", f"{ours['train_seconds']:.0f} s",
                 f"{trl['train_seconds']:.0f} s", f"{trl['train_seconds'] / ours['train_seconds']:.2f}×"))
    md = ["| metric | grpo.py | TRL GRPOTrainer | grpo.py vs TRL |", "| --- | --- | --- | --- |"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    table = {"seconds_per_step": {"grpo.py": so, "TRL": st}, "speedup": st / so,
             "cpu_seconds_per_step": {"grpo.py": co_, "TRL": ct_},
             "completions_per_second": {"grpo.py": B / so, "TRL": B / st},
             "reach_0.90": {"grpo.py": ro, "TRL": rt}}
    return table, "\n".join(md)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="GRPO steps of each run (the schedule spans them)")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of both runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["grpo.py", "TRL"], help="run one system (no table)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: time the parts of a step of both systems over --steps steps "
                         "(evaluations excluded), written to <out>_profile.json/.md; try --steps 200")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trl_grpo.json"))
    ap.add_argument("--child", choices=["grpo.py", "TRL"], help=argparse.SUPPRESS)
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:  # one run, in this (child) process
        import torch
        torch.set_num_threads(a.threads)
        if a.profile:
            install_timers(a.child)
        res = (run_ours if a.child == "grpo.py" else run_trl)(a)
        res.update(threads=torch.get_num_threads(), torch=torch.__version__, steps=a.steps, profile=PROFILE)
        Path(a.child_result).write_text(json.dumps(res))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    results, info = {}, {"uptime_before": uptime(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    command = "bench/.venv/bin/python bench/bench_trl_grpo.py " + " ".join(sys.argv[1:])
    print(info["uptime_before"], flush=True)
    for system in ([a.only] if a.only else ["grpo.py", "TRL"]):
        res_file = Path(tempfile.mkdtemp(prefix="bench_trl_grpo_")) / "result.json"
        cmd = [sys.executable, __file__, "--child", system, "--child-result", str(res_file),
               "--steps", str(a.steps), "--eval-every", str(a.eval_every), "--threads", str(a.threads),
               "--seed", str(a.seed)] + (["--profile"] if a.profile else [])
        print(f"\n=== {system}: {a.steps} steps, {a.threads} thread(s)", flush=True)
        t = time.time()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        results[system] = json.loads(res_file.read_text())
        results[system]["process_wall_seconds"] = round(time.time() - t, 1)
        results[system]["uptime_after"] = uptime()
        print(results[system]["uptime_after"], flush=True)
    info["uptime_after"] = uptime()
    if a.only:
        print(json.dumps({k: v for k, v in results[a.only].items() if k != "curve"}, indent=1))
        return
    if a.profile:
        md = (f"`{command.strip()}` — {info['date']}, {a.steps} steps each, torch threads {a.threads}; "
              f"load before: {info['uptime_before'].split('load average:')[-1].strip()}, "
              f"after: {info['uptime_after'].split('load average:')[-1].strip()}\n\n"
              + profile_table(results) + "\n")
        print("\n" + md)
        out = Path(a.out).with_name(Path(a.out).stem + "_profile.json")
        out.write_text(json.dumps({**info, "command": command, "runs": results}, indent=1))
        out.with_suffix(".md").write_text(md)
        print(f"written: {out} and {out.with_suffix('.md')}")
        return
    table, md = compare(results["grpo.py"], results["TRL"], a.steps)
    head = (f"`{command.strip()}` — {info['date']}, {a.steps} steps each, torch threads {a.threads}, "
            f"TRL {results['TRL']['trl']}, torch {results['TRL']['torch']}; "
            f"load before: {info['uptime_before'].split('load average:')[-1].strip()}, "
            f"after: {info['uptime_after'].split('load average:')[-1].strip()}")
    md = head + "\n\n" + md + "\n"
    print("\n" + md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "command": command, "steps": a.steps, "threads": a.threads,
                               "seed": a.seed, "eval_every": a.eval_every, "table": table,
                               "runs": results}, indent=1))
    out.with_suffix(".md").write_text(md)
    print(f"written: {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
