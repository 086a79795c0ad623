"""Tests of reward_model.py and of the preference task in tasks.py: the loss by hand, the reward
head, the gold reward and the noisy labels, then the script end to end.

Notes `003_0bc5d2784dac14e1.txt`, "Training the reward model" and "Training objective". Every
expected number is derived in a comment next to it, so that it can be checked on paper.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import common
import tasks
from models.build import TINY_PREF, build_word_tokenizer
import reward_model
from reward_model import bradley_terry_loss, pair_accuracy, ranking_loss
from tasks import RewardModel, last_token_index


#####################################################################################################
#####  the Bradley–Terry loss by hand
#####################################################################################################


def test_equal_rewards_give_ln2():
    # Δ = r_w − r_l = 0: L = −log σ(0) = −log ½ = ln 2, whatever the common value
    r = torch.tensor([0.0, 1.5, -3.0, 100.0])
    torch.testing.assert_close(bradley_terry_loss(r, r.clone()), torch.full((4,), math.log(2)))


def test_margin_shifts_the_difference():
    # With a margin m: L = −log σ(Δ − m).
    #   Δ = 2, m = 0.5: −log σ(1.5) = log(1 + e^{−1.5}) = log(1 + 0.2231302) = 0.2014133
    #   Δ = 1, m = 1:   −log σ(0) = ln 2          (winning by exactly m is a coin flip)
    #   Δ = 1, m = 0:   −log σ(1) = log(1 + e^{−1}) = 0.3132617
    rc, rr = torch.tensor([2.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    got = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([0.2014133, math.log(2), 0.3132617]))
    # a number margin applies to every pair: Δ = 2 − 0.5 = 1.5 -> 0.2014133 again
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), 0.5).item() == pytest.approx(0.2014133)


def test_gradient_and_large_differences():
    # ∂L/∂r_w = −σ(−(Δ − m)) = −∂L/∂r_l. Δ = 2, m = 0.5: −σ(−1.5) = −0.1824255
    rc, rr = torch.tensor([2.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(rc, rr, 0.5).sum().backward()
    assert rc.grad.item() == pytest.approx(-0.1824255, abs=1e-6)
    assert rr.grad.item() == pytest.approx(0.1824255, abs=1e-6)
    # Δ = −100: L = log(1 + e^{100}) = 100 (to float precision), not inf; Δ = +100: about e^{−100}
    big = bradley_terry_loss(torch.tensor([-50.0, 50.0]), torch.tensor([50.0, -50.0]))
    assert big[0].item() == pytest.approx(100.0) and 0 <= big[1].item() < 1e-40


def test_centering_penalty_and_pair_accuracy():
    # (r_w + r_l)²: (1 + 2)² = 9, (−1 + 1)² = 0
    got = reward_model.centering_penalty(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 1.0]))
    assert got.tolist() == [9.0, 0.0]
    # accuracy: right, wrong, tie -> (1 + 0 + ½) / 3 = 0.5
    assert pair_accuracy(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, 1.0])).item() == 0.5


#####################################################################################################
#####  the reward head: read at the last real token, invariant to padding, saved and reloaded
#####################################################################################################


def sp(z: float) -> float:  # softplus(−z) = −log σ(z)
    return math.log(1 + math.exp(-z))


def test_ranking_loss_by_hand():
    # One ranking y_1 ≻ y_2 ≻ y_3 with rewards (2, 1, 0). Its C(3,2) = 3 pairs and their differences:
    #   (1,2): 2 − 1 = 1    (1,3): 2 − 0 = 2    (2,3): 1 − 0 = 1
    #   L = [−log σ(1) − log σ(2) − log σ(1)] / 3 = [0.3132617 + 0.1269280 + 0.3132617] / 3 = 0.2511505
    t3 = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    loss = ranking_loss(t3)
    assert loss.shape == (1,) and loss.item() == pytest.approx(0.2511505, abs=1e-6)
    assert (2 * sp(1) + sp(2)) / 3 == pytest.approx(0.2511505, abs=1e-7)
    # gradient: ∂/∂r_i of −log σ(r_i − r_j) is −σ(−(r_i − r_j)); y_1 wins both its pairs, y_3 loses both:
    #   ∂L/∂r_1 = −[σ(−1) + σ(−2)] / 3 = −(0.2689414 + 0.1192029) / 3 = −0.1293814
    #   ∂L/∂r_2 = [σ(−1) − σ(−1)] / 3 = 0   (wins against y_3 by 1, loses against y_1 by 1)
    #   ∂L/∂r_3 = +[σ(−2) + σ(−1)] / 3 = +0.1293814
    loss.sum().backward()
    assert t3.grad[0].tolist() == pytest.approx([-0.1293814, 0.0, 0.1293814], abs=1e-6)
    # with margin m = 0.5 each difference shrinks by 0.5: [2·(−log σ(0.5)) − log σ(1.5)] / 3
    assert ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), margin=0.5).item() == pytest.approx(
        (2 * sp(0.5) + sp(1.5)) / 3, abs=1e-6)
    # K = 2 is the Bradley–Terry loss of the pair
    pair = torch.tensor([[0.3, -1.2], [1.0, 2.0]])
    torch.testing.assert_close(ranking_loss(pair), bradley_terry_loss(pair[:, 0], pair[:, 1]))
    # rankings of different K in one batch: row 2 has K = 2 (mask 1 1 0), so only its pair (3 − 0)
    #   counts: −log σ(3) = 0.0485874; row 1 as above
    mixed = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert ranking_loss(mixed, mask=mask).tolist() == pytest.approx([0.2511505, 0.0485874], abs=1e-6)
    # a ranking is one batch element: its loss is the mean over its pairs, not their sum, so a
    # ranking of K = 3 weighs as much as a pair in the batch mean
    assert ranking_loss(mixed, mask=mask).mean().item() == pytest.approx((0.2511505 + 0.0485874) / 2, abs=1e-6)


def test_rankings_as_pairs_and_the_max_length_rule():
    rows = [{"prompt": "the hotel", "completions": ["was great", "was ok", "was bad"]},
            {"prompt": "the car", "chosen": "was good", "rejected": "was slow"}]
    assert reward_model.ranking_pairs(rows) == [
        {"prompt": "the hotel", "chosen": "was great", "rejected": "was ok"},
        {"prompt": "the hotel", "chosen": "was great", "rejected": "was bad"},
        {"prompt": "the hotel", "chosen": "was ok", "rejected": "was bad"},
        {"prompt": "the car", "chosen": "was good", "rejected": "was slow"}]
    # word tokens: "the hotel" 2, "was great" 2, + EOS 1 = 5 for every sequence of row 1 and of row 2
    tok = build_word_tokenizer()
    long = {"prompt": "the hotel", "chosen": "was great and the view was nice", "rejected": "was bad"}  # 2+7+1 = 10
    assert reward_model.drop_too_long(tok, rows + [long], 5) == (rows, 1)  # TRL drops, never cuts, an RM row
    assert reward_model.drop_too_long(tok, rows + [long], 10) == (rows + [long], 0)
    assert reward_model.drop_too_long(tok, rows, None) == (rows, 0)


def test_last_token_index_for_any_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1],    # left-padded: last real token at 4
                         [1, 1, 1, 0, 0],    # right-padded: 2
                         [0, 1, 1, 0, 0],    # both: 2
                         [1, 1, 1, 1, 1]])   # none: 4
    assert last_token_index(mask).tolist() == [4, 2, 2, 4]


def random_word_llama(seed: int = 0, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_word_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval(), tok


ROWS = [("the hotel", "was great"), ("the car the bus", "felt very good but the menu was slow"),
        ("the pizza", "seemed ok and the view was nice")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_is_read_at_the_eos_and_invariant_to_padding(arch, request):
    if arch == "llama":
        lm, tok = random_word_llama()
    else:  # learned absolute positions, LayerNorm, Conv1D, and the character tokenizer
        lm, tok = common.load_model(str(request.getfixturevalue("tiny_random_other_arch")),
                                    torch.device("cpu"))
        lm.eval()
    rm = RewardModel(lm).eval()
    ids, mask, _, _ = common.encode_prompt_completion(tok, *zip(*ROWS))  # [3, P+T], both-side padding
    with torch.no_grad():
        batch = rm(ids, mask)  # [3]
        # more padding on both sides changes nothing (position ids follow the mask)
        pad = torch.full((3, 2), tok.pad_token_id)
        zeros = torch.zeros(3, 2, dtype=mask.dtype)
        wider = rm(torch.cat([pad, ids, pad], 1), torch.cat([zeros, mask, zeros], 1))  # [3]
        torch.testing.assert_close(wider, batch, atol=1e-5, rtol=1e-5)
        for k, (x, y) in enumerate(ROWS):
            # by hand: the transformer's last hidden state at the final token (the EOS), no padding
            seq = tok.encode(x, add_special_tokens=False) + tok.encode(y, add_special_tokens=False)
            seq = torch.tensor([seq + [tok.eos_token_id]])  # [1, L]
            h = lm.base_model(input_ids=seq).last_hidden_state[0, -1]  # [d]
            expected = h @ rm.head.weight[0] + rm.head.bias[0]  # w · h + b
            torch.testing.assert_close(batch[k], expected, atol=1e-5, rtol=1e-5)


def test_head_init_std_is_one_over_sqrt_d_plus_1():
    # d = 1024: std 1/√1025 = 0.031235; the sample std of 1024 normal draws is within a few %
    lm, _ = random_word_llama(hidden=1024)
    rm = RewardModel(lm)
    assert rm.head.weight.shape == (1, 1024) and rm.head.bias.item() == 0.0
    assert rm.head.weight.std().item() == pytest.approx(1 / math.sqrt(1025), rel=0.1)


def test_save_and_load_keep_the_rewards_and_the_normalisation(tmp_path):
    lm, tok = random_word_llama(seed=2)
    rm = RewardModel(lm).eval()
    ids, mask, _, _ = common.encode_prompt_completion(tok, *zip(*ROWS))
    with torch.no_grad():
        raw = rm(ids, mask)  # [3]
        rm.reward_mean.fill_(0.25)
        rm.reward_std.fill_(2.0)
        normalised = rm(ids, mask)
    torch.testing.assert_close(normalised, (raw - 0.25) / 2.0)  # (r − μ) / s
    tasks.save_reward_model(rm, tok, tmp_path / "rm")
    loaded, tok2 = tasks.load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), normalised)
    assert not any(p.requires_grad for p in loaded.parameters())
    # the LM folder also loads on its own, e.g. to start a value model from it
    common.load_model(str(tmp_path / "rm"), torch.device("cpu"))
    with pytest.raises(common.UsageError, match="reward_head.safetensors"):
        tasks.load_reward_model(tmp_path)


def hf_rewards(folder, ids, mask):
    """Rewards from transformers' own class, as a TRL user loads a reward model."""
    from transformers import AutoModelForSequenceClassification

    with common.quiet_transformers():
        hf = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        return hf.eval()(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # [B]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_transformers_sequence_classifier_gives_the_same_rewards(tmp_path, pad_is_eos):
    # A trained head (w, b) and a normalisation (μ, s): r = (w · h + b − μ) / s. The saved
    # score.weight is w / s and config.reward_offset (b − μ) / s, so transformers'
    # AutoModelForSequenceClassification (no bias) gives r − reward_offset, within float error.
    # pad = EOS would make transformers read the score one token early (the rightmost token that is
    # not the pad): the saved folder pads with unk instead.
    lm, tok = random_word_llama(seed=3)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    rm = RewardModel(lm).eval()
    with torch.no_grad():
        rm.head.bias.fill_(0.7)
        rm.reward_mean.fill_(-0.3)
        rm.reward_std.fill_(2.5)
    folder = tasks.save_reward_model(rm, tok, tmp_path / "rm")
    config = json.loads((folder / "config.json").read_text())
    assert config["reward_offset"] == pytest.approx((0.7 + 0.3) / 2.5) and config["id2label"] == {"0": "LABEL_0"}
    assert config["pad_token_id"] != config["eos_token_id"]
    loaded, tok2 = tasks.load_reward_model(folder)
    assert tok2.pad_token_id == config["pad_token_id"]
    ids, mask, _, _ = common.encode_prompt_completion(tok2, *zip(*ROWS))  # [3, P+T], both-side padding
    with torch.no_grad():
        ours = loaded(ids, mask)  # [3]
    torch.testing.assert_close(hf_rewards(folder, ids, mask) + config["reward_offset"], ours, atol=1e-5, rtol=0)
    # and the shipped reward model, on held-out pairs of the built-in task
    rm, tok = tasks.load_reward_model("tiny-pref-rm")
    _, heldout = tasks.load_preferences(None)
    ids, mask, _, _ = common.encode_prompt_completion(tok, [p["prompt"] for p in heldout[:64]],
                                                      [p["chosen"] for p in heldout[:64]])
    offset = json.loads((common.MODELS_DIR / "tiny-pref-rm" / "config.json").read_text())["reward_offset"]
    with torch.no_grad():
        torch.testing.assert_close(hf_rewards(common.MODELS_DIR / "tiny-pref-rm", ids, mask) + offset,
                                   rm(ids, mask), atol=1e-5, rtol=0)


def test_load_reward_model_reads_a_transformers_classifier(tmp_path):
    # A folder that only transformers wrote (TRL's reward-model format: score.weight, no bias, no
    # reward_head.safetensors) loads as a RewardModel with head w = score.weight, b = 0, μ = 0, s = 1.
    from transformers import LlamaConfig, LlamaForSequenceClassification

    _, tok = random_word_llama()
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "trl_rm")
    tok.save_pretrained(tmp_path / "trl_rm")
    rm, _ = tasks.load_reward_model(tmp_path / "trl_rm")
    assert rm.head.bias.item() == 0 and rm.reward_mean.item() == 0 and rm.reward_std.item() == 1
    ids, mask, _, _ = common.encode_prompt_completion(tok, *zip(*ROWS))
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), hf_rewards(tmp_path / "trl_rm", ids, mask), atol=1e-5, rtol=0)


#####################################################################################################
#####  the preference task: the gold reward, the ceiling, the noisy labels
#####################################################################################################


def test_gold_reward_by_hand():
    assert tasks.gold_reward("was really great but the staff was rude") == 0.0  # +1 − 1
    assert tasks.gold_reward("was great and the view was nice") == 2.0  # +1 + 1
    assert tasks.gold_reward("Felt AWFUL") == -1.0  # lower-cased
    # 12 words with 3 positive, then 5 neutral: 17 words, 3 − 0.5 · (17 − 15) = 2
    assert tasks.gold_reward("was great and the view was nice and the menu was good " + "ok " * 5) == 2.0
    # ceiling: the gold agrees, ties, disagrees -> (1 + ½ + 0) / 3 = 0.5
    pairs = [{"chosen": "was great", "rejected": "was bad"}, {"chosen": "was ok", "rejected": "was new"},
             {"chosen": "was bad", "rejected": "was good"}]
    assert tasks.ceiling_accuracy(pairs) == 0.5


@pytest.fixture(scope="module")
def pref_path():
    """The embedded SFT policy `tiny-pref` and its pairs: the shipped folder models/tiny-pref."""
    return common.MODELS_DIR / "tiny-pref"


def test_built_in_pairs_are_labelled_with_bradley_terry_noise(pref_path):
    # P(chosen has the higher gold reward | |Δr| = k) should be σ(k): σ(1) = 0.7311, σ(2) = 0.8808.
    # With a few hundred pairs per k, the binomial standard error is about 0.02; allow 0.06.
    pairs = tasks.read_preference_jsonl(pref_path / "pairs_train.jsonl")
    assert len(pairs) == TINY_PREF["train_pairs"]
    d = np.array([tasks.gold_reward(p["chosen"]) - tasks.gold_reward(p["rejected"]) for p in pairs])
    for k in (1, 2):
        sel = np.abs(d) == k
        assert sel.sum() > 300
        assert (d[sel] > 0).mean() == pytest.approx(1 / (1 + math.exp(-k)), abs=0.06), k
    # the SFT policy writes mixed sentiment: room to improve in both directions
    golds = [tasks.gold_reward(p[k]) for p in pairs for k in ("chosen", "rejected")]
    assert abs(np.mean(golds)) < 0.5 and min(golds) <= -2 and max(golds) >= 2


#####################################################################################################
#####  the script: bad input and short runs, as subprocesses (started together on a small pool)
#####################################################################################################

SHORT = ["--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-size", "40",
         "--norm-samples", "16", "--log-every", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_script):
    """Start every subprocess of this module on a small pool: {name: (out_dir, future)}. The bad-input
    runs come first."""
    base = tmp_path_factory.mktemp("rm_runs")
    good = [json.dumps({"prompt": x, "chosen": y, "rejected": "was bad"}) for x, y in ROWS] * 4
    (base / "data.jsonl").write_text("\n".join(good) + "\n")
    (base / "missing.jsonl").write_text(good[0] + "\n\n" + json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    bad_jobs = {
        "missing_key": ["--data", str(base / "missing.jsonl")],
        "bad_margin": ["--margin", "-1"],
    }
    jobs = {
        "default": SHORT,
        "data": SHORT + ["--data", str(base / "data.jsonl"), "--margin", "0.5", "--center-coef", "0.01"],
    }

    def submit(name, argv):
        return base / name, pool.submit(run_script, "reward_model.py", *argv, "--out-dir", str(base / name))

    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    futures = {name: submit(name, argv) for name, argv in bad_jobs.items()}
    futures.update({name: submit(name, argv) for name, argv in jobs.items()})
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name, must_name", [
    ("missing_key", "missing.jsonl:3: missing key(s) 'prompt'"),  # line 2 is blank: line numbers are the file's
    ("bad_margin", "--margin"),
])
def test_bad_input_gives_one_line(runs, name, must_name):
    result = runs[name][1].result()
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], result.stderr


def test_short_run_writes_outputs_and_the_model_reloads(runs):
    out, future = runs["default"]
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("loss/bt", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(r[key]) for r in rows[1:]), key
    s = json.loads((out / "summary.json").read_text())
    assert 0 <= s["heldout_accuracy"] <= 1 and 0.5 < s["ceiling_accuracy"] < 1
    assert s["reward_std"] > 0 and -1 <= s["gold_correlation"] <= 1
    # the saved reward model reloads with its normalisation, and scores pairs
    rm, tok = tasks.load_reward_model(out / "model")
    assert rm.reward_mean.item() == pytest.approx(s["reward_mean"])
    assert rm.reward_std.item() == pytest.approx(s["reward_std"])
    pairs = tasks.read_preference_jsonl(common.MODELS_DIR / "tiny-pref" / "pairs_heldout.jsonl")[:40]
    r_c, r_r = reward_model.score_pairs(rm, tok, pairs, "cpu")
    assert pair_accuracy(r_c, r_r).item() == pytest.approx(s["heldout_accuracy"])  # the same 40 pairs


def test_short_run_on_a_users_file(runs):
    out, future = runs["data"]
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["ceiling_accuracy"] is None and "gold_correlation" not in s  # no gold reward for a user's file
    assert s["train_pairs"] == 10 and s["heldout_pairs"] == 2  # the last fifth is held out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # step 1 with margin 0.5 and a fresh head: loss/total = loss/bt + 0.01 · loss/center
    assert rows[1]["loss/total"] == pytest.approx(rows[1]["loss/bt"] + 0.01 * rows[1]["loss/center"], rel=1e-5)
