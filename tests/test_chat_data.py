"""Tests of the data formats of TRL that the scripts read (tasks.py, "conversational rows"): rows
of {"role", "content"} messages rendered with a chat template, implicit prompts, K-wise rankings,
and the one-line errors; then dpo.py and reward_model.py on such files, and load_model's logging.

The tokenizer is the word-level one of `tiny-pref` (models/build.py) with a small chat template
written here, so that every rendered text is made of words it knows:

    user turn "hotel"         -> "the hotel"
    generation prompt         -> " was"
    assistant turn "great"    -> " was great<eos>"
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import common
import tasks
import dpo
import reward_model
from models.build import build_word_tokenizer

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}the {{ m['content'] }}"
            "{% else %} was {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %} was{% endif %}")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def chat_tok():
    tok = build_word_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_conversational_rows_render_like_trl(chat_tok):
    # explicit prompt: the prompt with the generation prompt; the completion is what the rendering
    # of prompt + completion adds after it, "the hotel was" + " great<eos>", with the EOS cut off
    # (encode_prompt_completion appends it as a token)
    rows = [{"prompt": user("hotel"), "chosen": assistant("great"), "rejected": assistant("bad")}]
    assert tasks.render_chat(chat_tok, rows) == [{"prompt": "the hotel was", "chosen": " great",
                                                   "rejected": " bad"}]
    # a ranking: every completion the same way
    rows = [{"prompt": user("car"), "completions": [assistant("good"), assistant("ok"), assistant("slow")]}]
    assert tasks.render_chat(chat_tok, rows)[0]["completions"] == [" good", " ok", " slow"]
    # text rows: unchanged, or with --chat-template (wrap) one user and one assistant message
    text = [{"prompt": "hotel", "chosen": "great", "rejected": "bad"}]
    assert tasks.render_chat(chat_tok, text) is text
    assert tasks.render_chat(chat_tok, text, wrap=True) == [{"prompt": "the hotel was", "chosen": " great",
                                                              "rejected": " bad"}]
    # a prompt-only row (grpo.py, reinforce.py)
    assert tasks.chat_prompt(chat_tok, user("park")) == "the park was"
    assert tasks.chat_prompt(chat_tok, "the park") == "the park"
    assert tasks.chat_prompt(chat_tok, "park", wrap=True) == "the park was"
    # the rendered text tokenizes to the same ids as the words would
    ids, mask, c_mask, _ = common.encode_prompt_completion(chat_tok, ["the hotel was"], [" great"])
    assert chat_tok.decode(ids[0]) == "the hotel was great <eos>" and c_mask.tolist() == [[1, 1]]


def test_no_chat_template_is_one_line_error():
    tok = build_word_tokenizer()  # no template
    rows = [{"prompt": user("hotel"), "chosen": assistant("great"), "rejected": assistant("bad")}]
    with pytest.raises(common.UsageError, match=r"^--data \(rows of messages\): the tokenizer of --model m "
                                                r"has no chat template"):
        tasks.render_chat(tok, rows, model="m")
    with pytest.raises(common.UsageError, match=r"^--chat-template: the tokenizer of --model m"):
        tasks.render_chat(tok, [{"prompt": "a", "chosen": "b", "rejected": "c"}], wrap=True, model="m")
    with pytest.raises(common.UsageError, match="no chat template"):
        tasks.check_chat_template(tok, "m", False, [{"prompt": user("x"), "answer": "1"}])
    tasks.check_chat_template(tok, "m", False, [{"prompt": "x", "answer": "1"}])  # text: no template needed


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_preference_jsonl_formats(tmp_path):
    implicit = {"chosen": user("hotel") + assistant("great"), "rejected": user("hotel") + assistant("bad")}
    explicit = {"prompt": user("car"), "chosen": assistant("good"), "rejected": assistant("slow")}
    rows = tasks.read_preference_jsonl(write(tmp_path, "conv.jsonl", [implicit, explicit]))
    # the implicit prompt is the messages chosen and rejected share (TRL's extract_prompt)
    assert rows[0] == {"prompt": user("hotel"), "chosen": assistant("great"), "rejected": assistant("bad")}
    assert rows[1] == explicit
    ranking = {"prompt": "the bus", "completions": ["was good", "was ok", "was bad"]}
    pair = {"prompt": "the car", "chosen": "was good", "rejected": "was slow"}
    path = write(tmp_path, "rank.jsonl", [ranking, pair])
    assert tasks.read_preference_jsonl(path, rankings=True) == [ranking, pair]  # a file may mix them
    with pytest.raises(common.UsageError, match=r"rank.jsonl:1: 'completions' rows .* are for reward_model.py"):
        tasks.read_preference_jsonl(path)  # dpo.py, ppo.py
    bad = {
        "short": ({"prompt": "x", "completions": ["was ok"]}, r"short.jsonl:1: 'completions' must be a list of at least 2"),
        "dupe": ({"prompt": "x", "completions": ["a", "b", "a"]}, r"dupe.jsonl:1: two of the 'completions' are the same"),
        "mixed": ({"prompt": "x", "chosen": assistant("a"), "rejected": "b"},
                  r"mixed.jsonl:1: mixes text and lists"),
        "half": ({"prompt": user("x"), "chosen": "a", "rejected": "b"}, r"half.jsonl:1: mixes text and lists"),
        "noshare": ({"chosen": assistant("a"), "rejected": assistant("b")},
                    r"noshare.jsonl:1: no 'prompt', and 'chosen' and 'rejected' share no leading messages"),
        "badmsg": ({"prompt": [{"role": "user"}], "chosen": assistant("a"), "rejected": assistant("b")},
                   r"badmsg.jsonl:1: 'prompt' must be a string or a non-empty list"),
    }
    for name, (row, message) in bad.items():
        with pytest.raises(common.UsageError, match=message):
            tasks.read_preference_jsonl(write(tmp_path, f"{name}.jsonl", [row]), rankings=True)
    with pytest.raises(common.UsageError, match=r"both.jsonl:2: the file mixes plain-text rows and conversational"):
        tasks.read_preference_jsonl(write(tmp_path, "both.jsonl", [pair, explicit]))


def test_load_task_reads_prompts_of_messages(tmp_path):
    path = write(tmp_path, "task.jsonl", [{"prompt": user("2+2"), "answer": "4"}] * 5)
    train, heldout = tasks.load_task(str(path))
    assert train[0] == {"prompt": user("2+2"), "answer": "4"} and len(heldout) == 1
    with pytest.raises(common.UsageError, match=r"bad.jsonl:1: 'prompt' must be a non-empty string or a list"):
        tasks.load_task(str(write(tmp_path, "bad.jsonl", [{"prompt": [{"role": 1}], "answer": "4"}] * 2)))


def test_load_model_leaves_transformers_logging_alone(tmp_path):
    # load_model silences transformers only while it loads: the process's settings come back after
    # it, after an error too (common itself sets nothing when it is imported)
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        for verbosity, bars in ((hf_logging.INFO, True), (hf_logging.WARNING, False)):
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            common.load_model("tiny-pref", torch.device("cpu"))
            assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
            with pytest.raises(common.UsageError, match="could not load"):  # inside from_pretrained
                common.load_model(str(tmp_path), torch.device("cpu"))
            assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, chat_tok):
    """`tiny-pref` with the chat template above in its tokenizer files."""
    folder = tmp_path_factory.mktemp("chat") / "tiny-pref-chat"
    shutil.copytree(common.MODELS_DIR / "tiny-pref", folder,
                    ignore=shutil.ignore_patterns("pairs_*.jsonl", "build.json"))
    tok = common.load_model(str(folder), torch.device("cpu"))[1]
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


TOPICS = ["hotel", "car", "park", "pizza", "bus", "book"]


def test_dpo_and_reward_model_on_conversational_files(tmp_path, chat_model):
    pairs = [{"prompt": user(x), "chosen": assistant("great"), "rejected": assistant("bad and the view was slow")}
             for x in TOPICS * 2]  # 12 rows: 10 train, 2 held out
    data = write(tmp_path, "pairs.jsonl", pairs)
    short = dict(model=str(chat_model), data=str(data), max_steps=1, batch_size=4, eval_size=4,
                 device="cpu", dtype="float32", save_model=False)
    s = dpo.train(dpo.Args(**short, eval_samples=2, max_new_tokens=3, out_dir=str(tmp_path / "dpo")))
    assert s["steps"] == 1 and s["max_length"]["cut_pairs"] == {"train": 0, "heldout": 0}
    # --max-length 5: "the X was" is 3 tokens, " great" + EOS fits (5); the rejected (6 words + EOS)
    # is cut, so every pair is cut and none dropped
    s = dpo.train(dpo.Args(**short, eval_samples=2, max_new_tokens=3, max_length=5, out_dir=str(tmp_path / "dpo5")))
    assert s["max_length"] == {"cut_pairs": {"train": 10, "heldout": 2}, "dropped_pairs": {"train": 0, "heldout": 0}}
    # the reward model on a mix of rankings (K = 3) and pairs of messages; with --max-length 5 only
    # the rows whose every completion fits are kept (TRL drops, never cuts, a reward-model row)
    ranks = [{"prompt": user(x), "completions": [assistant("great"), assistant("ok"), assistant("bad")]}
             for x in TOPICS]
    data = write(tmp_path, "mixed.jsonl", pairs[:6] + ranks)  # 12 rows: train 6 pairs + 4 rankings, 2 held out
    s = reward_model.train(reward_model.Args(**{**short, "data": str(data)}, norm_samples=2, max_new_tokens=3,
                                             out_dir=str(tmp_path / "rm")))
    # C(3,2) = 3 pairs per ranking: 6 + 4·3 = 18 train pairs; 2·3 = 6 held-out pairs, 4 of them evaluated
    assert s["train_rows"] == 10 and s["train_pairs"] == 18 and s["heldout_pairs"] == 4
    s = reward_model.train(reward_model.Args(**{**short, "data": str(data)}, norm_samples=2, max_new_tokens=3,
                                             max_length=5, out_dir=str(tmp_path / "rm5")))
    assert s["max_length_dropped_rows"] == {"train": 6, "heldout": 0} and s["train_rows"] == 4
    # a tokenizer without a chat template: one line, and no run folder left behind
    with pytest.raises(common.UsageError, match="no chat template"):
        dpo.train(dpo.Args(**{**short, "model": "tiny-pref"}, out_dir=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()


def test_grpo_and_reinforce_read_prompts_of_messages(tmp_path):
    # `tiny` (character tokenizer) with a template that writes the user's content as it is: a
    # file of message prompts then trains exactly like the same prompts as text
    import grpo
    import reinforce

    folder = tmp_path / "tiny-chat"
    shutil.copytree(common.MODELS_DIR / "tiny", folder, ignore=shutil.ignore_patterns("build.json"))
    tok = common.load_model(str(folder), torch.device("cpu"))[1]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    rows = [{"prompt": user(f"{a}+{a}="), "answer": str(2 * a)} for a in range(10, 20)]
    data = write(tmp_path, "task.jsonl", rows)
    short = dict(model=str(folder), data=str(data), steps=1, prompts_per_step=4, eval_size=2,
                 pass_at_k=False, device="cpu", dtype="float32", save_model=False)
    for script, extra in ((grpo, {"group_size": 2}), (reinforce, {"samples_per_prompt": 2})):
        s = script.train(script.Args(**short, **extra, out_dir=str(tmp_path / script.__name__)))
        assert s["steps"] == 1 and 0 <= s["final_accuracy"] <= 1
    with pytest.raises(common.UsageError, match=r"--data \(rows of messages\): the tokenizer of --model tiny "):
        grpo.train(grpo.Args(**{**short, "model": "tiny"}, group_size=2, out_dir=str(tmp_path / "no")))
