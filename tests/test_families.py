"""Real models behave as they do in transformers (issue 21): every stop token ends a completion,
prompts get BOS as the tokenizer has it, exactly once, and the model's context is a limit.

The models are tiny local ones with the conventions of Qwen2.5-Instruct, Llama-3-Instruct and
Gemma-2-it (tests/families.py: special tokens, BOS, chat templates and stop lists as published).
Each script runs 2 steps on each family, with a model that always answers with its *second* stop
token (<|endoftext|>, <|eot_id|>, <end_of_turn>): with only the tokenizer's EOS as a stop, such
a model would never finish (`completions/no_eos_frac` 1.0, every answer scored as cut off).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import common
import dpo
import grpo
import ppo
import reinforce
import reward_model
import tasks
from families import FAMILIES, build, build_tokenizer, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (random model folder, the folder of the model that answers with its second stop)}"""
    root = tmp_path_factory.mktemp("families")
    return {f: (build(f, root / f"{f}-random"), build(f, root / f"{f}-stop2", answer_with="second_stop"))
            for f in FAMILIES}


#####################################################################################################
#####  the families' conventions, as published
#####################################################################################################


def test_the_templates_render_as_the_published_ones():
    # the renderings of [user "Hi"] + the generation prompt that each family's model card shows
    hi = [{"role": "user", "content": "Hi"}]
    expected = {
        "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "gemma2": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    }
    for family, text in expected.items():
        tok = build_tokenizer(family)
        assert tok.apply_chat_template(hi, tokenize=False, add_generation_prompt=True) == text
        # BOS: Llama-3 and Gemma add it by default, Qwen has none
        adds = tok("Hi")["input_ids"][:1] == [tok.bos_token_id] and tok.bos_token_id is not None
        assert adds == FAMILIES[family]["adds_bos"]


def test_load_model_takes_every_stop_token(models):
    # the stop tokens are the tokenizer's EOS and generation_config.eos_token_id, EOS first, once each
    for family, (path, _) in models.items():
        _, tok = common.load_model(str(path), CPU)
        assert tok.convert_ids_to_tokens(tok.stop_ids) == FAMILIES[family]["stops"]
        # the folder loads as the tokenizer built (Qwen's as Qwen2Tokenizer, byte-level)
        text = "Hi there,\n1 + 1 =" + tok.eos_token
        assert tok(text)["input_ids"] == build_tokenizer(family)(text)["input_ids"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text[:-len(tok.eos_token)]
        assert common.stop_ids(tok) == tok.stop_ids
    # the embedded models keep their one EOS; a bare tokenizer has its EOS
    _, tok = common.load_model("tiny", CPU)
    assert tok.stop_ids == [tok.eos_token_id] == [1]
    assert common.stop_ids(build_tokenizer("llama3")) == [build_tokenizer("llama3").eos_token_id]


#####################################################################################################
#####  every stop token ends a completion
#####################################################################################################


def test_the_completion_mask_stops_at_any_stop_token():
    # stops {1, 7}: row 0 stops at its 7 (position 1), row 1 at its 1 (position 2), row 2 never
    ids = torch.tensor([[5, 7, 1, 4], [5, 6, 1, 7], [5, 5, 5, 5]])
    assert common.completion_mask(ids, [1, 7]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert common.completion_mask(ids, 1).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]  # one EOS


def test_a_model_that_answers_with_its_second_stop_token_finishes(models):
    for family, (_, path) in models.items():
        model, tok = common.load_model(str(path), CPU)
        second = tok.stop_ids[1]
        prompts = ["12+3=", tasks.chat_prompt(tok, "12+3=", wrap=True)]
        for greedy in (True, False):
            _, _, c_ids, c_mask, texts, finished = common.generate_text(model, tok, prompts, 8, greedy=greedy)
            # transformers' generate stops after one token; so does ours, and the row is finished
            assert c_ids.tolist() == [[second], [second]] and c_mask.tolist() == [[1], [1]], family
            assert finished == [True, True] and texts == ["", ""]
        # scoring from the ids: "15" then the second stop token is a finished answer "15"
        digits = tok("15", add_special_tokens=False)["input_ids"]
        assert tasks.score(digits + [second, 3], "15", True, strict=True, tokenizer=tok) == 1.0


#####################################################################################################
#####  BOS as the tokenizer has it, once
#####################################################################################################


def test_prompts_get_bos_exactly_once(models):
    for family, (path, _) in models.items():
        _, tok = common.load_model(str(path), CPU)
        bos = tok.bos_token_id
        want = 1 if FAMILIES[family]["adds_bos"] else 0
        text, chat = "12+3=", tasks.chat_prompt(tok, "12+3=", wrap=True)  # the template writes its own BOS
        for ids in common.encode_prompts(tok, [text, chat]):
            assert (ids.count(bos) if bos is not None else 0) == want, family
            assert (ids[0] == bos) == bool(want)
        # generation and scoring tokenize the prompt the same way (the reward model and DPO score so)
        p_ids, p_mask, *_ = common.generate_text(common.load_model(str(path), CPU)[0], tok, [text, chat], 1)
        ids, mask, c_mask, _ = common.encode_prompt_completion(tok, [text, chat], ["15", "15"])
        P = p_ids.shape[1]
        assert p_ids.tolist() == ids[:, :P].tolist() and p_mask.tolist() == mask[:, :P].tolist()
        assert c_mask.tolist() == [[1, 1, 1]] * 2  # "1", "5", EOS: no BOS in a completion
    # the embedded tokenizers add no BOS: their prompts are the ids they always were
    _, tok = common.load_model("tiny", CPU)
    assert common.encode_prompts(tok, ["12+3="]) == [tok("12+3=", add_special_tokens=False)["input_ids"]]


#####################################################################################################
#####  the context limit
#####################################################################################################


def test_a_too_long_prompt_gets_one_line(models, tmp_path):
    model, tok = common.load_model(str(models["llama3"][0]), CPU)  # 256 positions
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9" * 300, "answer": "9"},
            {"prompt": "2+2=", "answer": "4"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    data.write_text(data.read_text().replace("\n", "\n\n", 1))  # a blank line: row 1 is on line 3
    prompts = [r["prompt"] for r in rows]
    # the prompt alone fills the context (BOS + 300 > 256): its line
    with pytest.raises(common.UsageError, match=rf"^{re.escape(str(data))}:3: the prompt has 301 tokens, "
                                                r"which fill the context of --model \(256 positions\)"):
        tasks.check_context(tok, model, prompts, 8, str(data))
    # prompt + completion longer than the context: the flag and the limit (BOS + 250 + 8 > 256)
    prompts[1] = "9" * 250
    with pytest.raises(common.UsageError, match=r"^--max-new-tokens 8: the longest prompt \(the prompt "
                                                r"'9999.*251 tokens\) and 8 new tokens exceed the context "
                                                r"of --model \(256 positions\); give --max-new-tokens 5 "
                                                r"or less"):
        tasks.check_context(tok, model, prompts, 8)
    tasks.check_context(tok, model, prompts, 5)  # fits
    # dpo's and reward_model's --max-length (1024 by default, or none) is capped at 256, and says so
    assert tasks.cap_max_length(1024, model) == tasks.cap_max_length(None, model) == 256
    assert tasks.cap_max_length(100, model) == 100


def test_scripts_refuse_a_too_long_prompt_before_the_run_folder(models, tmp_path, run_script):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 4
                       + [{"prompt": "9" * 300, "answer": "9"}])
    out = tmp_path / "run"
    r = run_script("grpo.py", "--model", str(models["qwen2.5"][1]), "--data", str(data), "--steps", "2",
                   "--out-dir", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {data}:5: the prompt has 300 tokens, which fill the context of --model (256 positions): "
        "no room for a completion (shorten it, or drop the row)")
    assert not out.exists()
    # prompt (BOS + 100) + --max-new-tokens 200 > 256: the flag and the limit, in each generating script
    row = {"prompt": "9" * 100, "answer": "9", "chosen": "a", "rejected": "b"}  # for every script
    mid = write_jsonl(tmp_path / "mid.jsonl", [row] * 5)
    gemma = dict(model=str(models["gemma2"][1]), data=str(mid), max_new_tokens=200, device="cpu",
                 out_dir=str(out))
    for script in (grpo, reinforce, ppo):
        with pytest.raises(common.UsageError, match=rf"^--max-new-tokens 200: the longest prompt "
                                                    rf"\({re.escape(str(mid))}:1, 101 tokens\) and 200 "
                                                    r"new tokens exceed the context of --model \(256 "
                                                    r"positions\); give --max-new-tokens 155 or less"):
            script.train(script.Args(**gemma))
        assert not out.exists()
    # dpo.py samples after its held-out prompts, reward_model.py after its train prompts
    for script in (dpo, reward_model):
        with pytest.raises(common.UsageError, match=r"^--max-new-tokens 200: the longest prompt \(the "
                                                    r"prompt '999"):
            script.train(script.Args(**gemma))
        assert not out.exists()


#####################################################################################################
#####  every script, 2 steps on each family
#####################################################################################################


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_script_runs_two_steps(family, models, tmp_path, capsys):
    path = str(models[family][1])  # answers with its second stop token
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)}
                                                 for a in range(5)])  # 4 train rows, 1 held out
    pairs = [{"prompt": f"review {a}:", "chosen": " good", "rejected": " bad"} for a in range(5)]
    pairs[0]["rejected"] = " " + "bad " * 70  # 281 tokens: past the context (256), not past --max-length 1024
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs)  # 4 train rows, 1 held out
    cpu = dict(model=path, device="cpu", dtype="float32", log_every=1)

    def metrics(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    gen = dict(steps=2, eval_every=2, eval_size=1, max_new_tokens=8, pass_at_k=False, save_model=False)
    s = grpo.train(grpo.Args(**cpu, **gen, data=str(task), chat_template=True, group_size=2,
                             prompts_per_step=2, out_dir=str(tmp_path / "grpo")))
    s2 = reinforce.train(reinforce.Args(**cpu, **gen, data=str(task), samples_per_prompt=2,
                                        prompts_per_step=2, out_dir=str(tmp_path / "reinforce")))
    for summary, out in ((s, tmp_path / "grpo"), (s2, tmp_path / "reinforce")):
        assert summary["steps"] == 2
        rows = [r for r in metrics(out) if r["step"] > 0]
        assert [r["completions/no_eos_frac"] for r in rows] == [0.0, 0.0]  # every completion finished
        assert [r["completions/mean_length"] for r in rows] == [1.0, 1.0]  # at its first token
    rm_out = tmp_path / "rm"
    s = reward_model.train(reward_model.Args(**cpu, data=str(pairs), max_steps=2, batch_size=2, eval_size=2,
                                             norm_samples=2, max_new_tokens=4, out_dir=str(rm_out)))
    # --max-length 1024 is capped at the context, and said: the long row is dropped (TRL's reward trainer)
    assert s["steps"] == 2 and s["max_length_dropped_rows"] == {"train": 1, "heldout": 0}
    assert "--max-length 1024: capped at 256, the context of --model" in capsys.readouterr().out
    s = dpo.train(dpo.Args(**cpu, data=str(pairs), chat_template=True, max_steps=2, batch_size=2, eval_size=2,
                           eval_samples=2, max_new_tokens=4, save_model=False, out_dir=str(tmp_path / "dpo")))
    assert s["steps"] == 2 and s["max_length"]["cut_pairs"] == {"train": 1, "heldout": 0}  # keep_start at 256
    assert "--max-length 1024: capped at 256, the context of --model" in capsys.readouterr().out
    s = ppo.train(ppo.Args(**cpu, data=str(pairs), reward_model=str(rm_out / "model"), steps=2, batch_size=2,
                           mini_batches=1, ppo_epochs=1, eval_samples=2, eval_every=2, max_new_tokens=4,
                           save_model=False, out_dir=str(tmp_path / "ppo")))
    rows = [r for r in metrics(tmp_path / "ppo") if r["step"] > 0]
    assert s["steps"] == 2 and [r["completions/no_eos_frac"] for r in rows] == [0.0, 0.0]
