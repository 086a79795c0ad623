"""Side by side with TRL: `dpo.py` and TRL's `DPOTrainer`. Run by hand (not in CI), in a separate
virtual environment (TRL is a bench-only dependency):

    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -r requirements.txt -r bench/requirements.txt
    HF_HUB_OFFLINE=1 bench/.venv/bin/python bench/bench_trl_dpo.py          # ~5 min on 2 CPU cores

Part (a), the losses. On identical random inputs (policy and reference per-token log-probs of a
chosen and a rejected completion of random lengths, float64, several β), the per-example loss of
each shared loss type is computed by `dpo.dpo_loss` and by TRL's own code, and must agree within
1e-6; so must the gradients with respect to the policy's per-token log-probs. TRL 1.16 has no
free-standing loss function: the loss lives inside `DPOTrainer._compute_loss(model, inputs)`,
which runs the model with `fused_lm_head=True` and reads `outputs.log_probs`. The bench builds one
real DPOTrainer (on `tiny-pref` and 8 pairs), sets its `loss_types`/`beta`/`label_smoothing`,
turns on `precompute_ref_logps` so that the reference log-probs come from the inputs, and calls
`_compute_loss` with a stub model whose forward returns the prepared per-token log-probs. Each
example is one call (B = 1), so the returned batch mean is that example's loss.

    ours             TRL 1.16          agree?
    sigmoid          sigmoid           yes: −log σ(βΔ), log-probs summed over the completion
    ipo              ipo               yes: (Δ − 1/(2β))², Δ of per-token averages (see below)
    hinge            hinge             yes: max(0, 1 − βΔ)
    length_norm      sigmoid_norm      yes: −log σ(βΔ), Δ of per-token averages
    reference_free   (none)            TRL 1.16 dropped it; it equals TRL's sigmoid with the
                                       reference log-probs set to 0, which is checked
    sigmoid + label_smoothing ε (cDPO) (none) TRL 1.16's sigmoid ignores label_smoothing; its
                                       "robust" loss is a different estimator (rDPO), shown

Where the two differ by definition:
  * IPO's per-token averaging. Both divide by the number of completion tokens (EOS included), but
    at different places: dpo.py averages each log-prob, (1/|y|) Σ_t log π(y_t), before the
    difference (`dpo.PER_TOKEN_AVERAGED`, `sequence_logps(average=True)`), TRL averages the
    log-ratio, (Σ_t log π − Σ_t log π_ref)/|y|. In exact arithmetic the two are equal, since both
    terms share the same |y|; in float32 they round differently (reported below), in float64
    they agree to ~1e-14. Why per-token at all: with summed log-probs the squared IPO loss grows
    with the completion's length, so β would mean different things for short and long
    completions; TRL's comment says the IPO authors confirmed the per-token form.
  * Label smoothing: dpo.py's `sigmoid` with ε is conservative DPO (cDPO),
    −(1−ε) log σ(βΔ) − ε log σ(−βΔ), the expected loss under labels flipped with probability ε
    (older TRL releases did the same in "sigmoid"). TRL 1.16 moved ε to `robust` (Chowdhury et
    al. 2024), [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε), an unbiased estimate of the clean
    loss, which has a different gradient; its `sigmoid` ignores ε.

Part (b), training throughput. TRL's DPOTrainer and dpo.py train `tiny-pref` from the SFT policy
on the built-in pairs (tasks.load_preferences(None)) with the same β 0.1, sigmoid loss, batch 32
pairs, torch AdamW(lr 3e-4, weight_decay 0), grad-norm clip 1.0, and the same LambdaLR (10 linear
warm-up steps, (s+1)/11, then linear decay to 0 at the last step: TRL gets it through
`optimizers=`), for --steps steps. Pairs per second count the training loop only: model loading,
tokenization and the reference log-probs (both precompute them once: dpo.py always does,
TRL with `precompute_ref_log_probs=True`) are setup; dpo.py's final evaluation is subtracted (its
timed `dpo.all_pair_logps`/`dpo.sample_and_score` calls). A third run is TRL with its default
`precompute_ref_log_probs=False` (a reference forward pass every step). Both final policies are
scored the same way: held-out pair accuracy of the implicit reward, `dpo.all_pair_logps` +
`dpo.implicit_reward_accuracy` over the 1,000 held-out pairs, reference = the SFT model.
Each system trains once per seed (--seeds, default 1 2 3; the seed sets the data order), the runs
interleaved so that a change in the machine's load hits all of them alike; the table gives the
median pairs per second and the mean accuracy. The time dpo.py spends tokenizing its batches
inside the step (common.encode_prompt_completion) is measured too: TRL tokenizes the data set
once, in its setup.
TRL tokenizes prompt + completion as one string; tiny-pref's word tokenizer splits on white space,
so the completions are given to TRL with a leading space, which makes TRL's token ids exactly the
ones dpo.py scores (checked on every pair). Other TRL settings: use_cpu, bf16/fp16 off,
gradient_checkpointing off (DPOConfig turns it on by default), report_to="none", no checkpoints,
dataloader_num_workers=0, logging every 10 steps.

Results: bench/results/trl_dpo.json and .md.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BETA, BATCH, LR, WARMUP = 0.1, 32, 3e-4, 10


def lr_factor_fn(steps: int, warmup: int):
    """dpo.py's schedule, step counted from 0, multiplies the lr."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return f


def trl_dataset(pairs):
    """TRL tokenizes prompt + chosen as one string: a leading space keeps the words apart."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": p["prompt"], "chosen": " " + p["chosen"],
                               "rejected": " " + p["rejected"]} for p in pairs])


def trl_config(out: str, steps: int, seed: int, precompute: bool, **kw):
    from trl import DPOConfig
    return DPOConfig(output_dir=out, max_steps=steps, seed=seed, per_device_train_batch_size=BATCH,
                     learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, beta=BETA,
                     loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                     use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                     dataloader_num_workers=0, report_to="none", save_strategy="no",
                     disable_tqdm=True, logging_steps=10, **kw)


#####################################################################################################
#####  (a) the losses on identical inputs
#####################################################################################################


def loss_agreement(n_examples: int = 64, T: int = 12, seed: int = 0) -> dict:
    import torch

    import common

    import tasks
    import dpo
    from trl import DPOTrainer

    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.manual_seed(seed)
    model, tok = common.load_model("tiny-pref", torch.device("cpu"))
    train, _ = tasks.load_preferences(None)
    trainer = DPOTrainer(model=model, args=trl_config(tempfile.mkdtemp(), 1, seed, False),
                         train_dataset=trl_dataset(train[:8]), processing_class=tok)
    trainer.precompute_ref_logps = True  # the reference log-probs come with the inputs
    trainer.model.train()

    def make_example(dtype):
        """One pair: prompt length P, completion lengths nc, nr; per-token log-probs < 0."""
        P = int(torch.randint(1, 4, ()))
        nc, nr = (int(x) for x in torch.randint(1, T + 1, (2,)))
        tok_c = -3 * torch.rand(nc, dtype=dtype) - 1e-3  # policy, chosen
        tok_r = -3 * torch.rand(nr, dtype=dtype) - 1e-3
        ref_c = -3 * torch.rand(nc, dtype=dtype) - 1e-3  # reference
        ref_r = -3 * torch.rand(nr, dtype=dtype) - 1e-3
        return P, tok_c, tok_r, ref_c, ref_r

    def trl_loss(ex, loss_type, beta, label_smoothing=0.0, zero_ref=False):
        """TRL's per-example loss and its gradient w.r.t. the policy's per-token log-probs."""
        P, tok_c, tok_r, ref_c, ref_r = ex
        L = P + max(len(tok_c), len(tok_r))
        input_ids = torch.full((2, L), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((2, L), dtype=torch.long)
        cmask = torch.zeros((2, L), dtype=torch.long)
        log_probs = torch.zeros((2, L - 1), dtype=tok_c.dtype)
        for row, t in enumerate((tok_c, tok_r)):
            n = len(t)
            input_ids[row, :P + n] = 5  # any token: the stub model ignores them
            attention[row, :P + n] = 1
            cmask[row, P:P + n] = 1
            log_probs[row, P - 1:P - 1 + n] = t  # logits at j predict the token at j + 1
        log_probs.requires_grad_(True)
        zeros = torch.zeros_like(log_probs)
        stub = lambda **kw: SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                            is_top1=zeros.bool(), aux_loss=None)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": cmask,
                  "ref_chosen_logps": torch.zeros(1, dtype=tok_c.dtype) if zero_ref else ref_c.sum()[None],
                  "ref_rejected_logps": torch.zeros(1, dtype=tok_c.dtype) if zero_ref else ref_r.sum()[None]}
        trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        trainer.beta, trainer.label_smoothing = beta, label_smoothing
        loss = trainer._compute_loss(stub, inputs, return_outputs=False)
        loss.backward()
        g = log_probs.grad
        return float(loss), torch.cat([g[0, P - 1:P - 1 + len(tok_c)], g[1, P - 1:P - 1 + len(tok_r)]])

    def our_loss(ex, loss_type, beta, label_smoothing=0.0):
        P, tok_c, tok_r, ref_c, ref_r = ex
        nc, nr = len(tok_c), len(tok_r)
        Tm = max(nc, nr)
        tl = torch.zeros((2, Tm), dtype=tok_c.dtype)
        tl[0, :nc], tl[1, :nr] = tok_c, tok_r
        tl.requires_grad_(True)
        rl = torch.zeros((2, Tm), dtype=tok_c.dtype)
        rl[0, :nc], rl[1, :nr] = ref_c, ref_r
        mask = torch.zeros((2, Tm), dtype=torch.long)
        mask[0, :nc], mask[1, :nr] = 1, 1
        avg = loss_type in dpo.PER_TOKEN_AVERAGED
        seq, ref = dpo.sequence_logps(tl, mask, avg), dpo.sequence_logps(rl, mask, avg)
        losses, _, _ = dpo.dpo_loss(seq[:1], seq[1:], ref[:1], ref[1:], beta, loss_type, label_smoothing)
        losses.sum().backward()
        return float(losses[0]), torch.cat([tl.grad[0, :nc], tl.grad[1, :nr]])

    cases = [("sigmoid", "sigmoid", {}), ("ipo", "ipo", {}), ("hinge", "hinge", {}),
             ("length_norm", "sigmoid_norm", {}), ("reference_free", "sigmoid", {"zero_ref": True})]
    betas = (0.01, 0.1, 0.5, 1.0, 5.0)
    out = {"n_examples_per_beta": n_examples, "betas": list(betas), "rows": []}
    for dtype in (torch.float64, torch.float32):
        exs = [make_example(dtype) for _ in range(n_examples)]
        for ours_name, trl_name, extra in cases:
            worst_l = worst_g = worst_rel = 0.0
            for beta in betas:
                for ex in exs:
                    lt, gt = trl_loss(ex, trl_name, beta, **extra)
                    lo, go = our_loss(ex, ours_name, beta)
                    worst_l = max(worst_l, abs(lt - lo))
                    worst_rel = max(worst_rel, abs(lt - lo) / max(1.0, abs(lo)))
                    worst_g = max(worst_g, float((gt - go).abs().max()))
            out["rows"].append({"ours": ours_name, "trl": trl_name + (" (ref log-probs 0)" if extra else ""),
                                "dtype": str(dtype).replace("torch.", ""), "max_abs_loss_diff": worst_l,
                                "max_rel_loss_diff": worst_rel, "max_abs_grad_diff": worst_g})
    # label smoothing: cDPO (ours) vs TRL's sigmoid (ignores ε) and TRL's robust (rDPO)
    exs = [make_example(torch.float64) for _ in range(n_examples)]
    eps = 0.1
    d = {"cDPO_vs_trl_sigmoid": 0.0, "cDPO_vs_trl_robust": 0.0, "trl_sigmoid_eps_vs_plain_sigmoid": 0.0}
    for ex in exs:
        lo, _ = our_loss(ex, "sigmoid", BETA, eps)
        ls, _ = trl_loss(ex, "sigmoid", BETA, eps)
        lr_, _ = trl_loss(ex, "robust", BETA, eps)
        lp, _ = our_loss(ex, "sigmoid", BETA, 0.0)
        d["cDPO_vs_trl_sigmoid"] = max(d["cDPO_vs_trl_sigmoid"], abs(lo - ls))
        d["cDPO_vs_trl_robust"] = max(d["cDPO_vs_trl_robust"], abs(lo - lr_))
        d["trl_sigmoid_eps_vs_plain_sigmoid"] = max(d["trl_sigmoid_eps_vs_plain_sigmoid"], abs(ls - lp))
    out["label_smoothing_0.1"] = d
    return out


#####################################################################################################
#####  (b) training throughput (each run in its own child process)
#####################################################################################################


def run_ours(a) -> dict:
    import dpo

    import common


    timed_calls, outside = [], [True]
    for name in ("all_pair_logps", "sample_and_score"):  # dpo.train looks them up at call time
        plain = getattr(dpo, name)

        def timed(*args, _plain=plain, _name=name, **kw):
            t = time.perf_counter()
            outside[0] = False
            r = _plain(*args, **kw)
            outside[0] = True
            timed_calls.append((_name, t, time.perf_counter() - t))
            return r
        setattr(dpo, name, timed)
    tokenize = [0.0]  # seconds spent tokenizing the training batches (dpo.pair_logps, each step)
    plain_encode = common.encode_prompt_completion

    def timed_encode(*args, **kw):
        t = time.perf_counter()
        r = plain_encode(*args, **kw)
        if outside[0]:  # a training step, not the reference log-probs or an evaluation
            tokenize[0] += time.perf_counter() - t
        return r
    common.encode_prompt_completion = timed_encode
    out = Path(tempfile.mkdtemp(prefix="bench_trl_dpo_ours_")) / "run"
    t_setup = time.perf_counter()
    s = dpo.train(dpo.Args(model="tiny-pref", beta=BETA, loss_type="sigmoid", batch_size=BATCH, lr=LR,
                           max_steps=a.steps, warmup_steps=WARMUP, grad_clip=1.0, seed=a.seed,
                           eval_every=10**9, eval_size=1000, eval_samples=1, log_every=10**9,
                           device="cpu", out_dir=str(out)))
    # the calls after training: the final evaluation (1 all_pair_logps + 1 sample_and_score)
    final_eval = sum(dt for _, _, dt in timed_calls[-2:])
    start_eval = timed_calls[2][1]  # after the reference log-probs (train, held-out): the start evaluation
    train = s["train_seconds"] - final_eval
    return {"system": "dpo.py", "train_seconds": train, "pairs_per_second": a.steps * BATCH / train,
            "setup_seconds": start_eval - t_setup, "model_dir": s["model_dir"],
            "final_eval_seconds_subtracted": final_eval, "steps": s["steps"],
            "tokenize_seconds_in_training": tokenize[0]}


def run_trl(a, precompute: bool) -> dict:
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import DPOTrainer

    import common

    import tasks

    os.environ.setdefault("TQDM_DISABLE", "1")
    t_setup = time.perf_counter()
    model, tok = common.load_model("tiny-pref", torch.device("cpu"))
    train, _ = tasks.load_preferences(None)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(a.steps, WARMUP))

    class Clock(TrainerCallback):
        t0 = t1 = None

        def on_train_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()  # after the last optimiser step (before on_train_end)

    clock = Clock()
    out = tempfile.mkdtemp(prefix="bench_trl_dpo_trl_")
    trainer = DPOTrainer(model=model, args=trl_config(out, a.steps, a.seed, precompute),
                         train_dataset=trl_dataset(train), processing_class=tok,
                         optimizers=(opt, sched), callbacks=[clock])
    setup = time.perf_counter() - t_setup
    # TRL's token ids must be the ones dpo.py scores: prompt, then completion + EOS
    ds = trainer.train_dataset
    bad = sum(1 for p, ex in zip(train, ds)
              if ex["prompt_ids"] != tok.encode(p["prompt"], add_special_tokens=False)
              or ex["chosen_ids"] != tok.encode(p["chosen"], add_special_tokens=False) + [tok.eos_token_id]
              or ex["rejected_ids"] != tok.encode(p["rejected"], add_special_tokens=False) + [tok.eos_token_id])
    assert bad == 0, f"{bad} pairs tokenized differently by TRL"
    trainer.train()
    model_dir = Path(out) / "final"
    trainer.model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train_s = clock.t1 - clock.t0
    return {"system": "TRL" + ("" if precompute else " (reference forward every step)"),
            "trl": trl.__version__, "precompute_ref_log_probs": precompute,
            "train_seconds": train_s, "pairs_per_second": a.steps * BATCH / train_s,
            "setup_seconds": setup, "model_dir": str(model_dir), "steps": a.steps,
            "pairs_checked_identical_tokens": len(train)}


def heldout_accuracy(model_dir: str) -> float:
    """Held-out pair accuracy of the implicit reward β log π/π_ref, π_ref = the SFT model `tiny-pref`."""
    import torch

    import common

    import tasks
    import dpo
    device = torch.device("cpu")
    _, heldout = tasks.load_preferences(None)
    ref, tok = common.load_model("tiny-pref", device, trainable=False)
    policy = common.load_model(model_dir, device, trainable=False)[0]
    rc, rr = dpo.all_pair_logps(ref, tok, heldout, device, average=False)
    pc, pr = dpo.all_pair_logps(policy, tok, heldout, device, average=False)
    return dpo.implicit_reward_accuracy(pc, pr, rc, rr, BETA, "sigmoid")


#####################################################################################################
#####  main
#####################################################################################################


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps of each training run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                    help="one training run of each system per seed, interleaved (dpo.py, TRL, TRL default, "
                         "next seed, ...), so that a change in the machine's load hits all three alike")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trl_dpo.json"))
    ap.add_argument("--child", choices=["losses", "dpo.py", "TRL", "TRL-noprecompute", "accuracy"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)  # of one child run
    a = ap.parse_args()

    if a.child:
        import torch
        torch.set_num_threads(a.threads)
        if a.child == "losses":
            res = loss_agreement()
        elif a.child == "dpo.py":
            res = run_ours(a)
        elif a.child == "accuracy":
            res = {"heldout_pair_accuracy": heldout_accuracy(a.model_dir)}
        else:
            res = run_trl(a, precompute=a.child == "TRL")
        res.update(threads=torch.get_num_threads(), torch=torch.__version__, seed=a.seed)
        Path(a.child_result).write_text(json.dumps(res))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "TQDM_DISABLE": "1"}

    def child(kind, seed=1, **extra):
        res_file = Path(tempfile.mkdtemp(prefix="bench_trl_dpo_")) / "result.json"
        cmd = [sys.executable, __file__, "--child", kind, "--child-result", str(res_file),
               "--steps", str(a.steps), "--threads", str(a.threads), "--seed", str(seed)]
        for k, v in extra.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL if kind == "accuracy" else None)
        return json.loads(res_file.read_text())

    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "uptime_before": uptime()}
    command = "bench/.venv/bin/python bench/bench_trl_dpo.py " + " ".join(sys.argv[1:])
    print(info["uptime_before"], "\n=== (a) losses on identical inputs", flush=True)
    losses = child("losses")
    kinds = ("dpo.py", "TRL", "TRL-noprecompute")
    runs = {k: [] for k in kinds}
    for seed in a.seeds:
        for kind in kinds:
            print(f"\n=== (b) {kind}, seed {seed}: {a.steps} steps of {BATCH} pairs, {a.threads} thread(s)",
                  flush=True)
            r = child(kind, seed)
            r["uptime_after"] = uptime()
            print(r["uptime_after"], flush=True)
            runs[kind].append(r)
    info["uptime_after"] = uptime()
    for kind in kinds:  # scored after all timed runs
        for r in runs[kind]:
            r["heldout_pair_accuracy"] = child("accuracy", model_dir=r["model_dir"])["heldout_pair_accuracy"]
    trl_v = runs["TRL"][0]["trl"]

    md = [f"`{command.strip()}` — {info['date']}, TRL {trl_v}, torch {runs['TRL'][0]['torch']}, "
          f"torch threads {a.threads}; load before: {info['uptime_before'].split('load average:')[-1].strip()}, "
          f"after: {info['uptime_after'].split('load average:')[-1].strip()}", "",
          "(a) per-example loss and gradient (w.r.t. the policy's per-token log-probs) on identical random "
          f"inputs, {losses['n_examples_per_beta']} pairs × β ∈ {losses['betas']}:", "",
          "| dpo.py | TRL | dtype | max abs. loss difference | max rel. loss difference (÷ max(1, L)) | "
          "max abs. gradient difference | within 1e-6 |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in losses["rows"]:
        # float64 checks the definitions. In float32 the two sum the per-token log-probs in a
        # different order (padded to different widths), so Δ differs by a few ulps, times β
        if r["dtype"] == "float64":
            ok = r["max_abs_loss_diff"] <= 1e-6 and r["max_abs_grad_diff"] <= 1e-6
            verdict = "yes" if ok else "**no**"
        else:
            verdict = "n/a: float32 rounding"
        md.append(f"| {r['ours']} | {r['trl']} | {r['dtype']} | {r['max_abs_loss_diff']:.1e} | "
                  f"{r['max_rel_loss_diff']:.1e} | {r['max_abs_grad_diff']:.1e} | {verdict} |")
    ls = losses["label_smoothing_0.1"]
    med = lambda xs: sorted(xs)[len(xs) // 2]
    pps = {k: [r["pairs_per_second"] for r in runs[k]] for k in kinds}
    acc = {k: [r["heldout_pair_accuracy"] for r in runs[k]] for k in kinds}
    md += ["", f"Label smoothing ε = 0.1 (β {BETA}): dpo.py's cDPO vs TRL's sigmoid differ by up to "
               f"{ls['cDPO_vs_trl_sigmoid']:.3f} (TRL's sigmoid ignores ε: it differs from plain sigmoid by "
               f"{ls['trl_sigmoid_eps_vs_plain_sigmoid']:.1e}); vs TRL's robust by up to {ls['cDPO_vs_trl_robust']:.3f}.",
           "", f"(b) training `tiny-pref`, {a.steps} steps × {BATCH} pairs, β {BETA}, sigmoid, lr {LR}, one run "
               f"per seed {a.seeds}, interleaved; pairs per second: median (min–max); held-out pair accuracy "
               f"of the implicit reward after {a.steps} steps: mean (per seed):", "",
           "| run | pairs per second | training seconds (median) | setup seconds (median) | "
           "held-out pair accuracy | dpo.py vs this (median pairs/s) |",
           "| --- | --- | --- | --- | --- | --- |"]
    names = {"dpo.py": "dpo.py", "TRL": "TRL DPOTrainer (precompute_ref_log_probs=True, like dpo.py)",
             "TRL-noprecompute": "TRL DPOTrainer (default: reference forward every step)"}
    for kind in kinds:
        vs = "" if kind == "dpo.py" else f"{med(pps['dpo.py']) / med(pps[kind]):.2f}×"
        md.append(f"| {names[kind]} | {med(pps[kind]):.0f} ({min(pps[kind]):.0f}–{max(pps[kind]):.0f}) | "
                  f"{med([r['train_seconds'] for r in runs[kind]]):.1f} | "
                  f"{med([r['setup_seconds'] for r in runs[kind]]):.1f} | "
                  f"{sum(acc[kind]) / len(acc[kind]):.3f} ({', '.join(f'{x:.3f}' for x in acc[kind])}) | {vs} |")
    tk = med([r["tokenize_seconds_in_training"] / r["train_seconds"] for r in runs["dpo.py"]])
    ms = med([1000 * r["train_seconds"] / a.steps for r in runs["dpo.py"]])
    md += ["", f"dpo.py tokenizes every batch inside its training step (common.encode_prompt_completion): "
               f"{100 * tk:.0f}% of its {ms:.1f} ms per step (median); TRL tokenizes the whole data set "
               f"once, in its setup. Without that share dpo.py would train at about "
               f"{med(pps['dpo.py']) / (1 - tk):.0f} pairs per second."]
    md = "\n".join(md) + "\n"
    print("\n" + md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "command": command, "steps": a.steps, "threads": a.threads,
                               "seeds": a.seeds, "losses": losses, "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(md)
    print(f"written: {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
