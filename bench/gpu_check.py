"""GPU check, run by hand on a machine with one CUDA GPU (not in CI; tests/test_gpu_check.py keeps
its dry run green): what the CPU cannot check, in one command, under 8 minutes, nothing downloaded.

    python bench/gpu_check.py                          # writes bench/results/gpu_check.json and .md
    python bench/gpu_check.py --only qwen              # just the runs on the Qwen2.5-0.5B shape
    python bench/gpu_check.py --device cpu --dry-run   # the same code on a tiny shape, ~1 minute on 2 CPU cores

Every run is `python SCRIPT.py ...` in a subprocess from the repo root, as a user would start it
(`--device DEV`, `--dtype` left at `auto`: bfloat16 on a GPU, float32 on the CPU), into a run folder
in a temporary directory, with HF_HUB_OFFLINE=1 and the scripts' own CPU threads (`--threads`: one
for a small model). Two groups:

    defaults   every script's defaults for a few steps (the same commands in a dry run):
               grpo.py --steps 5, reinforce.py --steps 5, dpo.py --max-steps 5,
               reward_model.py --max-steps 5, ppo.py --steps 2, and dqn_maze.py (small tabular code,
               but it has --device) with fewer environment steps
    qwen       grpo.py, dpo.py, reward_model.py and then ppo.py (with that reward model, so that it
               does not train its own) on a randomly initialised model of Qwen2.5-0.5B's shape
               (QWEN_SHAPE, 494M parameters, vocabulary 151,936) for 2-3 steps at realistic lengths
               (prompts of 128 tokens, completions of 256) and batch sizes, at the README's GPU
               learning rates (grpo 1e-6 with β 0.04, dpo 5e-7, reward model 1e-5, ppo 1e-6), with
               no warm-up so that the steps run at those rates, and tiny evaluations. A dry run
               uses DRY_SHAPE and DRY_SIZES instead: the same code on a small model.

The Qwen-shaped model and its data are made here, in code, into the temporary directory:
  - a byte-level BPE tokenizer of Qwen2's kind with one token per row of the embedding
    (`build_tokenizer`: transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever
    it was saved as); the data are written in its letter words, one token each;
  - the model: Qwen2Config(...) with random weights, saved with save_pretrained, except for two
    things set by `calibrate_eos`: the last layer's value bias and the EOS row of the tied
    embedding. A random model ends a completion with probability ~1/151,936 per token, so every
    GRPO reward would be 0, every advantage 0, the gradient exactly 0, and the share of weights
    changed would check nothing. Calibrated, about a third of the completions end within the 256
    tokens; a batch still runs to the full 256 (it stops only when all of its completions have
    ended), which is what is timed;
  - most tokens decode to a word ending in the digit 7, and every GRPO answer is 7, so a completion
    scores 1 exactly when it ends (EOS) and is not empty: the rewards of a group differ;
  - preference pairs for dpo.py, reward_model.py and ppo.py: prompts of 128 tokens, chosen and
    rejected completions of 256 (random words, so the labels mean nothing: only the shapes and the
    code paths matter here).

For each run it records: the return code and wall time; seconds per step (the mean of
`time/step_seconds` over the steps after the first, which pays for CUDA's warm-up; the first step is
recorded beside it); completions or pairs per second (`charts/completions_per_second` of grpo and
reinforce; batch size / seconds per step for the others); the peak GPU memory that PyTorch allocated
in the run's process (each script runs inside a small wrapper that reads
torch.cuda.max_memory_allocated() when it ends; null on the CPU); the share of the trained weights
that changed (the saved `<out-dir>/model` against the start weights, scalar by scalar; for
reward_model.py see `weights_changed`); the KL to the reference at the start (exactly 0 when the
frozen reference stores its matmul weights as autocast rounds the policy's, see harness.freeze);
and the last lines of stderr when a run fails.

Results: bench/results/gpu_check.json and gpu_check.md (the table is printed too); a dry run writes
to --out, else to a temporary folder, so that it never overwrites the GPU's results. The exit code
is 0 when every run succeeded, 1 otherwise (after writing the files), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing is downloaded, here or below

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-0.5B's shape (its config.json), written here so that nothing is downloaded
QWEN_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# the dry run's shape: the same architecture, small enough for a CPU test
DRY_SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# lengths in tokens, steps of each qwen run, rows of the data files
QWEN_SIZES = dict(prompt=128, completion=256, steps=3, rm_steps=2, ppo_steps=2, rows=40)
DRY_SIZES = dict(prompt=16, completion=16, steps=2, rm_steps=2, ppo_steps=2, rows=40)
FINISH_SHARE = 1 / 3  # share of the random model's completions that end (EOS) within the token limit

# The defaults group: the same commands in a dry run (the defaults are small models already)
DEFAULTS = {
    "grpo": ["grpo.py", "--steps", "5"],
    "reinforce": ["reinforce.py", "--steps", "5"],
    "dpo": ["dpo.py", "--max-steps", "5"],
    "reward_model": ["reward_model.py", "--max-steps", "5"],
    "ppo": ["ppo.py", "--steps", "2"],
    "dqn_maze": ["dqn_maze.py", "--tabular-steps", "20000", "--dqn-steps", "5000"],  # CPU code, but it has --device
}
START = {"grpo": "tiny", "reinforce": "tiny", "dpo": "tiny-pref", "reward_model": "tiny-pref", "ppo": "tiny-pref"}
QWEN_RUNS = ["qwen_grpo", "qwen_dpo", "qwen_reward_model", "qwen_ppo"]
RUN_NAMES = list(DEFAULTS) + QWEN_RUNS

# what to read from each run's metrics.jsonl: the KL to the reference at the start (step, key), and a
# few numbers of its last step that say whether the run learned anything
KL_AT_START = {"grpo": (1, "kl/ref"), "reinforce": (1, "kl/ref"), "dpo": (0, "eval/kl_to_ref"),
               "ppo": (1, "objective/kl")}
LAST_STEP_KEYS = ["reward/mean", "completions/mean_length", "completions/no_eos_frac", "loss", "loss/bt",
                  "loss/policy", "policy/grad_norm", "rm/grad_norm"]

# Each script runs inside this wrapper, so that the peak GPU memory is read in its own process.
# argv: PEAK_FILE SCRIPT.py ARGS...
WRAPPER = """
import json, runpy, sys
peak_file, script = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    import torch
    devices = range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with open(peak_file, "w") as f:  # null when the run never used CUDA
        json.dump({"allocated": max((torch.cuda.max_memory_allocated(i) for i in devices), default=None),
                   "reserved": max((torch.cuda.max_memory_reserved(i) for i in devices), default=None)}, f)
"""


#####################################################################################################
#####  the Qwen-shaped model, its tokenizer and its data, made in code
#####################################################################################################


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letter_strings():
    """'a', 'b', ..., 'z', 'aa', 'ab', ...: shortest first, so any first n hold the prefixes of each."""
    for n in itertools.count(1):
        for t in itertools.product(LETTERS, repeat=n):
            yield "".join(t)


def build_tokenizer(vocab_size: int, word_share: float = 0.1):
    """A byte-level BPE of Qwen2's kind, with exactly one token per row of the embedding. Returns
    (tokenizer, words): `words` are the letter strings that are one token each after a space.

    A folder whose config says qwen2 always loads its tokenizer as `Qwen2Tokenizer` (transformers 5
    overrides the saved class for that model type): Qwen's regex split, then byte-level BPE over the
    saved vocabulary and merges. So that is what is built here:
        ids 0-2        <pad>, <eos>, <unk> (special tokens: none is added on loading, so every id
                       has an embedding row)
        next 256       the byte-level alphabet: any text encodes
        next ~10%      ' ' + letters ('Ġa', ..., 'Ġab', ...), built by merges: the data's words
        the rest       ' ' + letters + '7' ('Ġa7', ...): no text encodes to them (the regex splits
                       digits off), but a random model samples them, and they decode to ' a7'
    A sampled completion then nearly always holds a word ending in 7, so its last number is 7."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    specials, alphabet = ["<pad>", "<eos>", "<unk>"], sorted(pre_tokenizers.ByteLevel.alphabet())
    n_words = max(26, int(word_share * vocab_size))
    n_sevens = vocab_size - len(specials) - len(alphabet) - n_words
    words = list(itertools.islice(letter_strings(), n_words))
    sevens = ["Ġ" + w + "7" for w in itertools.islice(letter_strings(), n_sevens)]  # Ġ is the byte of ' '
    vocab = {t: i for i, t in enumerate(specials + alphabet + ["Ġ" + w for w in words] + sevens)}
    merges = [("Ġ" + w[:-1], w[-1]) for w in words]  # 'Ġ' + 'a' -> 'Ġa', 'Ġa' + 'b' -> 'Ġab', ...
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
                         padding_side="left")
    return tok, words


@torch.no_grad()
def calibrate_eos(model, eos_id: int, words: range, prompt_len: int, completion_len: int,
                  finish_share: float, energy: float = 0.2) -> dict:
    """Make a random model end a completion within `completion_len` tokens with probability about
    `finish_share`: EOS gets probability p = 1 − (1 − share)^(1/T) at every completion position.

    The output layer is the tied embedding, so the EOS logit is h · E[eos], h the final hidden state.
    In a random model h has no direction that every context shares, so two changes make one:
      1. the last layer's value bias b_v (zero at init): attention weights sum to 1, so the attention
         output holds b_v at every position, and o_proj turns it into one fixed vector u added to
         the residual stream everywhere; b_v is scaled so that u holds `energy` of that stream's
         energy (|u|² = energy · d · rms(x)², x the input of the final norm);
      2. E[eos] = a · u/|u|, with a found by bisection such that the mean of softmax(logits)[eos]
         over the completion positions of random contexts (prompts of data words, then any tokens)
         is p.
    Everything else keeps its random initial value. Returns what was set, for the results file."""
    cfg, V = model.config, model.config.vocab_size
    d, n_heads, n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // n_heads
    gen = torch.Generator().manual_seed(0)

    def contexts(n: int) -> torch.Tensor:  # [n, P + T]: a prompt of data words, then any non-special tokens
        ids = torch.randint(3, V, (n, prompt_len + completion_len), generator=gen)
        ids[:, :prompt_len] = torch.randint(words.start, words.stop, (n, prompt_len), generator=gen)
        return ids
    n = max(4, 2048 // (prompt_len + completion_len))  # 5 contexts of Qwen's lengths, 64 of the dry run's

    ##### 1. u = o_proj(b_v repeated over the query heads that share each key/value head)
    seen = {}
    hook = model.base_model.norm.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    model.base_model(input_ids=contexts(2))
    hook.remove()
    rms = seen["x"][:, prompt_len - 1:-1].pow(2).mean().sqrt()  # of the residual stream at the end
    attn = model.base_model.layers[-1].self_attn
    b = torch.randn(n_kv * head_dim, generator=gen)  # [kv · hd]
    u = attn.o_proj.weight @ b.view(n_kv, head_dim).repeat_interleave(n_heads // n_kv, 0).reshape(-1)  # [d]
    scale = float((energy * d) ** 0.5 * rms / u.norm())
    attn.v_proj.bias.copy_(scale * b)
    direction = u / u.norm()  # [d]

    ##### 2. the EOS row along u, its length a by bisection on the mean EOS probability
    ids = contexts(n)
    h = model.base_model(input_ids=ids).last_hidden_state[:, prompt_len - 1:-1].reshape(-1, d)  # [N, d]
    emb = model.get_input_embeddings().weight  # [V, d], also the output layer (tied)
    logits = h @ emb.T  # [N, V]
    logits[:, eos_id] = float("-inf")
    lse_rest = torch.logsumexp(logits, dim=-1)  # log Σ_{v ≠ eos} exp(logit_v)   [N]
    proj = h @ direction  # [N]
    p = 1 - (1 - finish_share) ** (1 / completion_len)

    def p_eos(a: float) -> float:  # mean over positions of exp(a·proj) / (exp(a·proj) + Σ_rest)
        return float(torch.sigmoid(a * proj - lse_rest).mean())
    lo, hi = 0.0, 1.0
    while p_eos(hi) < p and hi < 1e4:
        hi *= 2
    for _ in range(60):
        lo, hi = (lo, (lo + hi) / 2) if p_eos((lo + hi) / 2) >= p else ((lo + hi) / 2, hi)
    emb[eos_id] = hi * direction
    return {"finish_share": round(finish_share, 4), "eos_prob_per_token": p, "u_energy": energy,
            "v_bias_norm": round(scale * float(b.norm()), 4), "eos_row_norm": round(hi, 4),
            "calibration_contexts": n}


def make_qwen(folder: Path, shape: dict, sizes: dict, seed: int = 0) -> dict:
    """Write into `folder`: model/ (the random model and its tokenizer), task.jsonl (GRPO prompts and
    answers) and pairs.jsonl (preference pairs). Returns the facts for the results file."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    t0 = time.time()
    tok, words = build_tokenizer(shape["vocab_size"])
    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).eval()  # float32, random weights
    first = tok.convert_tokens_to_ids("Ġ" + words[0])  # the data's words have consecutive ids
    eos = calibrate_eos(model, tok.eos_token_id, range(first, first + len(words)), sizes["prompt"],
                        sizes["completion"], FINISH_SHARE)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    n_params = sum(p.numel() for p in model.parameters())
    del model

    rng = np.random.default_rng(seed)
    words = np.array(words)

    def text(n: int) -> str:  # n random words, each after a space: n tokens
        return "".join(" " + w for w in words[rng.integers(len(words), size=n)])
    with open(folder / "task.jsonl", "w") as f:  # a completion that ends (and is not empty) says 7
        for _ in range(sizes["rows"]):
            f.write(json.dumps({"prompt": text(sizes["prompt"]), "answer": "7"}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(sizes["rows"]):
            f.write(json.dumps({"prompt": text(sizes["prompt"]), "chosen": text(sizes["completion"]),
                                "rejected": text(sizes["completion"])}) + "\n")
    # what the scripts will load: the same vocabulary, no token added, the data's lengths as planned
    loaded = AutoTokenizer.from_pretrained(folder / "model")
    assert len(loaded) == shape["vocab_size"] and loaded.pad_token_id == 0 and loaded.eos_token_id == 1
    assert len(loaded.encode(text(sizes["prompt"]), add_special_tokens=False)) == sizes["prompt"]
    return {"config": shape, "parameters": n_params, "tokenizer": type(loaded).__name__,
            "prompt_tokens": sizes["prompt"], "completion_tokens": sizes["completion"], "eos_row": eos,
            "build_seconds": round(time.time() - t0, 1)}


def qwen_runs(q: Path, runs: Path, sizes: dict) -> dict:
    """The commands of the qwen group. Evaluations are kept tiny: they are not what is checked."""
    m, c = str(q / "model"), str(sizes["completion"])
    shared = ["--model", m, "--warmup-steps", "0", "--eval-every", "100"]  # the steps run at the README's rate
    return {
        "qwen_grpo": ["grpo.py", *shared, "--data", str(q / "task.jsonl"), "--steps", str(sizes["steps"]),
                      "--prompts-per-step", "4", "--group-size", "4", "--micro-batch", "8", "--max-new-tokens", c,
                      "--lr", "1e-6", "--beta", "0.04", "--eval-size", "4", "--no-pass-at-k"],
        "qwen_dpo": ["dpo.py", *shared, "--data", str(q / "pairs.jsonl"), "--max-steps", str(sizes["steps"]),
                     "--batch-size", "8", "--lr", "5e-7", "--max-new-tokens", c, "--eval-size", "8",
                     "--eval-samples", "8"],
        "qwen_reward_model": ["reward_model.py", *shared, "--data", str(q / "pairs.jsonl"),
                              "--max-steps", str(sizes["rm_steps"]), "--batch-size", "8", "--lr", "1e-5",
                              "--max-new-tokens", c, "--norm-samples", "16", "--eval-size", "8"],
        # with the reward model that qwen_reward_model saved, so that ppo.py does not train its own
        "qwen_ppo": ["ppo.py", *shared, "--data", str(q / "pairs.jsonl"),
                     "--reward-model", str(runs / "qwen_reward_model" / "model"), "--steps", str(sizes["ppo_steps"]),
                     "--batch-size", "8", "--mini-batches", "2", "--ppo-epochs", "1", "--max-new-tokens", c,
                     "--lr", "1e-6", "--eval-samples", "8"],
    }


#####################################################################################################
#####  one run, and what is read from it
#####################################################################################################


def load_weights(folder: Path) -> dict:
    """Every tensor of a save_pretrained folder's *.safetensors files (shards too), not the reward head."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name != "reward_head.safetensors":
            out.update(load_file(str(f)))
    return out


def weights_changed(start: Path, end: Path, reward_model: bool) -> tuple[float, int]:
    """Share of the scalar weights that differ between the start model and the saved one, over the
    tensors present in both; returns (share, number of scalars compared).

    For reward_model.py: the LM head is not part of the reward model, and the embedding rows of
    tokens that no training batch held get no gradient (the reward model reads hidden states, not
    the tied LM head), so AdamW (weight decay 0) leaves them exactly as they were. Which tokens the
    batches held is not known here, so the rows that moved at all stand for them: a row that got a
    gradient moves in every entry, and the share then counts the entries of the rows that could move."""
    a, b = load_weights(start), load_weights(end)
    changed = total = 0
    for k, v in a.items():
        if k not in b or b[k].shape != v.shape or (reward_model and k.endswith("lm_head.weight")):
            continue
        diff = v != b[k]
        if reward_model and k.endswith("embed_tokens.weight"):
            diff = diff[diff.any(-1)]  # the rows that moved
        changed, total = changed + int(diff.sum()), total + diff.numel()
    return (changed / total if total else None), total


def tail(text, n: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-n:])


def run(name: str, group: str, argv: list[str], device: str, runs: Path, start: Path | None,
        timeout: float, hide: str) -> dict:
    """`python SCRIPT.py ARGS --device DEV --out-dir RUNS/NAME` in the wrapper; returns its row."""
    out, peak_file = runs / name, runs / f"{name}.peak.json"
    script, args = argv[0], [*argv[1:], "--device", device, "--out-dir", str(out)]
    cmd = [sys.executable, "-c", WRAPPER, str(peak_file), script, *args]
    row = {"run": name, "group": group, "script": script[:-3],
           "command": " ".join(["python", script, *args]).replace(hide, "$TMP"), "ok": False}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # threads: the scripts' own --threads default
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        row["returncode"], err = proc.returncode, (tail(proc.stderr) if proc.returncode != 0 else None)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        row["returncode"], err = None, f"timed out after {timeout:.0f} s\n{tail(e.stderr)}".strip()
    row["wall_seconds"] = round(time.time() - t0, 1)
    row["error"] = err
    if err is None:
        try:
            row.update(read_run(row["script"], out, argv, start))
            row["ok"] = True
        except Exception as e:  # a run that exits 0 but wrote no usable metrics is a failure too
            row["error"] = f"could not read the run's results: {type(e).__name__}: {e}"
    try:
        peak = json.loads(peak_file.read_text())
        row["peak_gpu_gib"] = None if peak["allocated"] is None else round(peak["allocated"] / 2**30, 2)
        row["peak_gpu_reserved_gib"] = None if peak["reserved"] is None else round(peak["reserved"] / 2**30, 2)
    except (OSError, ValueError):
        row["peak_gpu_gib"] = row["peak_gpu_reserved_gib"] = None
    return row


def flag(argv: list[str], name: str, default):
    """The value of `name` in argv, else the script's default that the caller gives."""
    return type(default)(argv[argv.index(name) + 1]) if name in argv else default


def read_run(script: str, out: Path, argv: list[str], start: Path | None) -> dict:
    """Seconds per step, throughput, KL at the start, a few last-step numbers, the weights changed."""
    if script == "dqn_maze":  # no step timer: the DQN learner's wall time over its environment steps
        d = json.loads((out / "summary.json").read_text())["dqn"]
        return {"steps": d["env_steps"], "step_seconds": d["wall_seconds"] / d["env_steps"],
                "first_step_seconds": None, "per_second": d["env_steps"] / d["wall_seconds"],
                "unit": "env steps/s", "kl_at_start": None, "last_step": {}, "weights_changed": None,
                "weights_compared": None}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1 and "time/step_seconds" in r]
    steady = steps[1:] or steps  # the first step pays for CUDA's warm-up
    step_s = float(np.mean([r["time/step_seconds"] for r in steady]))
    if script in ("grpo", "reinforce"):
        per_s, unit = float(np.mean([r["charts/completions_per_second"] for r in steady])), "completions/s"
    else:  # one step is one batch of pairs (dpo, reward_model) or of completions (ppo)
        batch = flag(argv, "--batch-size", {"dpo": 32, "reward_model": 32, "ppo": 64}[script])
        per_s, unit = batch / step_s, ("completions/s" if script == "ppo" else "pairs/s")
    kl = None
    if script in KL_AT_START:
        at, key = KL_AT_START[script]
        kl = next((r[key] for r in rows if r["step"] == at and key in r), None)
    share, n = weights_changed(start, out / "model", script == "reward_model")
    return {"steps": len(steps), "step_seconds": round(step_s, 4),
            "first_step_seconds": round(steps[0]["time/step_seconds"], 4), "per_second": round(per_s, 2),
            "unit": unit, "kl_at_start": kl,
            "last_step": {k: steps[-1][k] for k in LAST_STEP_KEYS if k in steps[-1]},
            "weights_changed": share, "weights_compared": n}


#####################################################################################################
#####  the report
#####################################################################################################


def table(result: dict) -> str:
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)
    out = [f"GPU check{' (dry run)' if result['dry_run'] else ''}, {result['date']}: {result['device_name']} "
           f"(`--device {result['device']}`), torch {result['torch']}, transformers {result['transformers']}, "
           f"{result['total_seconds']:.0f} s in all. Qwen-shaped runs: {result['qwen_shape_name']}.", "",
           "| run | group | ok | s/step | first step (s) | throughput | peak GPU (GiB) | weights changed | "
           "KL at start | wall (s) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        thr = "–" if r.get("per_second") is None else f"{r['per_second']:.4g} {r['unit']}"
        wc = r.get("weights_changed")
        out.append(f"| {r['run']} | {r['group']} | {'yes' if r['ok'] else '**no**'} | "
                   f"{num(r.get('step_seconds'), '.4g')} | {num(r.get('first_step_seconds'), '.4g')} | {thr} | "
                   f"{num(r.get('peak_gpu_gib'), '.2f')} | {'–' if wc is None else f'{100 * wc:.2f}%'} | "
                   f"{num(r.get('kl_at_start'), '.3g')} | {r['wall_seconds']:.0f} |")
    out += ["", "Commands (`$TMP` is a temporary folder; each ran inside the peak-memory wrapper):", ""]
    out += [f"- {r['run']}: `{r['command']}`" for r in result["runs"]]
    failed = [r for r in result["runs"] if not r["ok"]]
    for r in failed:
        out += ["", f"Error of {r['run']} (return code {r.get('returncode')}):", "", "```", r["error"] or "", "```"]
    return "\n".join(out)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=RUN_NAMES + ["defaults", "qwen"],
                    help="runs or groups to run (default: all); qwen_ppo brings qwen_reward_model with it")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape and few steps (for --device cpu)")
    ap.add_argument("--out", help="results JSON (default: bench/results/gpu_check.json; with --dry-run a "
                                  "temporary folder); the Markdown table goes beside it (.md)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per run (default: 300)")
    ap.add_argument("--keep-runs", action="store_true", help="keep the temporary run folders (path printed)")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"error: --device {a.device}: CUDA is not available here (try --device cpu --dry-run)\n")
    names = RUN_NAMES if not a.only else [n for n in RUN_NAMES if n in a.only
                                          or ("defaults" in a.only and n in DEFAULTS)
                                          or ("qwen" in a.only and n in QWEN_RUNS)]
    if "qwen_ppo" in names and "qwen_reward_model" not in names:
        names.insert(names.index("qwen_ppo"), "qwen_reward_model")  # ppo.py needs its reward model
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if a.out:
        out = Path(a.out)
    elif a.dry_run:
        out = tmp / "gpu_check_dry_run.json"  # never over the GPU's results
    else:
        out = ROOT / "bench" / "results" / "gpu_check.json"
    runs = tmp / "runs"
    runs.mkdir()
    t0 = time.time()
    shape, sizes = (DRY_SHAPE, DRY_SIZES) if a.dry_run else (QWEN_SHAPE, QWEN_SIZES)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "total_seconds": None, "device": a.device,
              "device_name": device_name(a.device), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "cuda": torch.version.cuda,
              "dry_run": a.dry_run, "platform": platform.platform(),
              "cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
              "qwen_shape_name": "a tiny shape (dry run)" if a.dry_run else "Qwen2.5-0.5B's shape",
              "qwen": None, "runs": []}
    commands = dict(DEFAULTS)
    if any(n in QWEN_RUNS for n in names):
        print(f"making the random model ({result['qwen_shape_name']}) and its data in {tmp / 'qwen'}", flush=True)
        result["qwen"] = make_qwen(tmp / "qwen", shape, sizes)
        commands.update(qwen_runs(tmp / "qwen", runs, sizes))
    for n in names:
        group = "qwen" if n in QWEN_RUNS else "defaults"
        start = (tmp / "qwen" / "model") if group == "qwen" else (ROOT / "models" / START[n] if n in START else None)
        if n == "qwen_ppo" and not next((r["ok"] for r in result["runs"] if r["run"] == "qwen_reward_model"), False):
            row = {"run": n, "group": group, "script": "ppo", "command": "", "ok": False, "returncode": None,
                   "wall_seconds": 0.0, "error": "not run: it needs the reward model of qwen_reward_model, "
                                                 "which failed"}
        else:
            row = run(n, group, commands[n], a.device, runs, start, a.timeout, str(tmp))
        result["runs"].append(row)
        wc = row.get("weights_changed")
        print(f"{n:18} {'ok    ' if row['ok'] else 'FAILED'} {row['wall_seconds']:6.1f} s"
              + (f"  {row['step_seconds']:.4g} s/step  {row['per_second']:.4g} {row['unit']}" if row["ok"] else "")
              + (f"  weights changed {100 * wc:.2f}%" if wc is not None else "")
              + (f"  peak {row['peak_gpu_gib']} GiB" if row.get("peak_gpu_gib") is not None else ""), flush=True)
    result["total_seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md + f"\n\nwrote {out} and {out.with_suffix('.md')}")
    if a.keep_runs:
        print(f"run folders kept in {tmp}")
    elif out.parent != tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # the results live in the temporary folder: remove only the runs and the model
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(tmp / "qwen", ignore_errors=True)
    sys.exit(0 if all(r["ok"] for r in result["runs"]) else 1)


if __name__ == "__main__":
    main()
