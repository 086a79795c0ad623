"""The tasks: the project's own gym, and the users' data. A reader of an algorithm may skip it.

  #####  data             `read_jsonl` that names `file:line: reason`
  #####  the context      prompt + completion within the model's positions (`check_context`)
  #####  the verifiable task   arithmetic prompts with exact answers, `score` (the strict reward),
                          `--data FILE.jsonl` (prompt/answer rows, GSM8K as published)
  #####  the preference task  a hidden gold reward, the embedded SFT policy `tiny-pref`, noisy pairs
  #####  conversational rows   TRL's message lists, rendered with the chat template
  #####  reward models on disk `RewardModel`, `save_reward_model`, `load_reward_model`: r_φ as
                          reward_model.py saves it and ppo.py loads it

Each algorithm calls the task's reward in its own file (`score`, `gold_reward`, r_φ): the reward is
the task's, what is done with it is the algorithm's. Nothing here needs a network connection.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

import common
from common import MODELS_DIR, UsageError, check

#####################################################################################################
#####  data
#####################################################################################################


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), flag: str = "--data",
               validate=None) -> list[dict]:
    """Read a JSONL file: one JSON object per non-blank line, each with the `required` keys.

    `validate(row)` may return a reason why a row is unusable (else None). A bad line raises
    `UsageError("FILE:LINE: reason")`, so the user can open the file there.
    """
    p = Path(path)
    check(p.is_file(), f"{flag} {p}: " + ("is a folder, not a JSONL file" if p.is_dir() else "no such file"))
    rows = []
    with open(p, "rb") as f:
        head = f.read(2)
    check(head != b"\x1f\x8b", f"{flag} {p}: a gzip-compressed file; decompress it first (gunzip -k {p})")
    try:
        with open(p, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark at the start is skipped
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag} {p}: not UTF-8 text (byte {e.start} cannot be decoded); save it as "
                         "UTF-8 JSONL") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        check(isinstance(row, dict), f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        check(not missing, f"{p}:{n}: missing key(s) {', '.join(map(repr, missing))}")
        reason = validate(row) if validate is not None else None
        check(reason is None, f"{p}:{n}: {reason}")
        rows.append(row)
    check(len(rows) > 0, f"{flag} {p}: the file holds no rows")
    return rows


def jsonl_line(path: str | Path, index: int) -> int:
    """The line number of row `index` (0-based) of a JSONL file, blank lines skipped as `read_jsonl`
    skips them: for messages about a row found after reading."""
    with open(path, encoding="utf-8-sig") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()][index]


#####################################################################################################
#####  the context: prompt + completion within the model's positions
#####################################################################################################
#
# A model has positions 0 … n−1 (config.max_position_embeddings; GPT-2's n_positions answers to that
# name too). Past them a model with learned positions crashes (an IndexError deep in the embedding),
# and a rotary one (Llama, Qwen) runs on positions it was never trained on. So the scripts check the
# lengths once, before the run folder is made: generation needs prompt + --max-new-tokens ≤ n, and
# dpo.py's and reward_model.py's --max-length is capped at n.


def model_context(model) -> int | None:
    """The model's number of positions (config.max_position_embeddings); None if it declares none."""
    n = getattr(model.config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_context(tokenizer, model, prompts: list[str], max_new_tokens: int, data: str | None = None,
                  flag: str = "--max-new-tokens") -> None:
    """One line, not a crash or a run past the model's positions, unless every prompt + `max_new_tokens`
    generated tokens fits them. The longest prompt is named: with `data`, by its line of that file
    (`prompts[i]` is row i of it), else by its start. A prompt that alone fills the context is
    refused as such; otherwise the error names `flag` and the largest value that fits."""
    n = model_context(model)
    if n is None or not prompts:
        return
    encoded = common.encode_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in encoded]  # BOS included where added
    unk = tokenizer.unk_token_id  # (GPT-2's "unk" is its EOS: a byte-level tokenizer has no unknowns)
    if unk is not None and unk not in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id):
        bad = [j for j, ids in enumerate(encoded) if unk in ids]
        if bad:  # the embedded character-level models know ASCII only
            where = f"{data}:{jsonl_line(data, bad[0])}" if data else f"the prompt {prompts[bad[0]][:40]!r}"
            print(f"warning: {len(bad)} prompt(s) hold characters that the tokenizer of --model does not "
                  f"know, read as {tokenizer.unk_token} (the first: {where})", flush=True)
    i = max(range(len(lengths)), key=lengths.__getitem__)  # the longest prompt
    where = f"{data}:{jsonl_line(data, i)}" if data else f"the prompt {prompts[i][:40]!r}…"
    check(lengths[i] < n, f"{where}: the prompt has {lengths[i]} tokens, which fill the context of --model "
                          f"({n} positions): no room for a completion (shorten it, or drop the row)")
    check(lengths[i] + max_new_tokens <= n,
          f"{flag} {max_new_tokens}: the longest prompt ({where}, {lengths[i]} tokens) and {max_new_tokens} "
          f"new tokens exceed the context of --model ({n} positions); give {flag} {n - lengths[i]} or less, "
          "or shorten that prompt")


def cap_max_length(max_length: int | None, model, flag: str = "--max-length") -> int | None:
    """`max_length` (None: no limit) capped at the model's context; the cap is printed when it bites."""
    n = model_context(model)
    if n is None or (max_length is not None and max_length <= n):
        return max_length
    print(f"{flag} {'none' if max_length is None else max_length}: capped at {n}, the context of --model "
          "(config max_position_embeddings)")
    return n


#####################################################################################################
#####  the verifiable task: arithmetic with exact answers, or `--data FILE.jsonl`
#####################################################################################################

ARITH_HELDOUT = 500  # held-out problems, never trained on (neither in the warm-up nor in RL)


def arithmetic_task() -> tuple[list[dict], list[dict]]:
    """All 10,000 `a+b=` problems with 0 ≤ a, b ≤ 99, split once (fixed seed, independent of
    --seed) into (train, heldout). Rows are {"prompt": "37+48=", "answer": "85"}. The one-digit
    operands matter: in the warm-up they act as a curriculum (with two-digit operands only, the
    same model needs several times more steps to learn the format and the carries)."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)]
    order = np.random.default_rng(1234).permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows[ARITH_HELDOUT:], rows[:ARITH_HELDOUT]


def gsm8k_answer(answer) -> str:
    """The number of an answer field. GSM8K, as published, writes the worked solution and then
    `#### 72`: the final answer is what follows the last `####` (thousands commas dropped).
    Anything else comes back as its string.
    >>> gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"), gsm8k_answer(7)
    ('1072', '7')
    """
    s = str(answer)
    return s.rsplit("####", 1)[1].strip().replace(",", "") if "####" in s else s


def load_task(data: str | None, heldout_size: int = ARITH_HELDOUT, task: str = "arithmetic") -> tuple[list[dict], list[dict]]:
    """(train, heldout) rows {"prompt", "answer"}. No `--data`: the built-in task `task` (`TASKS`). With
    `--data FILE.jsonl`: lines of {"prompt": str, "answer": str or number}, or GSM8K as published,
    {"question": str, "answer": "<solution> #### 72"}; the last `heldout_size` rows (at most a
    fifth of the file) are held out. A "prompt" may also be a list of {"role", "content"} messages
    (TRL's conversational prompt-only rows): the script renders it with `chat_prompt`."""
    check(task in TASKS, f"--task {task!r}: expected one of {', '.join(TASKS)}")
    check(data is None or task == "arithmetic", f"--task {task} is a built-in task: drop --data, or --task")
    if data is None:
        return arithmetic_task() if task == "arithmetic" else long_addition_task()

    def why_bad(r):
        key = "prompt" if "prompt" in r else "question" if "question" in r else None
        if key is None:
            return "missing key 'prompt' (or GSM8K's 'question')"
        if not (isinstance(r[key], str) and r[key] != "" or key == "prompt" and is_messages(r[key])):
            return f"{key!r} must be a non-empty string" + (" or a list of {\"role\", \"content\"} messages"
                                                            if key == "prompt" else "")
        if parse_number(gsm8k_answer(r["answer"])) is None:
            return f"'answer' {r['answer']!r} is not a number (nor a GSM8K answer ending in '#### NUMBER')"
        return None
    rows = read_jsonl(data, required=("answer",), validate=why_bad)
    rows = [{"prompt": r["prompt"] if "prompt" in r else r["question"], "answer": gsm8k_answer(r["answer"])}
            for r in rows]
    check(len(rows) >= 2, f"--data {data}: need at least 2 rows (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


def parse_number(s: str):
    """'1,234' -> 1234, '-3.5' -> -7/2, anything else -> None. An exact `Fraction`, so that two
    long integers that differ in the last digit never compare equal (as floats they could)."""
    from fractions import Fraction
    s = s.strip().replace(",", "")
    if len(s) > 200:  # no answer is that long; Python also refuses int() of > 4300 digits
        return None
    return Fraction(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None


def score(completion, answer: str, finished: bool, strict: bool | str = True, tokenizer=None) -> float:
    """The verifiable reward: 1.0 if the completion answers `answer`, else 0.0. Never raises.

    completion: the generated token ids (a list of ints, with `tokenizer`; everything from the
    first stop token on is dropped: EOS, or another of the model's, `common.stop_ids`), or the
    decoded text. A completion that did not finish (no EOS within
    the token limit) scores 0 either way: an answer that was cut off is not an answer.

    strict (the built-in arithmetic task) scores what was generated: the tokens before the EOS must
    spell the number and nothing else, in its one canonical form:
      - ASCII digits with an optional leading '-' (`85`; not ` 85`, `85 `, `85.`, `+85`, `85.0`, `8 5`);
      - no leading zero (`085`, `00`) and no `-0`;
      - from ids, no special token (nor an id outside the vocabulary) before the EOS:
        `8 <pad> 5 <eos>` scores 0, as in the process reward (`digit_step_rewards`), though its
        text without special tokens reads `85`.
    From text, strict can only check what the text still holds: a caller that decoded with
    skip_special_tokens=True has already removed any `<pad>` or `<unk>`, so pass the ids for the
    whole check. The answer may be spelled any way `parse_number` reads (`"085"` is 85).

    Not strict (`--data`): the last number in the text (special tokens skipped) counts, GSM8K style
    (`... so the answer is 1,234.`); leading zeros and signs are read as numbers.

    strict="worked" (`--task long-addition`): what follows the last ')' is scored strictly, as
    above; the work before it, if any, is neither checked nor rewarded (`worked_answer`).
    """
    if not finished:
        return 0.0
    if tokenizer is not None and isinstance(completion, (list, tuple)) \
            and all(isinstance(i, int) for i in completion):
        stops = set(common.stop_ids(tokenizer))  # EOS, and the model's other stop tokens
        ids = list(completion)
        ids = ids[:next((k for k, i in enumerate(ids) if i in stops), len(ids))]  # before the first EOS
        special, n_vocab = set(tokenizer.all_special_ids), len(tokenizer)
        if strict and any(i in special or not 0 <= i < n_vocab for i in ids):
            return 0.0  # a <pad>, <unk>, ... (or no token at all) inside the answer: not the number as written
        try:
            completion = tokenizer.decode(ids, skip_special_tokens=True)
        except Exception:  # ids the tokenizer cannot decode (out of its vocabulary) are no answer
            return 0.0
    if not isinstance(completion, str):
        return 0.0
    target = parse_number(str(answer))
    if strict == "worked":  # the final answer only: the text after the work's closing ')'
        completion = completion.rsplit(WORK_CLOSE, 1)[-1]
    if strict:  # ASCII digits only, canonical: 0, or a non-zero first digit (after an optional '-')
        got = parse_number(completion) if re.fullmatch(r"0|-?[1-9][0-9]*", completion) else None
    else:
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
        got = parse_number(nums[-1]) if nums else None
    return float(got is not None and target is not None and got == target)


def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, strict: bool | str = True,
                    batch_size: int = 256) -> float:
    """Held-out accuracy of greedy decoding: the mean of `score` over `rows`, scored from the
    generated token ids (so a special token inside a strict answer counts as wrong)."""
    if not rows:
        return 0.0
    return greedy_format_figures(model, tokenizer, rows, max_new_tokens, strict, batch_size)["accuracy"]


@torch.no_grad()
def pass_at_k(model, tokenizer, rows: list[dict], k: int, max_new_tokens: int, strict: bool | str = True,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 512) -> dict:
    """What sampling can reach: k completions per prompt at `temperature`, scored by `score` from
    the generated token ids.

        pass@1 = mean over prompts and samples of the reward    (the expected reward of one sample)
        pass@k = fraction of prompts with at least one right answer among their k samples

    GRPO and REINFORCE can only reinforce answers they sample, so pass@G of the start model bounds
    what they can find. The samples use a fixed seed in a forked RNG (the caller's RNG state is
    kept), so the figure of a model is the same whenever it is measured.
    Returns {"k": k, "pass_at_1": float, "pass_at_k": float}.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = []  # [n_prompts, k] as nested lists
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        per = max(1, batch_size // k)  # prompts per generate call
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            _, _, c_ids, _, _, finished = common.generate_text(model, tokenizer, [r["prompt"] for r in chunk for _ in range(k)],
                                                        max_new_tokens, temperature)  # the k samples are consecutive
            ids = c_ids.tolist()  # [b·k][T]
            for j, r in enumerate(chunk):
                hits.append([score(ids[j * k + s], r["answer"], finished[j * k + s], strict, tokenizer)
                             for s in range(k)])
    model.train(was_training)
    h = np.array(hits, dtype=np.float64).reshape(-1, k)  # [n, k]
    return {"k": k, "pass_at_1": float(h.mean()) if h.size else 0.0,
            "pass_at_k": float((h.max(1) > 0).mean()) if h.size else 0.0}


def pass_metrics(p: dict | None) -> dict:
    """The logged names of a `pass_at_k` result: eval/pass@1 and eval/pass@k."""
    return {} if p is None else {"eval/pass@1": p["pass_at_1"], f"eval/pass@{p['k']}": p["pass_at_k"]}


def pass_text(p: dict | None) -> str:
    return "" if p is None else f"; pass@1 {p['pass_at_1']:.3f}, pass@{p['k']} {p['pass_at_k']:.3f}"


def digit_step_rewards(completion_ids: torch.Tensor, comp_mask: torch.Tensor,
                       target_ids: list[list[int]]) -> torch.Tensor:
    """Process rewards for the arithmetic task: every completion token is a step, the EOS
    included (not one step per answer digit).  -> [B, T]

    Step j ends at completion token j and is rewarded 1 if that token is the j-th token of the
    target (the answer's tokens, then EOS), else 0. So `85<eos>` against `85` earns [1, 1, 1],
    `75<eos>` earns [0, 1, 1], `8<eos>` earns [1, 0], and `8<pad>5<eos>` earns [1, 0, 0, 0] (a
    special token is a wrong step, and shifts the rest). Tokens past the target's length earn 0,
    and positions outside the completion mask are 0. The comparison is of token ids, so a number
    spelled with other tokens than `tokenizer.encode(answer)` earns 0 where `score` may give 1.
    """
    B, T = completion_ids.shape
    target = torch.full((B, T), -1, dtype=torch.long, device=completion_ids.device)  # [B, T]
    for i, t in enumerate(target_ids):
        n = min(len(t), T)
        target[i, :n] = torch.tensor(t[:n], dtype=torch.long)
    hit = (completion_ids == target) & comp_mask.bool()  # [B, T]
    return hit.float()  # [B, T]


#####################################################################################################
#####  the long-addition task: answers worth working out (`--task long-addition`)
#####################################################################################################
#
# Three-digit sums, which a model can answer directly or work out column by column, as taught at
# school, before it answers:
#
#   prompt      "347+285="
#   direct      "632"                                     the answer alone: 3-4 tokens with EOS
#   worked      "(7+5=12,4+8+1=13,3+2+1=6)632"            the columns from the ones up, each with
#                                                         its carry in (+1), then the answer: 23-31
#                                                         tokens with EOS
#   reward      `score(..., strict="worked")`: 1 if what follows the last ')' (the whole completion
#               if there is none) is the sum, written canonically. The work is neither checked nor
#               rewarded, and its length costs nothing: only the final answer counts.
#
# Its start model, `models/tiny-long` (models/build.py), imitates an annotator who usually answers
# directly and forgets carries when doing so, and sometimes works the sum out (always right): both
# formats are in the model at the start, the worked one rarer, longer and more accurate. Whether RL
# moves the policy to the longer format, from the correctness of the final answer alone, is what
# grpo.py's per-evaluation figures show (`format_figures`).

TASKS = {  # --task NAME: what each built-in task is (no --data)
    "arithmetic": "a+b= with 0 <= a, b <= 99, the answer alone (the default; start model: tiny)",
    "long-addition": "a+b= with 100 <= a, b <= 999, answered directly or worked out column by column "
                     "(start model: models/tiny-long, with --max-new-tokens 40 --lr 1e-4)",
}
TASK_MAX_TOKENS = {"arithmetic": 4, "long-addition": 31}  # the longest right answer, EOS included
LONG_HELDOUT = 500  # held-out long additions
LONG_TRAIN = 50_000  # train problems (of the 810,000 pairs; RL draws from them)
WORK_OPEN, WORK_CLOSE = "(", ")"  # the worked format's brackets: the answer follows WORK_CLOSE


def long_addition_task() -> tuple[list[dict], list[dict]]:
    """(train, heldout): LONG_TRAIN and LONG_HELDOUT distinct `a+b=` problems with 100 ≤ a, b ≤ 999,
    drawn once with a fixed seed (independent of --seed). Rows are {"prompt": "347+285=", "answer": "632"}."""
    pick = np.random.default_rng(4321).choice(900 * 900, LONG_HELDOUT + LONG_TRAIN, replace=False)
    rows = [{"prompt": f"{100 + i // 900}+{100 + i % 900}=", "answer": str(200 + i // 900 + i % 900)}
            for i in pick.tolist()]
    return rows[LONG_HELDOUT:], rows[:LONG_HELDOUT]


def worked_answer(prompt: str) -> str:
    """The worked-out answer of `a+b=`: every column from the ones up as `x+y=s`, with `+1` where
    a carry comes in, then the sum. The last digit of each column sum s is the answer's digit
    there, and s ≥ 10 carries one into the next column.
    >>> worked_answer("347+285="), worked_answer("120+301=")
    ('(7+5=12,4+8+1=13,3+2+1=6)632', '(0+1=1,2+0=2,1+3=4)421')
    """
    a, b = prompt.rstrip("=").split("+")
    n = max(len(a), len(b))
    a, b = a.zfill(n), b.zfill(n)
    steps, carry = [], 0
    for x, y in zip(reversed(a), reversed(b)):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}" + "+1" * carry + f"={s}")
        carry = s // 10
    return WORK_OPEN + ",".join(steps) + WORK_CLOSE + str(int(a) + int(b))


def direct_slip_answer(prompt: str, slip: float, rng: np.random.Generator) -> str:
    """A direct answer as a hurried annotator writes it: column by column from the ones up, but each
    carry is forgotten with probability `slip` (the column keeps its last digit, the next one gets
    no +1). slip = 0 gives the sum. `347+285=` with both carries forgotten: 2, 2, 5 -> `522`."""
    a, b = prompt.rstrip("=").split("+")
    n = max(len(a), len(b))
    total, carry = 0, 0
    for i, (x, y) in enumerate(zip(reversed(a.zfill(n)), reversed(b.zfill(n)))):
        s = int(x) + int(y) + carry
        total += (s % 10) * 10 ** i
        carry = 1 if s >= 10 and rng.random() >= slip else 0  # the carry, unless forgotten
    return str(total + carry * 10 ** n)


def completion_format(text: str) -> str:
    """'worked' if the completion opens with WORK_OPEN and closes the work (WORK_CLOSE), else
    'direct' (an unfinished or malformed attempt at work counts as direct: it did not write the steps
    through to an answer)."""
    return "worked" if text.startswith(WORK_OPEN) and WORK_CLOSE in text else "direct"


def format_figures(texts: list[str], rewards, lengths) -> dict:
    """The length dynamics of a set of completions (texts, their rewards and token lengths |y|,
    EOS included): accuracy, mean |y|, the share written out, and the accuracy of each format
    (None where a format has no completion)."""
    worked = np.array([completion_format(t) == "worked" for t in texts], dtype=bool)  # [n]
    r, n = np.asarray(rewards, dtype=np.float64), np.asarray(lengths, dtype=np.float64)  # [n], [n]
    def mean(x, sel):
        return float(x[sel].mean()) if sel.any() else None
    return {"accuracy": float(r.mean()), "mean_length": float(n.mean()), "worked_frac": float(worked.mean()),
            "accuracy_worked": mean(r, worked), "accuracy_direct": mean(r, ~worked)}


@torch.no_grad()
def greedy_format_figures(model, tokenizer, rows: list[dict], max_new_tokens: int, strict: bool | str = "worked",
                          batch_size: int = 256) -> dict:
    """`format_figures` of greedy decoding on `rows` (its "accuracy" is `greedy_accuracy`), each
    completion scored by `score` from its generated token ids."""
    was_training = model.training
    model.eval()
    texts, rewards, lengths = [], [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        _, _, c_ids, c_mask, t, finished = common.generate_text(model, tokenizer, [r["prompt"] for r in chunk],
                                                                max_new_tokens, greedy=True)  # [b, T]
        texts += t
        lengths += c_mask.sum(1).tolist()
        rewards += [score(ids, r["answer"], f, strict, tokenizer) for ids, r, f in zip(c_ids.tolist(), chunk, finished)]
    model.train(was_training)
    return format_figures(texts, rewards, lengths)


def check_task(task: str, data: str | None, max_new_tokens: int) -> None:
    """One line, not a run whose answers are all cut off, if --max-new-tokens cannot hold the task's
    longest right answer."""
    need = TASK_MAX_TOKENS.get(task, 0) if data is None else 0
    check(max_new_tokens >= need, f"--max-new-tokens {max_new_tokens}: --task {task}'s worked answers take "
                                  f"up to {need} tokens (EOS included); give at least that: " + TASKS.get(task, ""))


def task_scoring(task: str, data: str | None) -> bool | str:
    """How `score` reads the task's answers: the built-in arithmetic strictly (True), long addition
    by the strict answer after the work ("worked"), a --data file by its last number (False)."""
    return False if data is not None else ("worked" if task == "long-addition" else True)


#####################################################################################################
#####  the preference task: a hidden gold reward, the embedded SFT policy `tiny-pref`, noisy pairs
#####################################################################################################
#
# Used by reward_model.py and dpo.py (and ppo.py). Real human labels cannot be used offline, so this
# synthetic task keeps what matters about them (notes `003`, "Training the reward model"): every
# text has a true scalar reward, which nobody observes; an annotator compares two texts and prefers
# one with the Bradley–Terry probability P(a ≻ b) = σ(r_gold(a) − r_gold(b)), so the labels are
# noisy. The gold reward is used only to label pairs and to evaluate, never to train.
#
#   prompt      "the hotel"                      (one of the PREF_TOPICS)
#   completion  "was really great but the staff was rude"      (sampled from the SFT policy)
#   r_gold      #positive words − #negative words − 0.5 · max(0, #words − 15)      = 1 − 1 = 0
#
# `tiny-pref` is the SFT policy: a word-level Llama-style model (models/build.py), fitted
# to a small grammar of short reviews whose adjectives are positive, negative or neutral at random,
# so its samples have a mean gold reward near 0 and a lot of room to improve (the best texts the
# grammar allows score +3). The preference pairs are two samples of that policy for one prompt,
# written as JSONL {"prompt", "chosen", "rejected"}, the format of TRL and of public preference
# datasets; `--data FILE.jsonl` swaps in a user's own file of that format.

PREF_POSITIVE = ("great", "good", "lovely", "excellent", "wonderful", "nice", "perfect", "amazing",
                 "friendly", "fun")
PREF_NEGATIVE = ("bad", "awful", "terrible", "poor", "boring", "rude", "dirty", "slow", "broken",
                 "horrible")
PREF_NEUTRAL = ("ok", "small", "big", "new", "old", "loud", "quiet", "cheap", "busy", "simple")
PREF_INTENSIFIERS = ("very", "really", "quite", "so")
PREF_TOPICS = ("hotel", "food", "movie", "book", "phone", "car", "city", "beach", "show", "class",
               "team", "coffee", "pizza", "park", "trip", "game", "song", "laptop", "museum", "bus")
PREF_ASPECTS = ("price", "staff", "view", "ending", "start", "story", "sound", "owner", "menu",
                "screen", "seat", "music")
PREF_VERBS = ("was", "looked", "felt", "seemed")
GOLD_FREE_WORDS = 15  # a completion of up to this many words pays no length cost (the grammar's longest)
GOLD_LENGTH_COST = 0.5  # gold reward lost per word beyond GOLD_FREE_WORDS

PREF_HELDOUT = 1000  # held-out pairs of a --data file: at most this many, and at most a fifth


def gold_reward(text: str) -> float:
    """The hidden gold reward of a completion (sentiment from word lists, with a length cost):

        r_gold(y) = #{words of y in PREF_POSITIVE} − #{words in PREF_NEGATIVE}
                    − GOLD_LENGTH_COST · max(0, #words − GOLD_FREE_WORDS)

    Words are split on white space and lower-cased. The length cost stops a policy from gaming the
    count by writing ever longer lists of positive words: past 15 words, every word costs 0.5.
    >>> gold_reward("was really great but the staff was rude"), gold_reward("was great and the view was nice")
    (0.0, 2.0)
    """
    words = text.lower().split()
    pos = sum(w in PREF_POSITIVE for w in words)
    neg = sum(w in PREF_NEGATIVE for w in words)
    return float(pos - neg) - GOLD_LENGTH_COST * max(0, len(words) - GOLD_FREE_WORDS)


def sample_review(rng: np.random.Generator) -> tuple[str, str]:
    """One (prompt, completion) of the SFT grammar, the text `tiny-pref` is fitted to:

        prompt      the TOPIC
        completion  VERB [INTENSIFIER] ADJ  { and|but the ASPECT was [INTENSIFIER] ADJ }   (0-2 times)

    with 1, 2 or 3 clauses (probabilities 0.3, 0.4, 0.3), an intensifier with probability 0.3, and
    each adjective positive, negative or neutral with probabilities 0.4, 0.4, 0.2. So the gold
    reward of a text runs from −3 to +3, with mean 0.
    """
    def pick(seq):
        return seq[rng.integers(len(seq))]
    words: list[str] = []
    for k in range(rng.choice(3, p=[0.3, 0.4, 0.3]) + 1):
        if k > 0:
            words += [pick(("and", "but")), "the", pick(PREF_ASPECTS), "was"]
        else:
            words.append(pick(PREF_VERBS))
        if rng.random() < 0.3:
            words.append(pick(PREF_INTENSIFIERS))
        words.append(pick((PREF_POSITIVE, PREF_NEGATIVE, PREF_NEUTRAL)[rng.choice(3, p=[0.4, 0.4, 0.2])]))
    return f"the {pick(PREF_TOPICS)}", " ".join(words)


@torch.no_grad()
def sample_and_score(policy, ref, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     gold: bool, score_fn=None, batch_size: int = 250) -> dict:
    """The sampled evaluation of dpo.py and ppo.py, one code path so their numbers compare.

    Sample one completion per prompt from π_θ (temperature 1, a fixed seed, so evaluations before
    and after use the same random numbers; the caller's RNG state is kept) and measure:
        gold reward   mean r_gold(y)                                    (built-in task only)
        KL to π_ref   mean over samples of Σ_t [log π_θ(y_t|·) − log π_ref(y_t|·)], an unbiased
                      estimate of D_KL(π_θ(·|x) ‖ π_ref(·|x)) in nats per completion (k1, y ~ π_θ)
        score         mean score_fn(input_ids, attention_mask, finished) [b] -> [b], if given
                      (ppo.py: the reward model minus the EOS penalty)
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    golds, kls, lengths, scores, texts_all = [], [], [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            p_ids, p_mask, c_ids, c_mask, texts, finished = common.generate_text(
                policy, tokenizer, prompts[i:i + batch_size], max_new_tokens)  # c_ids, c_mask: [b, T]
            ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [b, P+T]
            T = c_ids.shape[1]
            logp, _ = common.token_logprobs(policy, ids, mask, T)  # log π_θ   [b, T]
            ref_logp, _ = common.token_logprobs(ref, ids, mask, T)  # log π_ref   [b, T]
            kls.append(common.masked_sum(logp - ref_logp, c_mask, dim=1))  # Σ_t log π_θ/π_ref   [b]
            lengths.append(c_mask.sum(1).float())  # [b]
            if score_fn is not None:
                scores.append(score_fn(ids, mask, torch.tensor(finished, device=device)).float())  # [b]
            texts_all += texts
            if gold:
                golds += [gold_reward(t) for t in texts]
    policy.train(was_training)
    return {"gold_reward": float(np.mean(golds)) if gold else None,
            "gold_reward_std": float(np.std(golds)) if gold else None,
            "kl_to_ref": float(torch.cat(kls).mean()), "mean_length": float(torch.cat(lengths).mean()),
            "score": float(torch.cat(scores).mean()) if scores else None, "texts": texts_all}


def ceiling_accuracy(pairs: list[dict]) -> float:
    """How often the gold reward itself agrees with the labels: the mean over pairs of
    1[r_gold(chosen) > r_gold(rejected)] + ½·1[equal]. The labels are drawn from σ(Δr_gold), so the
    best any predictor can do on average is to side with the gold reward: no reward model beats
    this number except by chance."""
    agree = [float(np.sign(gold_reward(p["chosen"]) - gold_reward(p["rejected"]))) for p in pairs]
    return float(np.mean([(a + 1) / 2 for a in agree]))  # +1 -> 1, 0 (a tie) -> ½, −1 -> 0


#####################################################################################################
#####  conversational rows (TRL's format): lists of {"role", "content"} messages, rendered as text
#####################################################################################################
#
# A conversational row holds messages instead of text: "prompt": [{"role": "user", "content": ...}],
# "chosen": [{"role": "assistant", "content": ...}]. The scripts turn each into plain text with the
# tokenizer's chat template, once, right after loading the model (`render_chat`); from there on a row
# is text like any other. As in TRL: the prompt is rendered with the generation prompt (the opening
# of the assistant's turn), the completion is what rendering prompt + completion adds after it, and a
# preference row without "prompt" takes the messages that chosen and rejected share as its prompt
# (TRL's "implicit prompt"). Our one difference: the completion's own EOS is cut off the text,
# because `encode_prompt_completion` appends EOS to every completion (a template whose turns end
# in another token keeps that token, and gets the EOS after it). What the template writes after
# that EOS (Qwen: "\n") is cut too, and a reward model reads it back (`chat_suffix`).


def is_messages(value) -> bool:
    """True for a conversational value: a list of {"role": str, "content": str} dicts."""
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


def why_bad_text(row: dict, key: str) -> str | None:
    """Why row[key] is neither a non-empty string nor a list of messages (None if it is fine)."""
    v = row[key]
    if isinstance(v, list):
        return None if is_messages(v) else (f"{key!r} must be a string or a non-empty list of "
                                            '{"role": str, "content": str} messages')
    if not isinstance(v, str):
        return f"{key!r} must be a string or a list of messages, got {type(v).__name__}"
    return f"{key!r} is empty" if v.strip() == "" else None


def check_chat_template(tokenizer, model: str, wrap: bool, rows: list[dict] = ()) -> None:
    """One line, not a Jinja traceback, when the tokenizer has no chat template and one is needed:
    for --chat-template (`wrap`), or for conversational `rows` (a "prompt" that is a list of messages)."""
    conversational = any(isinstance(r["prompt"], list) for r in rows)
    check(not (wrap or conversational) or bool(getattr(tokenizer, "chat_template", None)),
          f"{'--chat-template' if wrap else '--data (rows of messages)'}: the tokenizer of --model {model} "
          "has no chat template (give a chat/instruct model, or plain-text rows without --chat-template)")


def chat_prompt(tokenizer, prompt, wrap: bool = False) -> str:
    """The text of a prompt: a list of messages rendered with the chat template and the generation
    prompt; a string as it is, or (with `wrap`, i.e. --chat-template) as one user message."""
    if isinstance(prompt, str) and not wrap:
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _cut_eos(tokenizer, text: str) -> tuple[str, str | None]:
    """(text before its final EOS, what the template wrote after that EOS) when the text ends in the
    EOS and white space only (Qwen's turns end "<|im_end|>\n": -> (…, "\n")); else (text, None)."""
    eos = tokenizer.eos_token
    if eos and eos in text and text.rsplit(eos, 1)[1].strip() == "":
        before, after = text.rsplit(eos, 1)
        return before, after
    return text, None


def _chat_completion(tokenizer, prompt_msgs: list, completion_msgs: list) -> tuple[str, str]:
    """(prompt text, completion text) of one conversational prompt + completion."""
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    n = len(os.path.commonprefix([prompt, full]))  # < len(prompt) if the template renders the prompt
    completion = full[n:]                          # alone differently; TRL also splits where they part
    return prompt[:n], _cut_eos(tokenizer, completion)[0]  # the EOS is appended again as a token


def chat_suffix(tokenizer) -> list[int]:
    """The template's trailing tokens: the ids of what the chat template writes after the EOS that
    ends the last assistant turn (Qwen2.5: "<|im_end|>" + "\n" -> the ids of "\n"; [] for a
    template that ends its turn in the EOS, or in a token that is not the EOS).

    `render_chat` cuts them off with the EOS (the policy's completion ends at its EOS), but a reward
    model is read where transformers reads it: `AutoModelForSequenceClassification` takes the
    rightmost token that is not `config.pad_token_id` (transformers 5.24, modeling_layers.py,
    `GenericForSequenceClassification.forward`), and TRL's `RewardTrainer` (1.16,
    trl/trainer/reward_trainer.py, `_prepare_dataset`) trains on `apply_chat_template(prompt +
    chosen)`, trailing "\n" included, appending an EOS only to text rows. So the reward of a
    chat-formatted row is read on prompt + completion + EOS + these tokens (`append_after_last`).
    """
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    tail = _cut_eos(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False))[1]
    return tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []


def append_after_last(ids: torch.Tensor, mask: torch.Tensor, suffix: list[int] | None,
                      rows: torch.Tensor | None = None, pad_id: int = 0):
    """Write the tokens `suffix` right after the last real token of each row (of the rows where `rows`
    [B] is true; default: every row), as real tokens.  ids, mask [B, L] -> ids, mask [B, L + len(suffix)]

    ppo.py passes rows = finished: a completion cut at the token limit ended no turn, so it gets no
    turn's trailing tokens. Positions come from the mask, so the layout [left-padded prompt |
    right-padded completion] stays valid; the new columns are padding (`pad_id`, masked) where no
    suffix lands: give the pad token's id when transformers' classifier reads the batch, since it
    finds the last token by its id, not by the mask.
    """
    if not suffix:  # None or []: plain-text rows, or a template with nothing after its EOS
        return ids, mask
    S = len(suffix)
    B = ids.shape[0]
    ids = torch.cat([ids, ids.new_full((B, S), pad_id)], dim=1)  # [B, L+S]
    mask = torch.cat([mask, mask.new_zeros(B, S)], dim=1)  # [B, L+S]
    pos = last_token_index(mask)[:, None] + 1 + torch.arange(S, device=ids.device)  # [B, S]
    on = torch.ones(B, S, dtype=torch.bool, device=ids.device) if rows is None \
        else rows.to(ids.device).bool()[:, None].expand(B, S)  # [B, S]
    new = torch.tensor(suffix, dtype=ids.dtype, device=ids.device).expand(B, S)  # [B, S]
    one = torch.ones_like(new, dtype=mask.dtype)  # [B, S]
    ids = ids.scatter(1, pos, torch.where(on, new, ids.gather(1, pos)))  # [B, L+S]
    mask = mask.scatter(1, pos, torch.where(on, one, mask.gather(1, pos)))  # [B, L+S]
    return ids, mask


def render_chat(tokenizer, rows: list[dict], wrap: bool = False, model: str = "") -> list[dict]:
    """Rows whose prompt / chosen / rejected / completions are messages (or, with `wrap`, strings
    taken as one user and one assistant message) -> the same rows as plain text. Plain-text rows
    without `wrap` come back unchanged. Raises a one-line `UsageError` if the template is needed and
    the tokenizer has none."""
    check_chat_template(tokenizer, model, wrap, rows)
    if not (wrap or any(isinstance(r["prompt"], list) for r in rows)):
        return rows
    out = []
    for r in rows:
        msgs = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        keys = ["completions"] if "completions" in r else ["chosen", "rejected"]
        comps = r["completions"] if "completions" in r else [r["chosen"], r["rejected"]]
        texts = [_chat_completion(tokenizer, msgs, c if isinstance(c, list) else
                                  [{"role": "assistant", "content": c}]) for c in comps]
        prompt = min((p for p, _ in texts), key=len)  # where the prompt ends for every completion
        texts = [c if p == prompt else p[len(prompt):] + c for p, c in texts]
        out.append({**r, "prompt": prompt, **({"completions": texts} if keys == ["completions"]
                                               else dict(zip(keys, texts)))})
    return out


def read_preference_jsonl(path: str | Path, flag: str = "--data", rankings: bool = False) -> list[dict]:
    """Read preference rows from JSONL. Each line is one of (other keys are ignored):

        {"prompt": str, "chosen": str, "rejected": str}                 a pair (TRL's standard format)
        {"prompt": [messages], "chosen": [messages], "rejected": [messages]}      conversational (TRL)
        {"chosen": [messages], "rejected": [messages]}     conversational, implicit prompt: the leading
                                                           messages that chosen and rejected share
        {"prompt": ..., "completions": [best, ..., worst]}     a K-wise ranking, K ≥ 2 (InstructGPT);
                                                           only with `rankings` (reward_model.py)

    A file may mix pairs and rankings (a pair is a ranking of K = 2), but not text and messages.
    A bad line raises `UsageError("FILE:LINE: reason")`: a missing key, a value that is not text or
    messages, an empty prompt or completion, or two completions of one row that are the same.
    """
    kinds: set[bool] = set()  # conversational or not, over the rows so far

    def why_bad(r):
        if "completions" in r and "chosen" not in r:
            if not rankings:
                return "'completions' rows (K-wise rankings) are for reward_model.py; this script needs " \
                       "'chosen' and 'rejected' pairs"
            if "prompt" not in r:
                return "missing key(s) 'prompt'"
            if not isinstance(r["completions"], list) or len(r["completions"]) < 2:
                return "'completions' must be a list of at least 2 completions, best first"
            comps = r["completions"]
        else:
            missing = [k for k in ("chosen", "rejected") if k not in r]
            if missing:
                return f"missing key(s) {', '.join(map(repr, missing))}" + (
                    " (or 'completions', a ranking best first)" if rankings else "")
            comps = [r["chosen"], r["rejected"]]
            # no prompt, or a text prompt beside completions of messages (which then hold the whole
            # conversation): the prompt is implicit, as TRL's maybe_extract_prompt reads such rows
            if "prompt" not in r or (all(map(is_messages, comps)) and isinstance(r["prompt"], str)):
                if not all(map(is_messages, comps)):
                    return "missing key(s) 'prompt' (an implicit prompt needs 'chosen' and 'rejected' as " \
                           "lists of messages)"
                n = next((i for i, (a, b) in enumerate(zip(*comps)) if a != b), min(map(len, comps)))
                # n: how many leading messages chosen and rejected share
                if n == 0:
                    return "no 'prompt', and 'chosen' and 'rejected' share no leading messages"
                r["prompt"], r["chosen"], r["rejected"] = comps[0][:n], comps[0][n:], comps[1][n:]
                comps = [r["chosen"], r["rejected"]]
        names = ["chosen", "rejected"] if "chosen" in r else [f"completions[{i}]" for i in range(len(comps))]
        fields = {"prompt": r["prompt"], **dict(zip(names, comps))}
        reason = next(filter(None, (why_bad_text(fields, k) for k in fields)), None)
        if reason:
            return reason
        conv = [isinstance(v, list) for v in fields.values()]
        if len(set(conv)) > 1:
            return "mixes text and lists of messages: give the prompt and every completion the same way"
        kinds.add(conv[0])
        if len(kinds) > 1:
            return "the file mixes plain-text rows and conversational rows (lists of messages)"
        if len({json.dumps(c, sort_keys=True) for c in comps}) < len(comps):
            return ("'chosen' and 'rejected' are the same text, so the pair says nothing" if "chosen" in r
                    else "two of the 'completions' are the same, so the ranking is not a ranking")
        return None
    rows = read_jsonl(path, flag=flag, validate=why_bad)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} if "chosen" in r
            else {"prompt": r["prompt"], "completions": list(r["completions"])} for r in rows]


def load_preferences(data: str | None, heldout_size: int = PREF_HELDOUT,
                     rankings: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, heldout) preference rows (see `read_preference_jsonl`). No `--data`: the built-in
    task's pairs, sampled from `tiny-pref` (4,000 train, 1,000 held out). With `--data FILE.jsonl`:
    the last `heldout_size` rows (at most a fifth of the file) are held out."""
    if data is None:
        path = MODELS_DIR / "tiny-pref"
        check(path.is_dir(), f"no --data: the built-in task's pairs are looked for in {path}, which does not "
                             "exist (copy models/ beside common.py, or give --data FILE.jsonl)")
        return (read_preference_jsonl(path / "pairs_train.jsonl"),
                read_preference_jsonl(path / "pairs_heldout.jsonl"))
    rows = read_preference_jsonl(data, rankings=rankings)
    check(len(rows) >= 2, f"--data {data}: need at least 2 rows (train and held-out)")
    k = max(1, min(heldout_size, len(rows) // 5))
    return rows[:-k], rows[-k:]


#####################################################################################################
#####  reward models on disk: r_φ = the LM's last hidden state at the last real token, then a linear head
#####################################################################################################


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where attention_mask is 1, per row.  [B, L] -> [B]

    The running count of real tokens reaches its maximum at the last real token and stays flat
    after it; argmax returns the first position of the maximum. Works for left, right and
    both-sided padding.
    """
    return attention_mask.long().cumsum(-1).argmax(-1)  # [B]


class RewardModel(torch.nn.Module):
    """r_φ(x, y): a causal LM's transformer (its LM head unused) and a linear head, d -> 1.

    The head is read at the last real token (see `last_token_index`), the EOS that ends the
    completion: in a causal LM it is the one position that attends to the whole prompt and
    completion; on chat-formatted rows the callers first write the template's trailing tokens after
    the EOS (`append_after_last`), so that it reads where transformers and TRL read. Its weight is
    drawn from N(0, 1/(d+1)), i.e. std 1/√(d+1) (as in OpenAI's summarize-from-feedback reward
    model), and the bias is 0, so the first rewards are O(1) for hidden states of unit scale.
    `reward_mean` and `reward_std` (0 and 1 until `normalize` sets them) are applied to every output:
    r = (w · h + b − μ) / s.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm  # the whole causal LM, so that it saves and loads as one (`save_pretrained`)
        d = lm.config.hidden_size
        self.head = torch.nn.Linear(d, 1, device=lm.device, dtype=torch.float32)
        torch.nn.init.normal_(self.head.weight, std=1 / math.sqrt(d + 1))  # std 1/√(d+1)
        torch.nn.init.zeros_(self.head.bias)
        self.register_buffer("reward_mean", torch.zeros((), device=lm.device))
        self.register_buffer("reward_std", torch.ones((), device=lm.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L], any padding on either side.  -> rewards [B] (float32)

        Position ids come from the attention mask, as in `common.token_logprobs`, so a row's
        reward does not depend on how much padding it has.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state  # [B, L, d]
        last = last_token_index(attention_mask)  # [B]
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # [B, d]
        with torch.autocast(device_type=h.device.type, enabled=False):  # the head in float32
            r = self.head(h_last.float()).squeeze(-1)  # r_φ(x, y) = w · h + b   [B]
        return (r - self.reward_mean) / self.reward_std  # (r − μ) / s   [B]


HEAD_FILE = "reward_head.safetensors"  # the scalar head and the normalisation, beside the LM's files


def hf_pad_token(tokenizer) -> str | None:
    """The pad token the saved folder declares. transformers' sequence classifiers read the score at
    the rightmost token that is not `config.pad_token_id` (`GenericForSequenceClassification`), so a
    pad token equal to EOS (what `load_model` sets when a tokenizer has none) would read one
    token early, at the last token of the completion. Then an existing special token that is not
    EOS pads instead (unk, else bos); None if there is none (the rewards then need unpadded rows)."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token
    for tok in (tokenizer.unk_token, tokenizer.bos_token):
        if tok is not None and tokenizer.convert_tokens_to_ids(tok) != tokenizer.eos_token_id:
            return tok
    return None


def save_reward_model(rm: RewardModel, tokenizer, folder: str | Path, chat: bool | None = None) -> Path:
    """Write the format that `load_reward_model` reads, which transformers also loads:
        folder/  config.json, model.safetensors, tokenizer files   (the LM: `save_pretrained`)
        folder/reward_head.safetensors   {"weight": [d], "bias": [], "reward_mean": [], "reward_std": []}
    model.safetensors also holds `score.weight` = w / s [1, d], and config.json `num_labels` 1 (as
    id2label), a pad token that is not EOS (see `hf_pad_token`) and `reward_offset` = (b − μ) / s.
    So `AutoModelForSequenceClassification.from_pretrained(folder)` (TRL's reward-model format)
    gives w · h / s = r_φ(x, y) − reward_offset: its head has no bias, and a final hidden state has
    no constant component to fold b − μ into. Bradley–Terry only sees differences, so that is the
    same reward model; add `reward_offset` back for the normalised values (mean 0 on SFT samples).
    transformers numbers the positions 0, 1, … whatever the padding, where `RewardModel` counts
    only real tokens: the same for rotary models (Llama, Qwen: only differences of positions
    matter), but with learned absolute positions (GPT-2) left-padded rows differ; pad on the right.
    The LM folder also loads on its own with `AutoModelForCausalLM` (e.g. to start a value model).
    `chat`: whether the rows were chat-formatted (read after the template's trailing tokens, see
    `chat_suffix`), kept in config.json as `reward_chat_template` for ppo.py (`reward_model_chat`)."""
    import copy
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    w, b = rm.head.weight.detach().float().cpu().reshape(-1), rm.head.bias.detach().float().cpu().reshape(())
    mu, sd = rm.reward_mean.detach().float().cpu().reshape(()), rm.reward_std.detach().float().cpu().reshape(())
    state = {k: v for k, v in rm.lm.state_dict().items() if k != "lm_head.weight"
             or not rm.lm.config.tie_word_embeddings}  # a tied head is the embedding: saved once
    with common.quiet_transformers():  # no "Writing model shards" bar
        rm.lm.save_pretrained(folder, state_dict={**state, "score.weight": (w / sd).reshape(1, -1)})  # w/s  [1, d]
    pad = hf_pad_token(tokenizer)
    if pad is None:
        print(f"note: {folder}: the pad token is the EOS and no other special token can pad, so "
              "AutoModelForSequenceClassification reads padded rows one token early: give it unpadded rows")
    tok = tokenizer
    if pad is not None and pad != tokenizer.pad_token:
        tok = copy.deepcopy(tokenizer)
        tok.pad_token = pad
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                   "pad_token_id": tok.pad_token_id if pad is not None else config.get("pad_token_id"),
                   "reward_offset": float((b - mu) / sd),  # r_φ = r_HF + reward_offset
                   **({} if chat is None else {"reward_chat_template": chat})})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({"weight": w.contiguous(), "bias": b.contiguous(), "reward_mean": mu.contiguous(),
               "reward_std": sd.contiguous()}, str(folder / HEAD_FILE))
    return folder


def hf_score_weight(folder: Path) -> torch.Tensor | None:
    """`score.weight` [1, d] of a transformers sequence-classification folder (TRL's reward models),
    from model.safetensors or the shard that its index names; None if there is none."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    shard = (json.loads(index.read_text())["weight_map"].get("score.weight") if index.is_file()
             else "model.safetensors")
    if shard is None or not (folder / shard).is_file():
        return None
    with safe_open(str(folder / shard), "pt") as f:
        return f.get_tensor("score.weight") if "score.weight" in f.keys() else None


def load_reward_model(folder: str | Path, device: torch.device | str = "cpu", trainable: bool = False):
    """(RewardModel, tokenizer) from a folder written by `save_reward_model` (`<out-dir>/model` of
    reward_model.py), or from a transformers sequence classifier with one label (a TRL reward model:
    its `score.weight`, bias 0, no normalisation). Frozen and in eval mode unless `trainable`.
    Outputs are normalised if the run normalised them."""
    from safetensors.torch import load_file

    folder = Path(common.resolve_model_path(str(folder)))  # `tiny-pref-rm`: the shipped one
    if (folder / HEAD_FILE).is_file():
        state = load_file(str(folder / HEAD_FILE))
    else:
        score = hf_score_weight(folder) if folder.is_dir() else None
        check(score is not None and score.shape[0] == 1,
              f"{folder}: no {HEAD_FILE} and no one-label `score.weight` here, so this is neither a reward "
              "model saved by reward_model.py nor a transformers sequence classifier with num_labels 1")
        state = {"weight": score.float().reshape(-1), "bias": torch.zeros(()), "reward_mean": torch.zeros(()),
                 "reward_std": torch.ones(())}
    lm, tok = common.load_model(str(folder), torch.device(device), trainable=True)  # float32
    rm = RewardModel(lm)
    check(state["weight"].numel() == lm.config.hidden_size,
          f"{folder}: {HEAD_FILE} has {state['weight'].numel()} weights, the LM's hidden size is "
          f"{lm.config.hidden_size}")
    with torch.no_grad():
        rm.head.weight.copy_(state["weight"].reshape(1, -1))
        rm.head.bias.copy_(state["bias"].reshape(1))
        rm.reward_mean.copy_(state["reward_mean"])
        rm.reward_std.copy_(state["reward_std"])
    rm.eval()
    if not trainable:
        rm.requires_grad_(False)
    return rm, tok


def reward_model_chat(folder: str | Path) -> bool | None:
    """Whether the reward model in `folder` was trained on chat-formatted rows (True), on plain text
    (False), or None when the folder does not say (TRL's, or an older reward_model.py's)."""
    import json

    config = Path(common.resolve_model_path(str(folder))) / "config.json"
    return json.loads(config.read_text()).get("reward_chat_template") if config.is_file() else None
