"""The long-addition task (`--task long-addition`, tasks.py): its worked-out answers, the scorer
of the final answer, checked by hand, and the format figures that grpo.py logs."""

from __future__ import annotations

import numpy as np
import pytest

import tasks
from models import build

W = "worked"  # score(..., strict=W): the final answer after the work


def test_worked_answer_by_hand():
    # 347 + 285: 7+5 = 12 (write 2, carry 1), 4+8+1 = 13 (write 3, carry 1), 3+2+1 = 6 -> 632
    assert tasks.worked_answer("347+285=") == "(7+5=12,4+8+1=13,3+2+1=6)632"
    assert tasks.worked_answer("999+999=") == "(9+9=18,9+9+1=19,9+9+1=19)1998"  # the carry out: 4 digits
    assert tasks.worked_answer("120+301=") == "(0+1=1,2+0=2,1+3=4)421"  # no carry, no +1
    train, heldout = tasks.long_addition_task()
    for r in heldout[:50] + train[:50]:  # every label's answer is the sum, after the work
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert tasks.worked_answer(r["prompt"]).endswith(")" + str(a + b)) and r["answer"] == str(a + b)
    lengths = [len(tasks.worked_answer(r["prompt"])) + 1 for r in train]  # + EOS
    assert min(lengths) >= 20 and max(lengths) == tasks.TASK_MAX_TOKENS["long-addition"]


def test_split_is_fixed_and_disjoint():
    train, heldout = tasks.long_addition_task()
    assert len(heldout) == tasks.LONG_HELDOUT and len(train) == tasks.LONG_TRAIN
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    assert tasks.long_addition_task()[1] == heldout  # independent of any seed
    assert all(100 <= int(x) <= 999 for r in train[:200] for x in r["prompt"].rstrip("=").split("+"))


def test_direct_slip_answer_by_hand():
    rng = np.random.default_rng(0)
    assert tasks.direct_slip_answer("347+285=", 0.0, rng) == "632"  # no slip: the sum
    assert tasks.direct_slip_answer("347+285=", 1.0, rng) == "522"  # both carries forgotten: 2, 2, 5
    assert tasks.direct_slip_answer("999+999=", 1.0, rng) == "888"  # the carry out forgotten too
    assert tasks.direct_slip_answer("120+301=", 1.0, rng) == "421"  # nothing to forget
    got = {tasks.direct_slip_answer("347+285=", 0.5, rng) for _ in range(200)}
    assert got == {"632", "532", "622", "522"}  # each of the two carries kept or forgotten


@pytest.mark.parametrize("completion, finished, expected", [
    ("632", True, 1.0),                                 # right, direct
    ("522", True, 0.0),                                 # wrong, direct (both carries forgotten)
    ("(7+5=12,4+8+1=13,3+2+1=6)632", True, 1.0),        # right, worked out
    ("(7+5=12,4+8+1=13,3+2+1=6)633", True, 0.0),        # the work right, the answer wrong
    ("(7+5=2,4+8=12,3+2+1=6)632", True, 1.0),           # wrong steps, right answer: only the answer counts
    ("(7+5=12,4+8+=,3+2+1=6)632", True, 1.0),           # a malformed step line: not checked
    ("(7+5=12,4+8+=,3+2+1=6)522", True, 0.0),           # ... and a wrong answer after it
    ("(7+5=12,4+8+1=13,3+2+1=6", True, 0.0),            # the work never closed: no answer
    ("(7+5=12,4+8+1=13,3+2+1=6)", True, 0.0),           # closed, but no answer after it
    ("(7+5=12,4+8+1=13,3+2+1=6)632", False, 0.0),       # cut off at the token limit
    ("(7+5=12,4+8+1=13,3+2+1=6)6 32", True, 0.0),       # the answer as strictly as the arithmetic task:
    ("(7+5=12,4+8+1=13,3+2+1=6)0632", True, 0.0),       # no space, no leading zero,
    ("(7+5=12,4+8+1=13,3+2+1=6) 632", True, 0.0),       # nothing but the digits
    ("(7+5=12)(3+2+1=6)632", True, 1.0),                # the answer is what follows the LAST ')'
    ("(632)522", True, 0.0),                            # ... so a right number inside the work is no answer
    ("632)", True, 0.0),
])
def test_score_reads_the_final_answer_only(completion, finished, expected):
    assert tasks.score(completion, "632", finished, W) == expected


def test_score_from_ids_and_the_other_tasks_unchanged():
    tok = build.build_char_tokenizer()
    ids = tok.encode("(7+5=12,4+8+1=13,3+2+1=6)632", add_special_tokens=False) + [tok.eos_token_id]
    assert tasks.score(ids, "632", True, W, tok) == 1.0
    assert tasks.score(ids[:-1], "632", True, W, tok) == 1.0  # no EOS in the list; finished says it ended
    bad = ids[:3] + [tok.pad_token_id] + ids[3:]  # a special token inside the completion
    assert tasks.score(bad, "632", True, W, tok) == 0.0
    # the worked format is no answer for the arithmetic task (strict) ...
    assert tasks.score("(7+5=12,4+8+1=13,3+2+1=6)632", "632", True, True) == 0.0
    # ... and a --data file reads its last number, as before
    assert tasks.score("(7+5=12,4+8+1=13,3+2+1=6)632", "632", True, False) == 1.0
    assert tasks.task_scoring("arithmetic", None) is True
    assert tasks.task_scoring("long-addition", None) == W and tasks.task_scoring("arithmetic", "x.jsonl") is False


def test_format_and_format_figures_by_hand():
    assert tasks.completion_format("(7+5=12,4+8+1=13,3+2+1=6)632") == "worked"
    assert tasks.completion_format("(7+5=12,4+8+=,3+2+1=6)632") == "worked"  # malformed, but written out
    assert tasks.completion_format("632") == "direct"
    assert tasks.completion_format("(7+5=12,4+8") == "direct"  # never closed: no worked answer
    texts = ["(7+5=12,4+8+1=13,3+2+1=6)632", "632", "522", "(7+5=12,4+8+1=13,3+2+1=6)633"]
    f = tasks.format_figures(texts, [1, 1, 0, 0], [29, 4, 4, 29])
    assert f == {"accuracy": 0.5, "mean_length": 16.5, "worked_frac": 0.5,
                 "accuracy_worked": 0.5, "accuracy_direct": 0.5}
    f = tasks.format_figures(["632", "522"], [1, 0], [4, 4])
    assert f["worked_frac"] == 0.0 and f["accuracy_worked"] is None and f["accuracy_direct"] == 0.5


def test_check_task_and_load_task_name_the_flag():
    from common import UsageError
    tasks.check_task("long-addition", None, 31)
    tasks.check_task("arithmetic", None, 4)
    with pytest.raises(UsageError, match="--max-new-tokens 4"):
        tasks.check_task("long-addition", None, 4)
    with pytest.raises(UsageError, match="--task long-addition"):
        tasks.load_task("rows.jsonl", task="long-addition")
    with pytest.raises(UsageError, match="--task 'nope'"):
        tasks.load_task(None, task="nope")
    assert tasks.load_task(None) == tasks.arithmetic_task()


def test_grpo_task_flag_logs_the_format_figures(tmp_path):
    """`grpo.py --task long-addition` on models/tiny-long: two steps, and every evaluation logs the
    accuracy with the length, the share worked out and each format's accuracy; each step the share
    of its samples. Too small a --max-new-tokens is one line naming the flag, and no run folder."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = [sys.executable, "grpo.py", "--task", "long-addition", "--model", "models/tiny-long", "--steps", "2",
            "--eval-every", "1", "--eval-size", "16", "--prompts-per-step", "2", "--no-pass-at-k", "--no-save-model"]
    out = tmp_path / "run"
    r = subprocess.run(base + ["--max-new-tokens", "40", "--out-dir", str(out)], cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # step 0 (the start model), 1 and 2
        assert {"eval/accuracy", "eval/mean_length", "eval/worked_frac", "eval/accuracy_worked",
                "eval/accuracy_direct"} <= set(row), row
        assert 0 <= row["eval/worked_frac"] <= 1 and 1 <= row["eval/mean_length"] <= 40
    assert all(0 <= row["completions/worked_frac"] <= 1 for row in rows[1:])
    bad = subprocess.run(base + ["--out-dir", str(tmp_path / "bad")], cwd=root, capture_output=True, text=True,
                         timeout=600)  # --max-new-tokens 4, the default
    assert bad.returncode != 0 and "--max-new-tokens 4" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
