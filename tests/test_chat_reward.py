"""The reward of a chat-formatted row is read where transformers reads it, and ppo.py --chat-template.

A small model with the conventions of Qwen2.5-Instruct (tests/qwen_style.py), whose chat template
ends every turn "<|im_end|>\\n". `AutoModelForSequenceClassification` reads a reward at the
rightmost token that is not the pad token, so at that "\\n"; TRL's RewardTrainer trains on
`apply_chat_template(prompt + chosen)`, "\\n" included. The project must read the same token:
`tasks.chat_suffix`, `tasks.append_after_last`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import common
import tasks
import ppo
import reward_model
from qwen_style import qwen_config, qwen_style_tokenizer, save_qwen_style


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random Qwen2 causal LM with the Qwen2.5-style tokenizer, saved as a model folder."""
    return save_qwen_style(tmp_path_factory.mktemp("qwen_style"))


CONV = {"prompt": [{"role": "user", "content": "What is 2+3?"}],
        "chosen": [{"role": "assistant", "content": "It is 5."}],
        "rejected": [{"role": "assistant", "content": "6"}]}


def hf_rewards(folder, conversations):
    """What a TRL user gets: AutoModelForSequenceClassification on apply_chat_template(conversation),
    the rows right-padded with the pad token in one batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    with common.quiet_transformers():
        hf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    ids = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
    L = max(map(len, ids))
    batch = torch.tensor([i + [tok.pad_token_id] * (L - len(i)) for i in ids])  # [B, L]
    with torch.no_grad():
        return hf(input_ids=batch, attention_mask=(batch != tok.pad_token_id).long()).logits[:, 0], ids


def test_chat_suffix_is_what_the_template_writes_after_the_eos(qwen):
    tok = qwen_style_tokenizer()
    assert tasks.chat_suffix(tok) == tok("\n", add_special_tokens=False)["input_ids"]  # "<|im_end|>" + "\n"
    # a template whose turn ends in the EOS itself (the test_chat_data.py one): nothing to add
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "{{ eos_token }}{% endif %}{% endfor %}")
    assert tasks.chat_suffix(tok) == []


def test_append_after_last_writes_after_each_rows_last_real_token():
    # [left-padded prompt | right-padded completion]: rows end at columns 4, 3 and 2
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 0], [0, 9, 9, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    new_ids, new_mask = tasks.append_after_last(ids, mask, [70, 71], rows=torch.tensor([True, True, False]),
                                                pad_id=0)
    assert new_ids.tolist() == [[0, 1, 2, 3, 4, 70, 71], [5, 6, 7, 8, 70, 71, 0], [0, 9, 9, 0, 0, 0, 0]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert tasks.append_after_last(ids, mask, None)[0] is ids  # plain-text rows: unchanged
    assert tasks.append_after_last(ids, mask, [])[0] is ids


def test_reward_of_a_conversation_is_what_transformers_reads(qwen, tmp_path):
    lm, tok = common.load_model(str(qwen), torch.device("cpu"))
    torch.manual_seed(1)
    rm = tasks.RewardModel(lm)
    with torch.no_grad():
        rm.head.bias.fill_(0.4)
        rm.reward_mean.fill_(-0.3)
        rm.reward_std.fill_(1.7)
    folder = tasks.save_reward_model(rm, tok, tmp_path / "rm", chat=True)
    offset = json.loads((folder / "config.json").read_text())["reward_offset"]  # r_φ = r_HF + offset
    convs = [CONV["prompt"] + CONV["chosen"], CONV["prompt"] + CONV["rejected"]]
    hf, hf_ids = hf_rewards(folder, convs)
    end = [tok.eos_token_id] + tok("\n", add_special_tokens=False)["input_ids"]
    assert all(i[-2:] == end for i in hf_ids)  # the template's text ends "<|im_end|>\n"

    rm, tok = tasks.load_reward_model(folder)
    suffix = tasks.chat_suffix(tok)
    rows = tasks.render_chat(tok, [CONV])
    # the tokens the reward model reads are exactly apply_chat_template's, "\n" included
    ids, mask, _, _ = common.encode_prompt_completion(tok, [rows[0]["prompt"]] * 2,
                                                      [rows[0]["chosen"], rows[0]["rejected"]])
    ids, mask = tasks.append_after_last(ids, mask, suffix)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == hf_ids
    r_c, r_r = reward_model.score_pairs(rm, tok, rows, "cpu", suffix=suffix)
    torch.testing.assert_close(torch.stack([r_c[0], r_r[0]]) - offset, hf, atol=1e-5, rtol=0)
    # read at the EOS instead (no suffix), it is another number: the issue this test guards
    r_eos = reward_model.score_pairs(rm, tok, rows, "cpu")[0]
    assert (r_eos[0] - offset - hf[0]).abs() > 1e-3
    # text rows with --chat-template (one user message, one assistant reply): the same rewards
    text = [{"prompt": "What is 2+3?", "chosen": "It is 5.", "rejected": "6"}]
    r_text = reward_model.score_pairs(rm, tok, tasks.render_chat(tok, text, wrap=True), "cpu", suffix=suffix)
    torch.testing.assert_close(torch.stack([r_text[0][0], r_text[1][0]]) - offset, hf, atol=1e-5, rtol=0)

    # ppo.py's score of a sampled completion: [left-padded prompt | completion + EOS, right-padded],
    # the suffix only after a finished row's EOS; a row cut at the token limit is read where it ends
    p_ids, p_mask = common.left_pad([tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]] * 2,
                                    tok.pad_token_id)  # [2, P]
    comp = tok(rows[0]["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c_ids = torch.tensor([comp, comp[:-1] + [tok.pad_token_id]])  # finished, and cut before its EOS   [2, T]
    c_mask = torch.tensor([[1] * len(comp), [1] * (len(comp) - 1) + [0]])  # [2, T]
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [2, P+T]
    finished = torch.tensor([True, False])
    s = ppo.score(rm, ids, mask, finished, missing_eos_penalty=0.0, suffix=suffix)  # [2]
    torch.testing.assert_close(s[0] - offset, hf[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(s[1], rm(ids[1:], mask[1:])[0], atol=1e-6, rtol=0)  # no suffix: no turn ended


def test_a_reward_model_saved_by_trl_reads_the_same(qwen, tmp_path):
    # TRL's format: a transformers sequence classifier with one label (score.weight, no bias), pad
    # token <|endoftext|>; load_reward_model and ppo.py's --reward-model accept it as it is
    from transformers import Qwen2ForSequenceClassification

    tok = qwen_style_tokenizer()
    torch.manual_seed(2)
    Qwen2ForSequenceClassification(qwen_config(tok, num_labels=1)).save_pretrained(tmp_path / "trl_rm")
    tok.save_pretrained(tmp_path / "trl_rm")
    convs = [CONV["prompt"] + CONV["chosen"], CONV["prompt"] + CONV["rejected"]]
    hf, _ = hf_rewards(tmp_path / "trl_rm", convs)
    rm, tok = tasks.load_reward_model(tmp_path / "trl_rm")
    r_c, r_r = reward_model.score_pairs(rm, tok, tasks.render_chat(tok, [CONV]), "cpu",
                                        suffix=tasks.chat_suffix(tok))
    torch.testing.assert_close(torch.stack([r_c[0], r_r[0]]), hf, atol=1e-5, rtol=0)
    ppo.validate(ppo.Args(reward_model=str(tmp_path / "trl_rm")))  # no reward_head.safetensors: still one
    assert tasks.reward_model_chat(tmp_path / "trl_rm") is None  # the folder does not say which rows


def write_pairs(path, n=10):
    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": f"{2 * i + 1}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_rm(qwen, tmp_path_factory):
    """reward_model.py --chat-template, 2 steps, on text pairs for the Qwen-style model."""
    base = tmp_path_factory.mktemp("chat_rm")
    data = write_pairs(base / "pairs.jsonl")
    reward_model.train(reward_model.Args(
        model=str(qwen), data=str(data), chat_template=True, max_steps=2, batch_size=4, norm_samples=4,
        max_new_tokens=4, eval_every=2, eval_size=4, log_every=1, out_dir=str(base / "run")))
    return base / "run" / "model", data


def ppo_args(qwen, data, out, **kw):
    return ppo.Args(model=str(qwen), data=str(data), steps=2, batch_size=2, mini_batches=1, ppo_epochs=1,
                    max_new_tokens=4, eval_every=2, eval_samples=2, log_every=1, out_dir=str(out), **kw)


def test_ppo_chat_template_scores_as_the_reward_model_was_trained(qwen, chat_rm, tmp_path, monkeypatch):
    folder, data = chat_rm
    assert tasks.reward_model_chat(folder) is True  # reward_model.py --chat-template says so
    seen = []  # the trailing tokens every score of the run was read after
    real_score = ppo.score

    def spy(*a, **kw):
        seen.append(a[6] if len(a) > 6 else kw.get("suffix"))
        return real_score(*a, **kw)
    monkeypatch.setattr(ppo, "score", spy)
    summary = ppo.train(ppo_args(qwen, data, tmp_path / "run", chat_template=True, reward_model=str(folder)))
    assert summary["steps"] == 2 and (tmp_path / "run" / "summary.json").is_file()
    tok = qwen_style_tokenizer()
    assert seen and all(s == tasks.chat_suffix(tok) for s in seen)  # rollouts and evaluations alike
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["step"] == 1 and "objective/scores" in first


def ppo_flags() -> set[str]:
    import dataclasses

    names = {f.name.replace("_", "-") for f in dataclasses.fields(ppo.Args)}
    return {f"--{n}" for n in names} | {f"--no-{n}" for n in names}


def test_ppo_errors_name_only_its_own_flags(qwen, chat_rm, tmp_path):
    folder, data = chat_rm
    # a reward model trained on chat-formatted rows, and a run on plain text: one line, the flag to add
    with pytest.raises(common.UsageError) as e:
        ppo.train(ppo_args(qwen, data, tmp_path / "run", reward_model=str(folder)))
    assert "--chat-template" in str(e.value) and not (tmp_path / "run").exists()
    # prompts too long for the reward model that ppo.py would train (the issue's "pass --max-length
    # none", a flag of reward_model.py): one line, before the run folder
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "x" * 1100, "chosen": "a", "rejected": "b"}) + "\n"
                            for _ in range(5)))
    with pytest.raises(common.UsageError) as e:
        ppo.train(ppo_args(qwen, long, tmp_path / "run2", chat_template=True))
    msg = str(e.value)
    assert "--reward-model" in msg and "\n" not in msg and not (tmp_path / "run2").exists()
    assert set(re.findall(r"--[a-z][a-z-]*", msg)) <= ppo_flags(), msg


def test_ppo_trains_its_reward_model_with_chat_template(qwen, tmp_path, monkeypatch):
    # no --reward-model: reward_model.py runs in a subprocess with the flags that make it read the
    # rows as ppo.py does (captured here, not run)
    data = write_pairs(tmp_path / "pairs.jsonl")
    cmds = []

    def fake_run(cmd, *a, **kw):
        cmds.append(cmd)
        raise SystemExit("stop")
    monkeypatch.setattr(ppo.subprocess, "run", fake_run)
    with pytest.raises(SystemExit):
        ppo.train(ppo_args(qwen, data, tmp_path / "run", chat_template=True))
    assert "--chat-template" in cmds[0] and cmds[0][cmds[0].index("--data") + 1] == str(data)
