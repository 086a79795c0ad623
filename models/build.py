"""Remake the embedded models that the scripts load by name. The repository ships their files:

    models/tiny/          `--model tiny`, the arithmetic policy of grpo.py and reinforce.py
    models/tiny-pref/     `--model tiny-pref`, the SFT policy of the preference task, with its
                          preference pairs (pairs_train.jsonl, pairs_heldout.jsonl)
    models/tiny-pref-rm/  the reward model that ppo.py uses by default: what `python
                          reward_model.py` makes with its defaults, from models/tiny-pref
    models/tiny-ramble/   `--model models/tiny-ramble`, an arithmetic policy whose wrong answers
                          are long: the start model of bench/bench_length.py (Dr. GRPO's claim)
    models/tiny-long/     `--model models/tiny-long`, the start model of `--task long-addition`,
                          which answers directly or works the sum out column by column

Nothing is built when a script runs: the scripts load these folders with `from_pretrained`. This
file is how they were made, so that anyone can remake them, or make another build to test a
default against:

    python models/build.py tiny --seed 0 --out models/tiny
    python models/build.py tiny-pref --seed 0 --out models/tiny-pref
    python models/build.py tiny-pref-rm --seed 1 --out models/tiny-pref-rm --pref models/tiny-pref
    python models/build.py tiny-ramble --seed 0 --out models/tiny-ramble
    python models/build.py tiny-long --seed 0 --out models/tiny-long

Each folder gets a `build.json` with the command, the seed, the recipe, the torch and transformers
versions and the figures measured on the result. A build is deterministic on one machine (same
seed, same weights), but another CPU sums floats in another order, so it rebuilds slightly
different weights: that is why the files are shipped rather than built on first use.

The recipe of `tiny` (`TINY`): a supervised warm-up on the answers of a *sloppy annotator*.
    Every problem a+b= of the train split is labelled with its sum, except that when the ones
    digits carry (a%10 + b%10 ≥ 10, 45% of the problems), the annotator forgets the carry with
    probability `carry_slip` and writes a+b−10. The warm-up runs a fixed number of steps with a
    decaying learning rate, long enough to fit that label distribution, so the start figures are
    a property of the data, not of where a learning curve happened to be when it stopped:
      - greedy decoding answers the sums without a ones carry, and writes the slip on almost
        every sum with one (held-out greedy accuracy ≈ 0.6; 41% of the held-out sums carry);
      - sampling at temperature 1 finds the right sum of a carry problem with probability
        ≈ 1 − carry_slip per sample, so pass@8 is ≈ 0.95 or more.
    This is the situation RL with a verifiable reward is for: imitation copied a systematic error
    from the data, the model still samples the right answer, and an exact reward can reinforce it.
    An earlier recipe stopped a clean warm-up when a probe accuracy passed 35%; the curve of
    addition is steep there, and the same code gave start models between 0.30 and 0.61 on
    different seeds and CPUs.

The recipe of `tiny-ramble` (`TINY_RAMBLE`): the same annotator, who also *rambles* when it
    slips: after a+b−10 it writes a run of filler dots, of a length drawn uniformly from
    1..`ramble_max` at every visit (`37+48=` -> `85`, or `75` then 1 to 8 dots). Right answers stay
    short (the digits and EOS, 2-4 tokens), wrong ones are long (about 8 tokens), and the ramble
    carries no information: the strict reward of `75...` and of `75.......` is the same 0. With
    `--max-new-tokens 16` every label fits. This is the setting where the length bias of a 1/|y|
    loss (Dr. GRPO, arXiv:2503.20783 §3.1) can show on the wrong answers: see bench/bench_length.py.

The recipe of `tiny-long` (`TINY_LONG`): the annotator of long addition (tasks.py, "the
    long-addition task"). With probability `p_worked` it works the sum out column by column, from
    the ones up, and is always right (`347+285=` -> `(7+5=12,4+8+1=13,3+2+1=6)632`, 23-31 tokens
    with EOS); otherwise it answers directly, column by column in its head, forgetting each carry
    with probability `carry_slip` (`632`, or `532`, `622`, `522`: 3-4 tokens). So both formats are
    in the start model, the worked one rarer (three labels in ten), long and right, the direct one
    usual and mostly wrong (87% of these sums carry; its labels are right 26% of the time). The reward of
    `--task long-addition` is the final answer's correctness only: whether RL moves the policy to
    the long format is for it to find. One torch thread (the ops are small, and one thread fixes
    the order of the sums).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (needs sys.path above)

import tasks  # noqa: E402

#####################################################################################################
#####  recipes
#####################################################################################################

# `tiny`: a Llama-style model with a character tokenizer, warmed up on the sloppy annotator's labels.
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            sft_batch=128, sft_lr=1e-3, sft_warmup=50, sft_steps=3000, carry_slip=0.7,
            pass_k=8, max_new_tokens=4)

# `tiny-ramble`: `tiny`'s recipe, with wrong labels followed by 1..ramble_max filler dots, and room
# for them in the completion (3 digits at most, 8 dots, EOS: 12 tokens of 16).
TINY_RAMBLE = {**TINY, "ramble_max": 8, "max_new_tokens": 16}
RAMBLE = "."  # the filler character (one token of the character tokenizer)

# `tiny-long`: a Llama-style model with the character tokenizer, warmed up on the long-addition
# annotator (tasks.py, "the long-addition task"): with probability `p_worked` it works the sum out
# (always right), else it answers directly and forgets each carry with probability `carry_slip`.
TINY_LONG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 sft_batch=128, sft_lr=3e-3, sft_warmup=50, sft_steps=1200, p_worked=0.2, carry_slip=0.7,
                 pass_k=8, max_new_tokens=40)

# `tiny-pref`: a word-level Llama-style model fitted to the review grammar for a fixed number of
# steps, then 4,000 + 1,000 preference pairs sampled from it and labelled by Bradley–Terry on the
# hidden gold reward (tasks.py, "the preference task").
TINY_PREF = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 sft_batch=64, sft_lr=3e-3, sft_steps=200, train_pairs=4000, heldout_pairs=1000,
                 max_new_tokens=20)


#####################################################################################################
#####  tokenizers, built in code
#####################################################################################################


def build_char_tokenizer():
    """A character-level tokenizer: <pad>=0, <eos>=1, <unk>=2, then printable ASCII and newline.
    One character is one token, so an answer digit is exactly one token."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:-5]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: chars
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def build_word_tokenizer():
    """A word-level tokenizer: <pad>=0, <eos>=1, <unk>=2, then every word of the review grammar.
    Text is split on white space; decoding joins the words with single spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(tasks.PREF_POSITIVE + tasks.PREF_NEGATIVE + tasks.PREF_NEUTRAL
                       + tasks.PREF_INTENSIFIERS + tasks.PREF_TOPICS + tasks.PREF_ASPECTS
                       + tasks.PREF_VERBS + ("the", "and", "but")))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def small_llama(tok, cfg: dict, max_positions: int):
    """A freshly initialised Llama-style causal LM of the size in `cfg`, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None))


def sft_step(model, opt, sched, tok, prompts, completions) -> float:
    """One supervised step: next-token NLL on the completion and its EOS (not on the prompt)."""
    ids, mask, c_mask, T = common.encode_prompt_completion(tok, prompts, completions)
    logp, _ = common.token_logprobs(model, ids, mask, T)  # [B, T]
    loss = -common.masked_mean(logp, c_mask)  # −(1/N) Σ_t log π(y_t | x, y_<t)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor: linear warm-up over `warmup` steps, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


#####################################################################################################
#####  tiny: the arithmetic policy
#####################################################################################################


def ones_carry(prompt: str) -> bool:
    """'37+48=' -> True: the ones digits 7 + 8 carry into the tens."""
    a, b = (int(x) for x in prompt.rstrip("=").split("+"))
    return a % 10 + b % 10 >= 10


def sloppy_answer(row: dict, slip: float, rng: np.random.Generator, ramble_max: int = 0) -> str:
    """The annotator's label of one problem: the sum, or, when the ones digits carry, with
    probability `slip`, the sum without that carry (a + b − 10). Drawn anew at every visit.
    With ramble_max > 0 (`tiny-ramble`), a slip is followed by n ~ Uniform{1..ramble_max} RAMBLE
    characters; ramble_max = 0 draws nothing more, so `tiny`'s labels are unchanged."""
    if ones_carry(row["prompt"]) and rng.random() < slip:
        wrong = str(int(row["answer"]) - 10)
        return wrong + RAMBLE * int(rng.integers(1, ramble_max + 1)) if ramble_max > 0 else wrong
    return row["answer"]


@torch.no_grad()
def length_figures(model, tok, rows: list[dict], k: int, max_new_tokens: int, seed: int = 0) -> dict:
    """Mean completion length |y| (tokens up to and including the first EOS, as grpo.py counts
    them) of the right and of the wrong answers among k samples per prompt at temperature 1, a
    fixed seed in a forked RNG. A mean over no completion is None (JSON null), not NaN."""
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    answers = [r["answer"] for r in rows for _ in range(k)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        *_, c_mask, texts, finished = common.generate_text(model, tok, prompts, max_new_tokens)
    lengths = c_mask.sum(1).float()  # |y_i|   [n·k]
    right = torch.tensor([tasks.score(t, a, f) for t, a, f in zip(texts, answers, finished)]) > 0  # [n·k]
    def mean(sel):  # [n·k] bool -> the mean |y| of the selected completions, None if none
        return round(float(lengths[sel].mean()), 4) if sel.any() else None
    return {"sample_len_correct": mean(right), "sample_len_incorrect": mean(~right),
            "sample_no_eos_frac": round(1.0 - float(np.mean(finished)), 4)}


def arithmetic_figures(model, tok, rows: list[dict], k: int, max_new_tokens: int, seed: int = 0) -> dict:
    """The start figures of an arithmetic policy on `rows`: greedy accuracy, pass@1 and pass@k at
    temperature 1, each also split by whether the problem has a ones carry."""
    carry = [r for r in rows if ones_carry(r["prompt"])]
    plain = [r for r in rows if not ones_carry(r["prompt"])]
    out = {"heldout_accuracy": tasks.greedy_accuracy(model, tok, rows, max_new_tokens)}
    out.update(tasks.pass_at_k(model, tok, rows, k, max_new_tokens, seed=seed))
    for name, part in (("carry", carry), ("no_carry", plain)):
        out[f"heldout_accuracy_{name}"] = tasks.greedy_accuracy(model, tok, part, max_new_tokens)
        p = tasks.pass_at_k(model, tok, part, k, max_new_tokens, seed=seed)
        out[f"pass_at_1_{name}"], out[f"pass_at_k_{name}"] = p["pass_at_1"], p["pass_at_k"]
    out["heldout_carry_fraction"] = len(carry) / len(rows)
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}


def build_tiny(out: Path, seed: int, steps: int | None = None, log_every: int = 0,
               overrides: dict | None = None, recipe: dict = TINY) -> dict:
    """Warm up `tiny` (or `tiny-ramble`, recipe=TINY_RAMBLE) on the sloppy annotator's labels
    (next-token NLL on the answer and its EOS), save it into `out` and return the measured figures."""
    cfg = {**recipe, **(overrides or {})}
    cfg["sft_steps"] = steps or cfg["sft_steps"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = build_char_tokenizer()
    model = small_llama(tok, cfg, max_positions=128)
    train, heldout = tasks.arithmetic_task()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: linear_warmup_decay(s, cfg["sft_warmup"], cfg["sft_steps"]))
    losses = []
    for step in range(1, cfg["sft_steps"] + 1):
        batch = [train[i] for i in rng.integers(0, len(train), cfg["sft_batch"])]
        losses.append(sft_step(model, opt, sched, tok, [b["prompt"] for b in batch],
                               [sloppy_answer(b, cfg["carry_slip"], rng, cfg.get("ramble_max", 0))
                                for b in batch]))
        if log_every and step % log_every == 0:
            acc = tasks.greedy_accuracy(model, tok, heldout, cfg["max_new_tokens"])
            print(f"step {step:>5} | nll {np.mean(losses[-log_every:]):.4f} | held-out greedy {acc:.3f}",
                  flush=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    figures = arithmetic_figures(model, tok, heldout, cfg["pass_k"], cfg["max_new_tokens"])
    if cfg.get("ramble_max", 0) > 0:
        figures.update(length_figures(model, tok, heldout, cfg["pass_k"], cfg["max_new_tokens"]))
    return {"recipe": cfg, "sft_final_nll": round(float(np.mean(losses[-100:])), 4), **figures}


#####################################################################################################
#####  tiny-long: the start model of the long-addition task
#####################################################################################################


def long_label(row: dict, cfg: dict, rng: np.random.Generator) -> str:
    """The long-addition annotator's label of one problem, drawn anew at every visit: the worked
    answer with probability p_worked, else a direct answer whose carries slip (`direct_slip_answer`)."""
    if rng.random() < cfg["p_worked"]:
        return tasks.worked_answer(row["prompt"])
    return tasks.direct_slip_answer(row["prompt"], cfg["carry_slip"], rng)


@torch.no_grad()
def sampled_format_figures(model, tok, rows: list[dict], k: int, max_new_tokens: int, seed: int = 0) -> dict:
    """`tasks.format_figures` of k samples per prompt at temperature 1 (a fixed seed, forked RNG)."""
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    answers = [r["answer"] for r in rows for _ in range(k)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        *_, c_ids, c_mask, texts, finished = common.generate_text(model, tok, prompts, max_new_tokens)
    rewards = [tasks.score(c, a, f, "worked", tok) for c, a, f in zip(c_ids.tolist(), answers, finished)]
    return tasks.format_figures(texts, rewards, c_mask.sum(1).tolist())


def build_tiny_long(out: Path, seed: int, steps: int | None = None, log_every: int = 0,
                    overrides: dict | None = None) -> dict:
    """Warm up `tiny-long` on the long-addition annotator's labels (next-token NLL on the answer and
    its EOS), save it into `out` and return the measured figures: greedy and sampled (k per
    prompt), each with the share of worked answers and the accuracy of each format."""
    cfg = {**TINY_LONG, **(overrides or {})}
    cfg["sft_steps"] = steps or cfg["sft_steps"]
    torch.set_num_threads(1)  # ops this small only wait for a second thread; one thread, one sum order
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = build_char_tokenizer()
    model = small_llama(tok, cfg, max_positions=64)
    train, heldout = tasks.long_addition_task()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: linear_warmup_decay(s, cfg["sft_warmup"], cfg["sft_steps"]))
    losses = []
    for step in range(1, cfg["sft_steps"] + 1):
        batch = [train[i] for i in rng.integers(0, len(train), cfg["sft_batch"])]
        losses.append(sft_step(model, opt, sched, tok, [b["prompt"] for b in batch],
                               [long_label(b, cfg, rng) for b in batch]))
        if log_every and step % log_every == 0:
            g = tasks.greedy_format_figures(model, tok, heldout[:100], cfg["max_new_tokens"])
            print(f"step {step:>5} | nll {np.mean(losses[-log_every:]):.4f} | held-out greedy {g}", flush=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    greedy = tasks.greedy_format_figures(model, tok, heldout, cfg["max_new_tokens"])
    sampled = sampled_format_figures(model, tok, heldout, cfg["pass_k"], cfg["max_new_tokens"])
    figures = {"heldout_accuracy": greedy["accuracy"], **{f"greedy_{k}": v for k, v in greedy.items() if k != "accuracy"},
               **tasks.pass_at_k(model, tok, heldout, cfg["pass_k"], cfg["max_new_tokens"], "worked"),
               **{f"sample_{k}": v for k, v in sampled.items()}}
    figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    return {"recipe": cfg, "sft_final_nll": round(float(np.mean(losses[-100:])), 4), **figures}


#####################################################################################################
#####  tiny-pref: the SFT policy of the preference task, and its pairs
#####################################################################################################


@torch.no_grad()
def sample_preference_pairs(model, tokenizer, n_pairs: int, seed: int, max_new_tokens: int = 20,
                            batch_size: int = 1000) -> tuple[list[dict], list[float]]:
    """`n_pairs` preference pairs labelled like annotators: for a prompt x (a random topic), two
    completions a, b ~ π_SFT(·|x) at temperature 1, then a ≻ b with the Bradley–Terry probability

        P(a ≻ b) = σ(r_gold(a) − r_gold(b))

    (a coin flip, so about one label in four goes against the gold reward). Pairs where a == b,
    where a sample is empty, or where one did not finish within `max_new_tokens` are dropped and
    drawn again. Returns the rows {"prompt", "chosen", "rejected"} and the gold rewards of all kept
    samples."""
    rng = np.random.default_rng(seed)
    pairs: list[dict] = []
    golds: list[float] = []
    with torch.random.fork_rng(devices=[]):  # sampling reseeds torch's CPU RNG; the caller's is kept
        torch.manual_seed(seed)
        while len(pairs) < n_pairs:
            prompts = [f"the {tasks.PREF_TOPICS[i]}"
                       for i in rng.integers(len(tasks.PREF_TOPICS), size=batch_size)]
            *_, texts, finished = common.generate_text(
                model, tokenizer, [p for p in prompts for _ in (0, 1)], max_new_tokens)  # 2 per prompt
            for i, x in enumerate(prompts):
                a, b = texts[2 * i], texts[2 * i + 1]
                if (a == b or not (a.strip() and b.strip()) or not (finished[2 * i] and finished[2 * i + 1])
                        or len(pairs) == n_pairs):
                    continue
                p_a = 1.0 / (1.0 + np.exp(-(tasks.gold_reward(a) - tasks.gold_reward(b))))  # σ(r(a) − r(b))
                a_wins = rng.random() < p_a
                pairs.append({"prompt": x, "chosen": a if a_wins else b, "rejected": b if a_wins else a})
                golds += [tasks.gold_reward(a), tasks.gold_reward(b)]
    return pairs, golds


def build_tiny_pref(out: Path, seed: int, steps: int | None = None, n_pairs: tuple[int, int] | None = None) -> dict:
    """Fit `tiny-pref` to the grammar of `tasks.sample_review` (next-token NLL on the completion
    and its EOS, a fixed number of steps), save it into `out`, then sample the preference pairs
    from it and write them there as JSONL. Returns the measured figures."""
    cfg = dict(TINY_PREF)
    if steps:
        cfg["sft_steps"] = steps
    if n_pairs:
        cfg["train_pairs"], cfg["heldout_pairs"] = n_pairs
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = build_word_tokenizer()
    model = small_llama(tok, cfg, max_positions=64)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg["sft_steps"])
    for _ in range(cfg["sft_steps"]):
        prompts, completions = zip(*(tasks.sample_review(rng) for _ in range(cfg["sft_batch"])))
        loss = sft_step(model, opt, sched, tok, prompts, completions)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    facts = {"recipe": cfg, "sft_final_nll": round(loss, 4)}
    for split, n, s in (("train", cfg["train_pairs"], seed + 1), ("heldout", cfg["heldout_pairs"], seed + 2)):
        pairs, golds = sample_preference_pairs(model, tok, n, s, cfg["max_new_tokens"])
        with open(out / f"pairs_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        facts[f"{split}_ceiling"] = round(tasks.ceiling_accuracy(pairs), 4)
        if split == "heldout":
            facts.update(sample_gold_mean=round(float(np.mean(golds)), 4),
                         sample_gold_std=round(float(np.std(golds)), 4))
    return facts


#####################################################################################################
#####  tiny-pref-rm: reward_model.py with its defaults
#####################################################################################################


def build_tiny_pref_rm(out: Path, seed: int, pref: Path, max_steps: int | None = None) -> dict:
    """Train the default reward model: `python reward_model.py --model <pref> --seed <seed>`, with
    every other flag at its default, and keep its saved model folder as `out`."""
    import shutil
    import tempfile

    import reward_model

    with tempfile.TemporaryDirectory() as run:
        s = reward_model.train(reward_model.Args(model=str(pref), seed=seed, out_dir=run, overwrite=True,
                                                 max_steps=max_steps, device="cpu", dtype="float32"))
        for f in Path(s["model_dir"]).iterdir():
            shutil.copy2(f, out / f.name)
    keep = ("start_heldout_accuracy", "heldout_accuracy", "train_accuracy", "ceiling_accuracy",
            "reward_mean", "reward_std", "gold_correlation", "steps")
    shown = Path(pref).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown  # no checkout path in build.json
    return {"recipe": {"script": "reward_model.py", "model": str(shown), "max_steps": max_steps},
            **{k: round(s[k], 4) if isinstance(s[k], float) else s[k] for k in keep if k in s}}


#####################################################################################################
#####  command line
#####################################################################################################


def weights_sha256(folder: Path) -> str:
    """SHA-256 of model.safetensors: two builds with the same hash have the same weights."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["tiny", "tiny-pref", "tiny-pref-rm", "tiny-ramble", "tiny-long"],
                   help="which model to build")
    p.add_argument("--seed", type=int, default=None,
                   help="build seed (default: the shipped one: 0 for tiny, tiny-pref, tiny-ramble and tiny-long, 1 for tiny-pref-rm, "
                        "reward_model.py's default)")
    p.add_argument("--out", required=True, help="folder to write; must not exist or be empty")
    p.add_argument("--steps", type=int, default=None,
                   help="warm-up steps (tiny, tiny-pref, tiny-ramble, tiny-long) or reward-model steps (tiny-pref-rm); default: the recipe's")
    p.add_argument("--pairs", type=int, nargs=2, default=None, metavar=("TRAIN", "HELDOUT"),
                   help="tiny-pref only: how many preference pairs to sample (default 4000 1000)")
    p.add_argument("--pref", default=str(ROOT / "models" / "tiny-pref"),
                   help="tiny-pref-rm only: the SFT policy and pairs to train on (default models/tiny-pref)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="tiny, tiny-ramble, tiny-long: change one entry of the recipe (TINY, TINY_RAMBLE, TINY_LONG), "
                        "e.g. --set carry_slip=0.6")
    p.add_argument("--log-every", type=int, default=0,
                   help="tiny, tiny-ramble, tiny-long: print held-out accuracy every N steps")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.exit(2, f"error: --out {out} exists and is not an empty folder\n")
    if a.steps is not None and a.steps < 1:
        p.exit(2, f"error: --steps must be ≥ 1 (got {a.steps})\n")
    if a.name == "tiny-pref-rm" and not (Path(a.pref) / "pairs_train.jsonl").is_file():
        p.exit(2, f"error: --pref {a.pref}: no pairs_train.jsonl there (build tiny-pref first)\n")
    recipe = {"tiny-ramble": TINY_RAMBLE, "tiny-long": TINY_LONG}.get(a.name, TINY)
    overrides = {}
    for kv in a.set:
        key, _, value = kv.partition("=")
        if key not in recipe or not value:
            p.exit(2, f"error: --set {kv}: expected KEY=VALUE with KEY one of {', '.join(recipe)}\n")
        try:
            overrides[key] = type(recipe[key])(value)
        except ValueError:
            p.exit(2, f"error: --set {kv}: {key} takes a {type(recipe[key]).__name__}, got {value!r}\n")
    seed = a.seed if a.seed is not None else (1 if a.name == "tiny-pref-rm" else 0)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with torch.random.fork_rng(devices=[]):
            if a.name in ("tiny", "tiny-ramble"):
                facts = build_tiny(out, seed, a.steps, a.log_every, overrides, recipe)
            elif a.name == "tiny-long":
                facts = build_tiny_long(out, seed, a.steps, a.log_every, overrides)
            elif a.name == "tiny-pref":
                facts = build_tiny_pref(out, seed, a.steps, tuple(a.pairs) if a.pairs else None)
            else:
                facts = build_tiny_pref_rm(out, seed, Path(a.pref), a.steps)
    except BaseException:
        import shutil
        shutil.rmtree(out, ignore_errors=True)  # a failed build leaves nothing behind
        raise
    record = {"name": a.name, "command": "python models/build.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
              "seed": seed, **facts, "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "build_seconds": round(time.time() - t0, 1),
              "weights_sha256": weights_sha256(out)}
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "recipe"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
