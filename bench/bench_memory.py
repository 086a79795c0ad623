"""Memory rehearsal on the CPU: the README's GPU recipes on random models of Qwen2.5-0.5B's and
1.5B's real shape, each run in a subprocess for a few optimiser steps, its memory measured and split.

    python bench/bench_memory.py --only grpo --sizes 0.5B     # one recipe, one size: 5 runs
    python bench/bench_memory.py --only grpo --sizes 0.5B --depths 1 2 --micro 2   # 2 runs (a part of the fit)
    python bench/bench_memory.py                        # every recipe, both sizes: 40 runs (hours on 2 cores)
    python bench/bench_memory.py --report-only          # the tables again, from the runs measured before
    python bench/bench_memory.py --variant gc           # + --gradient-checkpointing (when the scripts have it)
    python bench/bench_memory.py --variant lora         # --lora-r 16 (when the scripts have it)
    python bench/bench_memory.py --trl                  # TRL's GRPOTrainer and DPOTrainer, the same rehearsal
                                                        #   (needs TRL: bench/.venv, see bench/to_trl.py)

A run takes 2-15 minutes on 2 cores (the reward model's are the quickest, GRPO's and PPO's the
slowest; with 35 other processes on the 2 cores, 14 minutes for one GRPO run). Runs of separate
invocations may go in parallel (each merges its rows into the results file at its end; mind the
memory: 3.5-8 GB a run at 0.5B), and --reuse takes a run's measurements from an earlier invocation.

Results: bench/results/memory.json (every run, every fit) and memory.md (the tables); a variant's
or TRL's rows are merged into the same files, so that one table holds them all.

The shape. Every dimension but depth is the real model's (their config.json, see SHAPES): width,
MLP width, heads, KV heads, the 151,936-token vocabulary and the tied embedding. The depth is 1, 2
and 3 layers (`--depths`), so that a run fits this machine; the vocabulary, whose embedding and
[B, T, V] logits dominate at small depth, is real. The models are random (bench/.runs/memory/, made
once), with gpu_check.build_tokenizer's byte-level tokenizer (one token per embedding row), and the
data are random words at the recipes' lengths: GRPO prompts of 128 tokens and 256-token completions
(a random model almost never samples EOS, so every completion runs to the limit: the worst case),
PPO prompts of 128 and completions of 128, DPO and reward-model rows of 256 + 767 tokens + EOS =
1024 = --max-length.

The batch. A recipe's memory is set by its micro-batch, the rows of one forward and backward pass:
the passes run one after another, and what outlives a pass (rollouts, the sampled tokens'
log-probs) is [B, T] at most, kilobytes, counted as caches and scaled to the recipe's rows. The
recipes' micro-batches at these lengths would take minutes per pass on 2 cores and more memory than
this machine has for logits of 152k columns, so a run takes two micro-batches of m rows per
optimiser step at two values of m (RECIPES[...]["micros"]), below the recipe's micro-batch, and the
recipe's is extrapolated: activations are linear in the tokens of a pass. Not micro-batches of one
sequence: with one, the peak of the passes is the tied embedding's two [V, d] float32 gradients
(input and output side) at the end of the backward pass, ~1.1 GB at any batch, which hides the
slope (grpo at one sequence measured 1.12 GiB at depths 1 and 2). (A pair is two sequences.)

Rollouts are uniformly random tokens of the full length (`fake_generation`), not sampled: the shapes
are those a random model samples, the training passes are the script's own, and the hours of
token-by-token decoding on 2 shared cores are skipped (BENCH_MEMORY_SAMPLE=1 samples for real).

What is measured, in the script's own process (the `--probe` mode of this file wraps it with runpy;
the script is not changed):
  - at every optimiser step (a global AdamW step hook), every live tensor, each storage counted
    once: trained weights (the optimisers' parameters), their gradients, the optimiser state, frozen
    weights (every other parameter or buffer of a live nn.Module: π_ref, r_φ), and the rest, which
    is what the script keeps across the step: caches (rollouts, log-probs, PPO's [B, T, V] π_old);
  - the peak resident set of the process (a sampler thread reads /proc/self/statm every 2 ms, and
    getrusage's ru_maxrss checks it), minus a baseline (the RSS after importing torch and
    transformers, before the script runs), minus what was counted at the step after the peak, is
    "activations": what lives only inside a step's forward and backward passes (saved activations,
    logits and their float32 log-softmax, autocast's bf16 copies of the trained weights, temporaries).
    glibc is told to return every block over 64 KiB to the system at once (MALLOC_MMAP_THRESHOLD_),
    so that the resident set follows the allocations.

The extrapolation. Each part p of a run at depth L and micro-batch fraction b = m / (the recipe's)
is fit as p(L, b) = a + c·L + b·(e + f·L) from the four runs L ∈ {1, 2} × two values of m (for the
caches b = 2m / the recipe's rows per step) (counted parts are
exact in this form: weights are linear in L, caches linear in b), then evaluated at the real depth
and b = 1. The check: the fit's prediction of the peak at L = 3, against the measured run there.

On a GPU the numbers differ, and this is what the table cannot know:
  - precision: the runs use --dtype bfloat16 (CPU autocast, as a GPU's default `auto` does), so the
    activations are bf16 where the GPU's are; CPU autocast's op lists differ a little from CUDA's;
  - attention: on the CPU, transformers' sdpa runs the math kernel, which holds the [heads, T, T]
    scores (and their softmax, for the backward pass); flash / memory-efficient attention on a GPU
    never holds them. At T = 1024 that is 14 heads × 1024² × 2 bytes ≈ 29 MB per sequence per layer
    here: the per-layer activation slope is an upper bound for a GPU;
  - the CUDA context and kernels (~0.5-1 GB, not in torch.cuda.max_memory_allocated) and the caching
    allocator's fragmentation (reserved > allocated): add ~1 GB to a GPU's total;
  - the CPU baseline (Python, torch, transformers: ~0.5 GB of host memory) is not on the GPU and is
    subtracted here.
Cards: a recipe "fits" a card when its extrapolated peak plus 1 GB (the CUDA context) is within the
card's memory (16, 24, 40, 80 GB; GiB here, as nvidia-smi counts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORK = BENCH / ".runs" / "memory"  # ignored by git: models, data, run folders
RESULTS = BENCH / "results" / "memory.json"
GIB = 2 ** 30

# The real shapes, from the published config.json files (Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B-Instruct,
# as mirrored on the Hugging Face hub, e.g. huggingface.co/osllmai-community/Qwen2.5-0.5B/blob/main/config.json
# and huggingface.co/onnx-community/Qwen2.5-1.5B-Instruct/blob/main/config.json): both tie the embedding.
SHAPES = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}
LENGTHS = dict(grpo_prompt=128, grpo_completion=256, ppo_prompt=128, ppo_completion=128,
               pair_prompt=256, pair_completion=767)  # 256 + 767 + EOS = 1024 = --max-length
CARDS = (16, 24, 40, 80)
CUDA_CONTEXT_GIB = 1.0

# The README's GPU recipes (README.md: "On a GPU"). A recipe's memory is set by its micro-batch (the
# rows of one forward/backward pass): the passes run one after the other, and what outlives a pass
# (rollouts, log-probs of the sampled tokens) is [B, T] at most, kilobytes. So a run keeps the
# recipe's lengths and flags and takes two micro-batches of m rows per optimiser step, at two values
# of m (`micros`); `micro` is the recipe's micro-batch and `rows` its rows per step (completions,
# pairs or sequences), and `run(m)` the flags of a run. Evaluations are cut to the least each script
# allows: they are not what is measured. --no-save-model: no final save inside the measured process.
RECIPES = {
    "grpo": dict(script="grpo.py", data="task", micro=8, rows=64, micros=(2, 4),
                 full=["--prompts-per-step", "8", "--group-size", "8", "--micro-batch", "8"],
                 flags=["--max-new-tokens", str(LENGTHS["grpo_completion"]), "--lr", "1e-6", "--beta", "0.04",
                        "--warmup-steps", "10", "--steps", "2", "--eval-every", "100", "--eval-size", "1",
                        "--no-pass-at-k"],
                 # one prompt, a group of 2m, micro-batches of m; not m = 1: with one sequence the passes'
                 # peak is the tied embedding's two [V, d] gradients at the end of the backward pass, the
                 # same at any batch (no slope to fit)
                 run=lambda m: ["--prompts-per-step", "1", "--group-size", str(2 * m), "--micro-batch", str(m)]),
    # (4 and 8 pairs: at fewer, the peak of a step is the [V, d] float32 embedding gradient that the
    # second micro-batch's backward pass adds to .grad, the same at any micro-batch: no slope to fit)
    "reward_model": dict(script="reward_model.py", data="pairs", micro=2, rows=16, micros=(4, 8),
                         full=["--batch-size", "16", "--micro-batch", "2"],
                         flags=["--lr", "1e-5", "--epochs", "1", "--max-length", "1024", "--max-steps", "2",
                                "--eval-every", "100", "--eval-size", "1", "--norm-samples", "2",
                                "--max-new-tokens", "4"],
                         run=lambda m: ["--batch-size", str(2 * m), "--micro-batch", str(m)]),  # m pairs
    "dpo": dict(script="dpo.py", data="pairs", micro=1, rows=8, micros=(1, 2),
                full=["--batch-size", "8", "--micro-batch", "1"],
                flags=["--lr", "5e-7", "--epochs", "1", "--beta", "0.1", "--max-length", "1024", "--max-steps", "2",
                       "--eval-every", "100", "--eval-size", "1", "--eval-samples", "1", "--max-new-tokens", "4"],
                run=lambda m: ["--batch-size", str(2 * m), "--micro-batch", str(m)]),  # m pairs
    # (8 and 16 sequences: at 2 and 4 the passes of 256 tokens are below the loading's peak at 1-2 layers)
    "ppo": dict(script="ppo.py", data="ppo_pairs", micro=4, rows=64, micros=(8, 16),
                full=["--batch-size", "64", "--mini-batches", "4", "--micro-batch", "4"],
                # two epochs: two optimiser steps (one optimiser holds the policy and the value model),
                # so that the second's passes run with the first's gradients and AdamW state in place
                flags=["--lr", "1e-6", "--max-new-tokens", str(LENGTHS["ppo_completion"]), "--steps", "1",
                       "--ppo-epochs", "2", "--eval-every", "100", "--eval-samples", "1"],
                # one mini-batch of two micro-batches per rollout (the optimiser steps are the same size)
                run=lambda m: ["--batch-size", str(2 * m), "--mini-batches", "1", "--micro-batch", str(m)]),
}
TRL_RECIPES = ("grpo", "dpo")  # TRL 1.16 has GRPOTrainer and DPOTrainer (and no PPOTrainer)
VARIANTS = {"full": [], "gc": ["--gradient-checkpointing"], "lora": ["--lora-r", "16"]}
VARIANT_NAMES = {"full": "full", "gc": "+ gradient checkpointing", "lora": "LoRA (r 16)"}
FOREACH = False  # --foreach: AdamW's multi-tensor path in every run (set by main)
PARTS = ["trained_weights", "gradients", "optimizer_state", "frozen_weights", "caches", "activations",
         "step_temporaries"]


#####################################################################################################
#####  the probe: runs one script in this process and measures it
#####################################################################################################


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fake_generation() -> None:
    """Rollouts of uniformly random tokens (ids 3.., never a stop token) of the full length, in place
    of sampling: common.generate for the scripts, transformers' generate for TRL. A random model
    samples nearly uniform tokens and almost never EOS, so the shapes are those of real sampling;
    what is skipped is 256 forward passes of the decoder per rollout, which on a loaded 2-core
    machine take most of a run. The KV cache of sampling is not in the peak (it is freed before the
    training passes, and is far smaller: B × (P + T) × layers × 2 × KV heads × head dim × 2 bytes,
    0.3 GB for GRPO's 64 × 384 tokens at 0.5B). BENCH_MEMORY_SAMPLE=1 samples for real."""
    import torch
    sys.path.insert(0, str(ROOT))
    import common
    import transformers

    def generate(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature=1.0, greedy=False):
        ids = torch.randint(3, model.config.vocab_size, (prompt_ids.shape[0], max_new_tokens),
                            device=prompt_ids.device)  # [B, T]
        return ids, common.completion_mask(ids, eos_ids)
    common.generate = generate

    def hf_generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        n = (generation_config.max_new_tokens if generation_config is not None else None) or kwargs["max_new_tokens"]
        new = torch.randint(3, self.config.vocab_size, (input_ids.shape[0], n), device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)  # [B, P + T]
    transformers.GenerationMixin.generate = hf_generate


def probe(out_file: str, script: str, argv: list[str]) -> None:
    """Run `script argv` with runpy; write the measurements to out_file (JSON)."""
    import gc
    import resource
    import runpy
    import threading

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    del AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM  # imported before the baseline, as the scripts will

    if os.environ.get("BENCH_MEMORY_SAMPLE") != "1":
        fake_generation()
    torch.zeros(1) @ torch.zeros(1)  # the thread pools, before the baseline
    baseline = rss_bytes()
    # the peak outside the optimiser steps (forward and backward passes) and inside them (AdamW's
    # temporaries), each with the number of steps done before it
    state = {"peak": baseline, "peak_step": 0, "peak_in_step": baseline, "peak_in_step_step": 0, "step": 0,
             "in_step": False, "snapshots": [], "stop": False}

    def sampler():
        while not state["stop"]:
            r = rss_bytes()
            if state["in_step"]:
                if r > state["peak_in_step"]:
                    state["peak_in_step"], state["peak_in_step_step"] = r, state["step"]
            elif r > state["peak"]:
                state["peak"], state["peak_step"] = r, state["step"]
            time.sleep(0.002)
    thread = threading.Thread(target=sampler, daemon=True)

    def storage(t):
        try:
            s = t.untyped_storage()
            return s.data_ptr(), s.nbytes()
        except Exception:
            return None, 0

    def snapshot():
        gc.collect()
        seen, parts, caches = set(), dict.fromkeys(PARTS[:5], 0), {}

        def add(t, part):
            ptr, n = storage(t)
            if ptr is None or ptr in seen or n == 0 or t.device.type == "meta":
                return False
            seen.add(ptr)
            parts[part] += n
            return True
        opts = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
        # trained: what an optimiser holds and updates (a script may hand AdamW every parameter, the
        # frozen base of LoRA included: those get no gradient and no state, and count as frozen)
        params = [p for o in opts for g in o.param_groups for p in g["params"] if p.requires_grad]
        for p in params:
            add(p, "trained_weights")
        for p in params:
            if p.grad is not None:
                add(p.grad, "gradients")
        for o in opts:
            for s in o.state.values():
                for v in s.values():
                    if torch.is_tensor(v):
                        add(v, "optimizer_state")
        objs = gc.get_objects()
        for m in objs:
            if isinstance(m, torch.nn.Module):
                for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    add(t, "frozen_weights")
        for t in objs:
            if torch.is_tensor(t) and not isinstance(t, torch.nn.Parameter) and add(t, "caches"):
                key = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"
                caches[key] = caches.get(key, 0) + storage(t)[1]
        top = sorted(caches.items(), key=lambda kv: -kv[1])[:6]
        return {"step": state["step"], "rss": rss_bytes(), "parts": parts,
                "largest_caches": [{"tensor": k, "bytes": v} for k, v in top],
                "trained_params": sum(p.numel() for p in params)}

    def pre_hook(opt, args, kwargs):
        state["peak_in_step"] = max(state["peak_in_step"], rss_bytes())
        state["in_step"] = True

    def hook(opt, args, kwargs):
        state["peak_in_step"] = max(state["peak_in_step"], rss_bytes())
        state["in_step"] = False
        state["step"] += 1
        state["snapshots"].append(snapshot())
    register_optimizer_step_pre_hook(pre_hook)
    register_optimizer_step_post_hook(hook)
    if os.environ.get("BENCH_MEMORY_FOREACH") == "1":  # AdamW's multi-tensor path, the default on a GPU
        init = torch.optim.AdamW.__init__

        def foreach_init(self, *args, **kwargs):
            kwargs.setdefault("foreach", True)
            init(self, *args, **kwargs)
        torch.optim.AdamW.__init__ = foreach_init
    sys.argv = [script] + argv
    sys.path.insert(0, str(Path(script).resolve().parent))
    thread.start()
    error = None
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            error = f"exit {e.code}"
    finally:
        state["stop"] = True
        thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(out_file).write_text(json.dumps({
            "baseline": baseline, "peak_sampled": state["peak"], "peak_step": state["peak_step"],
            "peak_in_step": state["peak_in_step"], "peak_in_step_step": state["peak_in_step_step"],
            "maxrss": maxrss, "snapshots": state["snapshots"], "error": error}))


#####################################################################################################
#####  models and data, made once into bench/.runs/memory
#####################################################################################################


def make_tokenizer() -> Path:
    """gpu_check's byte-level tokenizer at the real vocabulary, and its words; once."""
    folder = WORK / "tokenizer"
    if not (folder / "words.json").exists():
        sys.path.insert(0, str(BENCH))
        from gpu_check import build_tokenizer
        tok, words = build_tokenizer(SHAPES["0.5B"]["vocab_size"])
        tok.save_pretrained(folder)
        (folder / "words.json").write_text(json.dumps(words))
    return folder


def make_model(size: str, depth: int, reward: bool = False) -> Path:
    """A random Qwen2 of `size`'s shape at `depth` layers (a one-label sequence classifier, which
    tasks.load_reward_model reads, when `reward`), with the tokenizer; once."""
    folder = WORK / "models" / f"qwen2.5-{size}-L{depth}{'-rm' if reward else ''}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(make_tokenizer())
    torch.manual_seed(depth)
    cfg = Qwen2Config(**{**SHAPES[size], "num_hidden_layers": depth}, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, num_labels=1)
    model = (Qwen2ForSequenceClassification if reward else Qwen2ForCausalLM)(cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def make_data() -> dict:
    """task.jsonl (GRPO), pairs.jsonl (DPO, reward model), ppo_pairs.jsonl (PPO's prompts): random
    words, one token each, at the lengths of LENGTHS; once."""
    import numpy as np
    files = {name: WORK / f"{name}.jsonl" for name in ("task", "pairs", "ppo_pairs")}
    if all(f.exists() for f in files.values()):
        return files
    words = np.array(json.loads((make_tokenizer() / "words.json").read_text()))
    rng = np.random.default_rng(0)

    def text(n):
        return "".join(" " + w for w in words[rng.integers(len(words), size=n)])
    rows = 80
    with open(files["task"], "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": text(LENGTHS["grpo_prompt"]), "answer": "7"}) + "\n")
    with open(files["pairs"], "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": text(LENGTHS["pair_prompt"]), "chosen": text(LENGTHS["pair_completion"]),
                                "rejected": text(LENGTHS["pair_completion"])}) + "\n")
    with open(files["ppo_pairs"], "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": text(LENGTHS["ppo_prompt"]), "chosen": text(8), "rejected": text(8)}) + "\n")
    return files


def first_rows(path: Path, n: int) -> Path:
    """The first n rows of a data file, beside it."""
    out = path.with_name(f"{path.stem}_{n}{path.suffix}")
    if not out.exists():
        out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


#####################################################################################################
#####  one run
#####################################################################################################


def supports(python: str, script: str, flag: str, trl: bool) -> bool:
    """Whether `script --help` lists `flag` (the variants' flags come with other work)."""
    cmd = [python, str(BENCH / "to_trl.py"), script, "--help"] if trl else [python, script, "--help"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env()).stdout
    return flag in out


def child_env(foreach: bool = False) -> dict:
    return {**os.environ, "BENCH_MEMORY_FOREACH": "1" if foreach else "0", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2",
            "TOKENIZERS_PARALLELISM": "false"}


def run_name(recipe: str, size: str, depth: int, m: int, variant: str, trl: bool) -> str:
    return f"{'trl_' if trl else ''}{recipe}-{size}-L{depth}-m{m}-{variant}{'-foreach' if FOREACH else ''}"


def probe_path(*args) -> Path:
    return WORK / "runs" / f"{run_name(*args)}.json"


def run_one(recipe: str, size: str, depth: int, m: int, variant: str, trl: bool, python: str,
            limit_gib: float, timeout: float, reuse: bool = False) -> dict:
    r = RECIPES[recipe]
    files = make_data()
    model = make_model(size, depth)
    name = run_name(recipe, size, depth, m, variant, trl)
    out_dir, probe_file = WORK / "runs" / name, WORK / "runs" / f"{name}.json"
    data = files[r["data"]]
    if trl and recipe == "dpo":  # TRL computes π_ref's log-probs of every training pair before the first
        data = first_rows(data, 20)  # step, dpo.py of the pairs it will use: 16 + 4 held out, not 64 + 16
    args = ["--model", str(model), "--data", str(data), *r["flags"], *r["run"](m),
            *VARIANTS[variant], "--dtype", "bfloat16", "--device", "cpu", "--out-dir", str(out_dir),
            "--no-save-model"]
    if recipe == "ppo":
        args += ["--reward-model", str(make_model(size, depth, reward=True))]
    script = [str(BENCH / "to_trl.py"), r["script"]] if trl else [r["script"]]
    cmd = [python, str(Path(__file__).resolve()), "--probe", str(probe_file), *script, *args]
    row = {"run": name, "recipe": recipe, "system": "TRL" if trl else "this repo", "size": size, "depth": depth,
           "m": m, "variant": variant, "command": " ".join(["python", *script, *args]).replace(str(ROOT) + "/", "")}
    t0, load0 = time.time(), os.getloadavg()[0]
    if reuse and probe_file.exists():  # a probe of an earlier invocation (--reuse)
        probed = json.loads(probe_file.read_text())
        if not probed.get("error") and probed.get("snapshots"):
            row.update(wall_seconds=probed.get("wall_seconds", 0.0), load=probed.get("load", [None, None]),
                       reused=True)
            return measured(row, probed)
    shutil.rmtree(out_dir, ignore_errors=True)  # (after the reuse check: never a running run's folder)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(FOREACH), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    killed = None
    while proc.poll() is None:  # the memory guard: this machine is shared
        time.sleep(0.5)
        try:
            rss = sum(int(open(f"/proc/{p}/statm").read().split()[1]) for p in [proc.pid]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            rss = 0
        if rss > limit_gib * GIB:
            killed = f"over the memory guard ({rss / GIB:.1f} GiB > --limit-gib {limit_gib})"
        elif time.time() - t0 > timeout:
            killed = f"over the time limit ({timeout:.0f} s)"
        if killed:
            proc.kill()
            break
    output = proc.communicate()[0] or ""
    row.update(wall_seconds=round(time.time() - t0, 1), load=[round(load0, 2), round(os.getloadavg()[0], 2)])
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        probed = json.loads(probe_file.read_text())
    except (OSError, ValueError):
        probed = None
    if killed or proc.returncode != 0 or probed is None or probed["error"] or not probed["snapshots"]:
        row["error"] = killed or "\n".join(output.strip().splitlines()[-8:]) or "no measurement"
        return row
    probed.update(wall_seconds=row["wall_seconds"], load=row["load"])
    probe_file.write_text(json.dumps(probed))
    return measured(row, probed)


def measured(row: dict, m: dict) -> dict:
    """The row's parts from a probe's measurements: what was counted at the last step (the steady
    state), the activations (the peak outside the optimiser steps, minus what was counted then) and
    the optimiser step's temporaries (the peak inside a step, minus what was counted then)."""
    snaps = {s["step"]: s for s in m["snapshots"]}
    last = m["snapshots"][-1]
    parts = dict(last["parts"])

    def counted_at(done: int, in_step: bool) -> int:
        """Bytes counted while `done` steps were done: the next step's snapshot (gradients are
        complete then); before the first step ends there is no optimiser state yet, except inside it."""
        snap = snaps.get(done + 1, last)
        return sum(snap["parts"].values()) - (snap["parts"]["optimizer_state"] if done == 0 and not in_step else 0)
    peak_out = max(m["peak_sampled"], m["baseline"])
    parts["activations"] = peak_out - m["baseline"] - counted_at(m["peak_step"], False)
    if "peak_in_step" in m:  # probes before the phases were split have one peak only
        parts["step_temporaries"] = m["peak_in_step"] - m["baseline"] - counted_at(m["peak_in_step_step"], True)
    else:
        parts["step_temporaries"] = None
    static = sum(parts[p] for p in PARTS[:5])
    peak = static + max(parts["activations"], parts["step_temporaries"] or 0)
    row.update(ok=True, baseline=m["baseline"], peak=peak, measured_peak=max(m["maxrss"], peak_out) - m["baseline"],
               phases=parts["step_temporaries"] is not None, optimizer_steps=len(m["snapshots"]), parts=parts,
               largest_caches=last["largest_caches"], trained_params=last["trained_params"])
    return row


#####################################################################################################
#####  the fit, the tables
#####################################################################################################


def fit(points: list[tuple[int, float, float]]):
    """Least squares of y = a + c·L + b·(e + f·L) over (L, b, y); returns the coefficients."""
    import numpy as np
    X = np.array([[1, L, b, b * L] for L, b, _ in points], dtype=float)
    y = np.array([v for _, _, v in points], dtype=float)
    return np.linalg.lstsq(X, y, rcond=None)[0]


def scale(recipe: str, m: int, part: str) -> float:
    """b of a run at micro-batch m, for one part: the caches scale with the rows per step (a run has
    2m, the recipe `rows`), everything else with the micro-batch (m of the recipe's `micro`)."""
    r = RECIPES[recipe]
    return 2 * m / r["rows"] if part == "caches" else m / r["micro"]


def predict(coef, L, b) -> float:
    return float(coef[0] + coef[1] * L + b * (coef[2] + coef[3] * L))


def extrapolate(rows: list[dict]) -> list[dict]:
    """One entry per (system, recipe, size, variant): the fit from depths 1-2 at both scales, its
    error at depth 3, and the parts at the real depth and full batch."""
    groups = {}
    for r in rows:
        if r.get("ok"):
            groups.setdefault((r["system"], r["recipe"], r["size"], r["variant"]), []).append(r)
    out = []
    for (system, recipe, size, variant), rs in sorted(groups.items()):
        fitted = [r for r in rs if r["depth"] in (1, 2) and r["m"] in RECIPES[recipe]["micros"]]
        if len({(r["depth"], r["m"]) for r in fitted}) < 4:
            continue
        depth = SHAPES[size]["num_hidden_layers"]
        parts, coefs = {}, {}
        for p in PARTS:
            if any(r["parts"][p] is None for r in fitted):
                parts[p] = coefs[p] = None
                continue
            c = fit([(r["depth"], scale(recipe, r["m"], p), r["parts"][p]) for r in fitted])
            coefs[p] = [round(float(x)) for x in c]
            parts[p] = predict(c, depth, 1.0)

        def total(ps):  # the steady state: everything counted, plus the larger of the two transients
            return sum(ps[p] for p in PARTS[:5]) + max(ps["activations"], ps["step_temporaries"] or 0)

        def predicted(L, m):  # a run's peak at depth L and micro-batch m, from the fit
            return total({p: (None if coefs[p] is None else predict(coefs[p], L, scale(recipe, m, p))) for p in PARTS})

        def act(L, m):
            return predict(coefs["activations"], L, scale(recipe, m, "activations"))
        checks = [{"depth": r["depth"], "m": r["m"], "measured_gib": round(r["peak"] / GIB, 3),
                   "predicted_gib": round(predicted(r["depth"], r["m"]) / GIB, 3),
                   "error_pct": round(100 * (predicted(r["depth"], r["m"]) / r["peak"] - 1), 1),
                   "activations_measured_gib": round(r["parts"]["activations"] / GIB, 3),
                   "activations_predicted_gib": round(act(r["depth"], r["m"]) / GIB, 3),
                   "activations_error_pct": round(100 * (act(r["depth"], r["m"]) / r["parts"]["activations"] - 1), 1)}
                  for r in rs if r["depth"] not in (1, 2)]
        peak = total(parts)
        # the activations' growth per layer at the full batch must be positive; where the runs do not
        # resolve it (the depth-independent logits dominate them, or the peak fell at another point
        # of the pass at one of the batches), the fit is not used and the table gives the lower bound
        slope = coefs["activations"][1] + coefs["activations"][3] if coefs["activations"] else 0
        if slope <= 0:
            continue
        out.append({"system": system, "recipe": recipe, "size": size, "variant": variant, "depth": depth,
                    "parts_gib": {p: (None if v is None else round(v / GIB, 2)) for p, v in parts.items()},
                    "peak_gib": round(peak / GIB, 2), "phases_split": all(r["phases"] for r in fitted),
                    "micro": RECIPES[recipe]["micro"],
                    # the same recipe at other micro-batches (the fit is linear in the micro-batch)
                    "peak_gib_at_micro": {m: round(predicted(depth, m) / GIB, 2) for m in (1, 2, 4, 8, 16)},
                    "coefficients_bytes": coefs, "check": checks,
                    "fits": [c for c in CARDS if peak / GIB + CUDA_CONTEXT_GIB <= c]})
    return out


def n_params(size: str, depth: int) -> int:
    """Parameters of one model of `size`'s shape at `depth` layers (built on the meta device)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPES[size], "num_hidden_layers": depth}))
    return sum(p.numel() for p in model.parameters())


def lower_bounds(rows: list[dict]) -> list[dict]:
    """Where a recipe has runs but no complete fit: what is counted, at the real depth and batch, is
    a lower bound of the peak. Every model of a run has the same shape, so each counted part scales
    with the parameters of one model (real depth / run's depth); the caches scale with the rows."""
    out, seen = [], set()
    for r in sorted((r for r in rows if r.get("ok")), key=lambda r: (-r["depth"], -r["m"])):
        key = (r["system"], r["recipe"], r["size"], r["variant"])
        if key in seen:
            continue
        seen.add(key)
        ratio = n_params(r["size"], SHAPES[r["size"]]["num_hidden_layers"]) / n_params(r["size"], r["depth"])
        parts = {p: r["parts"][p] * ratio for p in PARTS[:4]}
        parts["caches"] = r["parts"]["caches"] / scale(r["recipe"], r["m"], "caches")
        total = sum(parts.values())
        out.append({"system": key[0], "recipe": key[1], "size": key[2], "variant": key[3], "from_run": r["run"],
                    "parts_gib": {p: round(v / GIB, 2) for p, v in parts.items()},
                    "lower_bound_gib": round(total / GIB, 2),
                    "too_small_for": [c for c in CARDS if total / GIB + CUDA_CONTEXT_GIB > c]})
    return out


def gib(v, unit=GIB) -> str:
    return "?" if v is None else f"{v / unit:.2f}"


def card(e) -> str:
    return f"{e['fits'][0]} GB" if e and e["fits"] else ("> 80 GB" if e else "—")


def tables(result: dict) -> str:
    ext = result["extrapolated"]
    find = {(e["system"], e["recipe"], e["size"], e["variant"]): e for e in ext}
    low = {(e["system"], e["recipe"], e["size"], e["variant"]): e for e in result.get("lower_bounds", [])}
    lines = [f"Memory rehearsal on the CPU ({result['date']}, torch {result['torch']}, transformers "
             f"{result['transformers']}; load {result['load']}). Random models of the real shape, the "
             "README's GPU recipes, --dtype bfloat16; peak in GiB at the real depth and full batch, "
             "extrapolated from depths 1-2 at two micro-batch sizes to the recipe's (see bench/bench_memory.py). Card: the "
             f"smallest of {', '.join(map(str, CARDS))} GB that holds the peak + {CUDA_CONTEXT_GIB:.0f} GB "
             "of CUDA context.", "",
             "| script | system | model | " + " | ".join(VARIANT_NAMES.values()) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |"]
    systems = sorted({e["system"] for e in ext + result.get("lower_bounds", [])}, key=lambda s: s != "this repo")
    for recipe in RECIPES:
        for system in systems:
            for size in SHAPES:
                cells = []
                for v in VARIANTS:
                    e, lb = find.get((system, recipe, size, v)), low.get((system, recipe, size, v))
                    if e:
                        cells.append(f"{e['peak_gib']:.1f} ({card(e)})")
                    elif lb:  # counted parts only: a lower bound
                        room = [c for c in CARDS if c not in lb["too_small_for"]]
                        cells.append(f"≥ {lb['lower_bound_gib']:.1f} ({'≥ ' + str(room[0]) + ' GB' if room else '> 80 GB'})")
                    else:
                        cells.append("—")
                if any(c != "—" for c in cells):
                    lines.append(f"| {recipe} | {system} | Qwen2.5-{size} | " + " | ".join(cells) + " |")
    lines += ["", "≥ X: the recipe's fit is not complete; X is what was counted (weights, gradients, AdamW "
              "state, frozen weights, caches) scaled to the real depth and batch, before any activation.",
              "", "| script | system | model | variant | from run | " + " | ".join(PARTS[:5]) + " | at least |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in PARTS[:5]) + " | --- |"]
    for e in result.get("lower_bounds", []):
        lines.append(f"| {e['recipe']} | {e['system']} | {e['size']} | {e['variant']} | {e['from_run']} | "
                     + " | ".join(f"{e['parts_gib'][p]:.2f}" for p in PARTS[:5]) + f" | {e['lower_bound_gib']:.2f} |")
    lines += ["", "Split of the peak (GiB): " + ", ".join(PARTS) + "; and the fit's error at depth 3.", "",
              "| script | system | model | variant | " + " | ".join(PARTS) + " | peak | depth-3 check |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in PARTS) + " | --- | --- |"]
    for e in ext:
        chk = "; ".join(f"L={c['depth']}, m={c['m']}: peak {c['measured_gib']:.2f} measured, {c['predicted_gib']:.2f} "
                        f"fit ({c['error_pct']:+.1f}%); activations {c['activations_measured_gib']:.3f} measured, "
                        f"{c['activations_predicted_gib']:.3f} fit ({c['activations_error_pct']:+.1f}%)"
                        for c in e["check"]) or "—"
        lines.append(f"| {e['recipe']} | {e['system']} | {e['size']} | {e['variant']} | "
                     + " | ".join(gib(e['parts_gib'][p], 1) for p in PARTS) + f" | {e['peak_gib']:.2f} | {chk} |")
    lines += ["", "Runs (GiB over the baseline; m: the run's micro-batch, two per optimiser step):", "",
              "| run | peak | " + " | ".join(PARTS) + " | largest cache | s | load |",
              "| --- | --- | " + " | ".join("---" for _ in PARTS) + " | --- | --- | --- |"]
    for r in result["runs"]:
        if r.get("ok"):
            big = r["largest_caches"][0] if r["largest_caches"] else None
            big = f"{big['tensor']}: {big['bytes'] / GIB:.2f}" if big else "—"
            lines.append(f"| {r['run']} | {r['peak'] / GIB:.2f} | "
                         + " | ".join(gib(r['parts'][p]) for p in PARTS)
                         + f" | {big} | {r['wall_seconds']:.0f} | {r['load'][0]}-{r['load'][1]} |")
        else:
            lines.append(f"| {r['run']} | failed: {r.get('error', '')[-160:]!r} | " + " | ".join("" for _ in PARTS)
                         + " | | | |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        return probe(sys.argv[2], sys.argv[3], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(RECIPES), help="recipes to run (default: all)")
    ap.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--depths", nargs="+", type=int, default=[1, 2, 3],
                    help="depths to run (default 1 2 3: 1 and 2 are fit, the others checked)")
    ap.add_argument("--check-depth-at", choices=["small", "both"], default="small",
                    help="run the check depths at the smaller batch only (default) or at both")
    ap.add_argument("--micro", nargs="+", type=int, help="only these run micro-batches (of the recipe's two)")
    ap.add_argument("--variant", choices=list(VARIANTS), default="full",
                    help="full; gc: + --gradient-checkpointing; lora: --lora-r 16 (the scripts' flags)")
    ap.add_argument("--trl", action="store_true", help="TRL's trainers via bench/to_trl.py (grpo, dpo)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs the scripts "
                                                             "(for --trl: one with TRL installed)")
    ap.add_argument("--limit-gib", type=float, default=12.0, help="kill a run whose RSS passes this (GiB)")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds allowed per run")
    ap.add_argument("--reuse", action="store_true", help="reuse the measurements of earlier runs of the same name "
                                                         "(bench/.runs/memory/runs/NAME.json)")
    ap.add_argument("--foreach", action="store_true",
                    help="AdamW's multi-tensor (foreach) path, as on a GPU, where it is the default: one more "
                         "float32 copy of the trained weights during the step (results: memory_foreach.json)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: the tables from the runs measured before (bench/.runs/memory/runs)")
    ap.add_argument("--out", help="results JSON (default: bench/results/memory.json, memory_foreach.json "
                                  "with --foreach); the tables go beside it (.md)")
    a = ap.parse_args()
    import torch
    import transformers
    recipes = [r for r in (a.only or list(RECIPES)) if not a.trl or r in TRL_RECIPES]
    global FOREACH
    FOREACH = a.foreach
    out = Path(a.out or (RESULTS.with_name("memory_foreach.json") if a.foreach else RESULTS))
    WORK.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    new = []
    for recipe in recipes:
        script = RECIPES[recipe]["script"]
        flag = (VARIANTS[a.variant] or [None])[0]
        if flag and not supports(a.python, script, flag, a.trl):
            print(f"{recipe}: {script} has no {flag} yet; skipped", flush=True)
            continue
        for size in a.sizes:
            small, big = RECIPES[recipe]["micros"]
            plan = [(d, m) for d in sorted(a.depths) for m in (small, big)
                    if (d in (1, 2) or m == small or a.check_depth_at == "both") and (not a.micro or m in a.micro)]
            if a.report_only:  # every run of this recipe, size and variant measured before
                plan = [(d, m) for d in range(1, 9) for m in (1, 2, 4, 8, 16)
                        if probe_path(recipe, size, d, m, a.variant, a.trl).exists()]
            for depth, m in plan:
                row = run_one(recipe, size, depth, m, a.variant, a.trl, a.python, a.limit_gib, a.timeout,
                             a.reuse or a.report_only)
                new.append(row)
                msg = (f"peak {row['peak'] / GIB:.2f} GiB (" + ", ".join(f"{p} {gib(row['parts'][p])}"
                                                                          for p in PARTS) + ")"
                       if row.get("ok") else f"FAILED: {row['error'][-300:]}")
                print(f"{row['run']:32} {row['wall_seconds']:6.1f} s  {msg}", flush=True)
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}  # read now: runs in parallel merge
    names = {r["run"] for r in new}
    runs = [r for r in result["runs"] if r["run"] not in names] + new
    result.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  transformers=transformers.__version__, cpus=os.cpu_count(),
                  load=f"{load0:.2f} at the start of the last invocation, {os.getloadavg()[0]:.2f} at its end",
                  shapes=SHAPES, lengths=LENGTHS, runs=runs)
    result["extrapolated"] = extrapolate(runs)
    result["lower_bounds"] = lower_bounds(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = tables(result)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md + f"\n\n{time.time() - t0:.0f} s; wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
