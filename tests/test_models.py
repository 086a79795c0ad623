"""Tests of the shipped models (models/) and of models/build.py, which remakes them.

The scripts load `tiny`, `tiny-pref` and `tiny-pref-rm` from the repository's files, never from a
build on first use (and bench/bench_length.py loads `models/tiny-ramble` by its path). So: the shipped folders load and reproduce the figures in their build.json;
a small build loads and repeats its weights for its seed; and a default run writes nothing
outside its run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import tasks
import reward_model
from models import build

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def record(name: str) -> dict:
    return json.loads((common.MODELS_DIR / name / "build.json").read_text())


#####################################################################################################
#####  the shipped folders
#####################################################################################################


def test_shipped_folders_are_small_safetensors_with_a_build_record():
    total = 0
    for name in common.EMBEDDED:
        folder = common.MODELS_DIR / name
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file(), name
        r = record(name)
        assert r["name"] == name and r["command"].startswith(f"python models/build.py {name}")
        for key in ("seed", "torch", "transformers", "recipe", "weights_sha256"):
            assert key in r, (name, key)
        # the record names the weights it describes
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == r["weights_sha256"]
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert not list(common.MODELS_DIR.glob("**/*.pt")) and not list(common.MODELS_DIR.glob("**/*.bin"))
    assert total < 8 * 2**20, f"{total / 2**20:.1f} MB"  # a few MB in all


def test_tiny_reproduces_its_recorded_greedy_accuracy():
    # Greedy decoding of a fixed model on the 500 held-out problems: the same number as build.json,
    # exactly, and the same split by ones carry. Sampling (pass@k) is checked more loosely: on
    # another CPU, a float difference can move a rare sample across a boundary of the multinomial.
    r = record("tiny")
    model, tok = common.load_model("tiny", CPU, trainable=False)
    heldout = tasks.arithmetic_task()[1]
    assert tasks.greedy_accuracy(model, tok, heldout, 4) == r["heldout_accuracy"]
    carry = [x for x in heldout if build.ones_carry(x["prompt"])]
    assert round(tasks.greedy_accuracy(model, tok, carry, 4), 4) == r["heldout_accuracy_carry"]
    p = tasks.pass_at_k(model, tok, heldout, r["k"], 4)
    assert p["pass_at_1"] == pytest.approx(r["pass_at_1"], abs=0.01)
    assert p["pass_at_k"] == pytest.approx(r["pass_at_k"], abs=0.01)
    # what the recipe is for: RL starts far from the top, and sampling reaches most answers
    assert r["heldout_accuracy"] < 0.7 and r["pass_at_k"] > 0.9


def test_tiny_ramble_reproduces_its_recorded_figures():
    # models/tiny-ramble is no embedded name (it is loaded by its path), so the folder checks of
    # the first test are repeated here. Greedy accuracy is exact, as for `tiny`; the sampled
    # lengths are checked loosely (see above), and what the recipe is for: right answers are
    # short, wrong ones ramble, and all of them end within --max-new-tokens 16.
    folder = common.MODELS_DIR / "tiny-ramble"
    r = json.loads((folder / "build.json").read_text())
    assert r["name"] == "tiny-ramble" and r["command"].startswith("python models/build.py tiny-ramble")
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == r["weights_sha256"]
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2**20
    assert r["recipe"] == {**build.TINY_RAMBLE, "sft_steps": r["recipe"]["sft_steps"]}
    model, tok = common.load_model(str(folder), CPU, trainable=False)
    heldout = tasks.arithmetic_task()[1]
    assert tasks.greedy_accuracy(model, tok, heldout, 16) == r["heldout_accuracy"]
    lengths = build.length_figures(model, tok, heldout[:100], 8, 16)
    assert lengths["sample_len_correct"] == pytest.approx(r["sample_len_correct"], abs=0.3)
    assert lengths["sample_len_incorrect"] == pytest.approx(r["sample_len_incorrect"], abs=0.6)
    assert r["sample_len_correct"] < 4 and r["sample_len_incorrect"] > 6 and r["sample_no_eos_frac"] == 0
    assert r["heldout_accuracy"] < 0.7 and r["pass_at_k"] > 0.9


def test_tiny_long_reproduces_its_recorded_figures():
    # models/tiny-long, the start model of --task long-addition, loaded by its path: the folder
    # checks, the greedy figures exactly (accuracy, length, share worked out), and what the recipe
    # is for: both formats in the model, the worked one rarer, longer and more accurate.
    folder = common.MODELS_DIR / "tiny-long"
    r = json.loads((folder / "build.json").read_text())
    assert r["name"] == "tiny-long" and r["command"].startswith("python models/build.py tiny-long")
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == r["weights_sha256"]
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2**20
    assert r["recipe"] == {**build.TINY_LONG, "sft_steps": r["recipe"]["sft_steps"]}
    model, tok = common.load_model(str(folder), CPU, trainable=False)
    heldout = tasks.long_addition_task()[1]
    g = tasks.greedy_format_figures(model, tok, heldout, r["recipe"]["max_new_tokens"])
    assert round(g["accuracy"], 4) == r["heldout_accuracy"] and round(g["worked_frac"], 4) == r["greedy_worked_frac"]
    assert round(g["mean_length"], 4) == r["greedy_mean_length"]
    assert 0.05 < r["sample_worked_frac"] < 0.5  # both formats sampled, the worked one rarer
    assert r["sample_accuracy_worked"] > 5 * r["sample_accuracy_direct"] + 0.1  # and far more accurate
    assert r["greedy_worked_frac"] < 0.1  # greedy decoding answers directly ...
    assert r["heldout_accuracy"] < 0.2 and r["pass_at_k"] > 4 * r["heldout_accuracy"]  # ... and mostly wrong


def test_tiny_pref_pairs_reproduce_their_recorded_ceilings():
    r = record("tiny-pref")
    folder = common.MODELS_DIR / "tiny-pref"
    for split in ("train", "heldout"):
        pairs = tasks.read_preference_jsonl(folder / f"pairs_{split}.jsonl")
        assert len(pairs) == r["recipe"][f"{split}_pairs"]
        assert round(tasks.ceiling_accuracy(pairs), 4) == r[f"{split}_ceiling"]
    model, tok = common.load_model("tiny-pref", CPU, trainable=False)
    assert tok.eos_token_id == 1 and model.config.vocab_size == len(tok)


def test_tiny_pref_rm_reproduces_its_recorded_pair_accuracy():
    r = record("tiny-pref-rm")
    rm, tok = tasks.load_reward_model("tiny-pref-rm")
    heldout = tasks.read_preference_jsonl(common.MODELS_DIR / "tiny-pref" / "pairs_heldout.jsonl")
    r_c, r_r = reward_model.score_pairs(rm, tok, heldout, CPU)
    assert round(float(reward_model.pair_accuracy(r_c, r_r)), 4) == r["heldout_accuracy"]
    assert round(rm.reward_mean.item(), 4) == r["reward_mean"] and round(rm.reward_std.item(), 4) == r["reward_std"]
    # the same tokenizer as the policy it scores
    assert tok.get_vocab() == common.load_model("tiny-pref", CPU)[1].get_vocab()


#####################################################################################################
#####  the recipe's pieces, by hand
#####################################################################################################


@pytest.mark.parametrize("prompt, carry", [("37+48=", True), ("5+5=", True), ("31+48=", False),
                                           ("90+10=", False), ("0+0=", False), ("99+1=", True)])
def test_ones_carry(prompt, carry):
    assert build.ones_carry(prompt) is carry


def test_sloppy_answer_forgets_the_carry_at_the_slip_rate():
    rng = np.random.default_rng(0)
    # 37+48 = 85 carries: the label is 85 or, with probability 0.7, 85 − 10 = 75
    labels = [build.sloppy_answer({"prompt": "37+48=", "answer": "85"}, 0.7, rng) for _ in range(4000)]
    assert set(labels) == {"85", "75"}
    assert np.mean([x == "75" for x in labels]) == pytest.approx(0.7, abs=0.03)  # ±4.5 σ at n = 4000
    # 31+48 = 79 has no ones carry: always right
    assert {build.sloppy_answer({"prompt": "31+48=", "answer": "79"}, 0.7, rng) for _ in range(100)} == {"79"}


def test_sloppy_answer_rambles_only_after_a_slip():
    rng = np.random.default_rng(0)
    # 37+48 = 85 carries: the label is 85, or 75 followed by n ~ Uniform{1..8} dots
    labels = [build.sloppy_answer({"prompt": "37+48=", "answer": "85"}, 0.7, rng, ramble_max=8)
              for _ in range(4000)]
    wrong = [x for x in labels if x != "85"]
    assert all(x.startswith("75") and set(x[2:]) == {build.RAMBLE} for x in wrong)
    assert len(wrong) / 4000 == pytest.approx(0.7, abs=0.03)  # the slip rate, as without a ramble
    assert {len(x) - 2 for x in wrong} == set(range(1, 9))
    assert np.mean([len(x) - 2 for x in wrong]) == pytest.approx(4.5, abs=0.15)  # (1 + 8) / 2; sd 2.3/√2800
    # no carry: always right, and never a ramble
    assert {build.sloppy_answer({"prompt": "31+48=", "answer": "79"}, 0.7, rng, 8) for _ in range(100)} == {"79"}
    # ramble_max = 0 (`tiny`) draws nothing more: the same labels and RNG state as before the option
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    row = {"prompt": "37+48=", "answer": "85"}
    assert [build.sloppy_answer(row, 0.7, a) for _ in range(50)] == \
        [build.sloppy_answer(row, 0.7, b, ramble_max=0) for _ in range(50)]
    assert a.random() == b.random()


def test_pass_at_k_by_hand(monkeypatch):
    # 2 prompts × k = 2 samples. Prompt 1 (answer 5) gets "5", "4": one hit; prompt 2 (answer 8)
    # gets "7", "7": none. pass@1 = mean of [[1, 0], [0, 0]] = 0.25; pass@2 = (1 + 0) / 2 = 0.5.
    # (pass_at_k scores the generated ids, so the stand-in for generate_text returns them too)
    texts = ["5", "4", "7", "7"]
    tok = build.build_char_tokenizer()
    ids = torch.tensor([tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts])  # [4, 2]
    monkeypatch.setattr(common, "generate_text", lambda m, t, prompts, *a, **k: (
        None, None, ids[:len(prompts)], None, texts[:len(prompts)], [True] * len(prompts)))
    model = torch.nn.Linear(1, 1)
    rows = [{"prompt": "2+3=", "answer": "5"}, {"prompt": "4+4=", "answer": "8"}]
    assert tasks.pass_at_k(model, tok, rows, 2, 4) == {"k": 2, "pass_at_1": 0.25, "pass_at_k": 0.5}


#####################################################################################################
#####  models/build.py
#####################################################################################################


def build_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "models/build.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_small_builds_load_and_repeat_their_weights(tmp_path):
    """Each of the three builds with small settings, twice with one seed: the same weights (on one
    machine), a folder that `from_pretrained` loads, and a build.json with the command."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runs = {
        "tiny": ["--steps", "8"],
        "tiny-pref": ["--steps", "3", "--pairs", "40", "20"],
    }
    hashes = {}
    for name, extra in runs.items():
        for copy in ("a", "b"):
            out = tmp_path / f"{name}-{copy}"
            result = build_cli(name, "--seed", "3", "--out", str(out), *extra)
            assert result.returncode == 0, result.stderr[-2000:]
            r = json.loads((out / "build.json").read_text())
            assert r["seed"] == 3 and r["command"] == f"python models/build.py {name} --seed 3 --out {out} " + " ".join(extra)
            assert r["recipe"]["sft_steps"] == int(extra[1])
            hashes[name, copy] = r["weights_sha256"]
            AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
        assert hashes[name, "a"] == hashes[name, "b"], name
    assert (tmp_path / "tiny-pref-a" / "pairs_heldout.jsonl").read_text() == \
        (tmp_path / "tiny-pref-b" / "pairs_heldout.jsonl").read_text()
    # a reward model on the small tiny-pref: reward_model.py's defaults, cut to 2 steps
    out = tmp_path / "rm"
    result = build_cli("tiny-pref-rm", "--seed", "1", "--out", str(out), "--steps", "2",
                       "--pref", str(tmp_path / "tiny-pref-a"))
    assert result.returncode == 0, result.stderr[-2000:]
    rm, _ = tasks.load_reward_model(out)
    assert json.loads((out / "build.json").read_text())["steps"] == 2 and rm.reward_std.item() > 0
    # another seed gives other weights
    result = build_cli("tiny", "--seed", "4", "--out", str(tmp_path / "tiny-c"), "--steps", "8")
    assert json.loads((tmp_path / "tiny-c" / "build.json").read_text())["weights_sha256"] != hashes["tiny", "a"]


@pytest.mark.parametrize("argv, names", [
    (["tiny", "--out", "{existing}"], "--out"),
    (["tiny", "--out", "{new}", "--steps", "0"], "--steps"),
    (["tiny", "--out", "{new}", "--set", "bogus=1"], "--set"),
    (["tiny", "--out", "{new}", "--set", "carry_slip=abc"], "--set"),
    (["tiny-pref-rm", "--out", "{new}", "--pref", "{new}"], "--pref"),
])
def test_build_bad_input_is_one_line_and_leaves_nothing(tmp_path, argv, names):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    new = tmp_path / "new"
    argv = [a.format(existing=existing, new=new) for a in argv]
    result = build_cli(*argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], result.stderr
    assert not new.exists() and (existing / "keep.txt").read_text() == "x"


#####################################################################################################
#####  a default run builds nothing
#####################################################################################################


def tree_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("script, argv", [
    ("grpo.py", ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--eval-size", "10"]),
    ("ppo.py", ["--steps", "1", "--batch-size", "4", "--mini-batches", "1", "--eval-samples", "8"]),
    ("reinforce.py", ["--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-size", "10"]),
    ("dpo.py", ["--max-steps", "1", "--batch-size", "4", "--eval-size", "20", "--eval-samples", "8"]),
    ("reward_model.py", ["--max-steps", "1", "--batch-size", "4", "--eval-size", "20", "--norm-samples", "8"]),
])
def test_a_default_run_builds_nothing(tmp_path, script, argv):
    """With an empty home folder and cache: the run reads the shipped models, writes only its run
    folder, prints no build and no training of a reward model, and no warning (no deprecated
    transformers API on the code path)."""
    home = tmp_path / "home"
    home.mkdir()
    before = tree_state(common.MODELS_DIR)
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "HF_HOME": str(home / "hf")}
    result = subprocess.run([sys.executable, script, *argv, "--out-dir", str(tmp_path / "run")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    said = result.stdout.replace(str(tmp_path), "<tmp>").lower()  # the test's own folder name says "builds"
    assert "build" not in said and "training one first" not in said
    assert tree_state(common.MODELS_DIR) == before
    assert [p for p in home.rglob("*") if p.is_file()] == []
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_sample_preference_pairs_labels_by_bradley_terry_and_drops_bad_pairs(monkeypatch):
    """models/build.py:sample_preference_pairs with the sampler replaced by a fixed script of texts.

    Every prompt gets the two samples ("was great", "was ok"): r_gold = 1 and 0, so Δr = 1 and the
    Bradley–Terry label picks "was great" with probability σ(1) = 1/(1 + e^−1) = 0.7311. Over 4,000
    pairs the binomial standard error is √(0.73·0.27/4000) = 0.007; allow 4 of them (0.028).
    Every other prompt instead gets a pair the sampler must drop, in turn: two equal texts, an empty
    one, or one that did not finish. None of those may appear."""
    calls = {"n": 0}

    def fake_generate_text(model, tokenizer, prompts, max_new_tokens, *a, **k):
        texts, finished = [], []
        for i in range(len(prompts) // 2):
            calls["n"] += 1
            kind = calls["n"] % 6
            pair = {0: ("was ok", "was ok"), 2: ("", "was ok"), 4: ("was great", "was bad")}.get(
                kind, ("was great", "was ok"))
            texts += list(pair)
            finished += [True, kind != 4]  # kind 4: the second sample ran into the token limit
        return None, None, None, None, texts, finished

    monkeypatch.setattr(common, "generate_text", fake_generate_text)
    pairs, golds = build.sample_preference_pairs(None, None, n_pairs=4000, seed=0, batch_size=500)
    assert len(pairs) == 4000 and len(golds) == 8000
    assert all({p["chosen"], p["rejected"]} == {"was great", "was ok"} for p in pairs)  # bad pairs dropped
    p_great = np.mean([p["chosen"] == "was great" for p in pairs])
    assert p_great == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.028)
    assert sorted(set(golds)) == [0.0, 1.0]
