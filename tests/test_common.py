"""Tests of common.py (the core: tensors, log-probs, generation, model loading), and of the parts of
harness.py and tasks.py that every script uses.

Small random models are built in the tests (seeded), so nothing here needs the embedded `tiny`
model or a network connection.
"""

from __future__ import annotations

import json

import pytest
import torch

import common
import harness
import tasks
from models.build import build_char_tokenizer
import grpo

PAD, EOS = 0, 1  # ids used by the hand-made examples below (as in the character tokenizer)


def random_llama(attn: str = "sdpa", seed: int = 0, vocab: int = 32):
    """A 2-layer Llama with random weights; eval mode (no dropout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def random_model(arch: str, attn: str = "sdpa", seed: int = 0, vocab: int = 32):
    """A random Llama, Qwen2 or GPT-2 (learned absolute positions), for architecture-agnostic checks."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    if arch == "llama":
        return random_llama(attn, seed, vocab)
    torch.manual_seed(seed)
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
                          attn_implementation=attn)
        return Qwen2ForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval()


#####################################################################################################
#####  token_logprobs
#####################################################################################################


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_logprobs_padding_invariance(arch, attn):
    """The same (prompt, completion) scored unpadded, with the prompt padded on the left and the
    completion padded on the right, alone or in a batch, gives the same log-probs (1e-5)."""
    model = random_model(arch, attn)
    prompt, comp = [5, 6, 7], [8, 9, 10, EOS]
    n = len(comp)

    def score(left: int, right: int):
        ids = torch.tensor([[PAD] * left + prompt + comp + [PAD] * right])  # [1, L]
        mask = torch.tensor([[0] * left + [1] * (len(prompt) + n) + [0] * right])  # [1, L]
        logp, ent = common.token_logprobs(model, ids, mask, n + right, with_entropy=True)  # [1, n+right]
        return logp, ent

    ref, ref_ent = score(0, 0)  # [1, 4]
    assert torch.isfinite(ref).all() and (ref < 0).all()
    for left, right in [(3, 0), (0, 2), (2, 3), (7, 1)]:
        logp, ent = score(left, right)
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all()  # no NaN anywhere
        torch.testing.assert_close(logp[:, :n], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[:, :n], ref_ent, atol=1e-5, rtol=0)
        assert (logp[:, n:] == 0).all() and (ent[:, n:] == 0).all()  # padding targets come back 0

    # in one batch, next to a longer row, so that the padding is forced on both sides
    long_prompt, long_comp = [11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, EOS]
    p_ids, p_mask = common.left_pad([prompt, long_prompt], PAD)  # [2, 6]
    c_ids = torch.tensor([comp + [PAD] * 2, long_comp])  # [2, 6]
    c_mask = torch.tensor([[1] * 4 + [0] * 2, [1] * 6])  # [2, 6]
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [2, 12]
    logp, ent = common.token_logprobs(model, ids, mask, 6, with_entropy=True)  # [2, 6]
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(logp[:1, :n], ref, atol=1e-5, rtol=0)
    long_alone = common.token_logprobs(model, torch.tensor([long_prompt + long_comp]),
                                       torch.ones(1, 12, dtype=torch.long), 6)[0]
    torch.testing.assert_close(logp[1:], long_alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.7])
def test_token_logprobs_uses_tempered_distribution(tau):
    """token_logprobs at temperature τ is log_softmax(logits / τ) at the completion tokens, and its
    entropy is that of the same tempered distribution, both computed here by hand."""
    model = random_llama()
    ids = torch.tensor([[PAD, 3, 4, 5, 6, 7, EOS], [2, 3, 9, 9, 8, PAD, PAD]])  # [2, 7]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])  # [2, 7]
    T = 3  # completions: [6, 7, EOS] and [8, PAD, PAD]
    logp, ent = common.token_logprobs(model, ids, mask, T, temperature=tau, with_entropy=True)

    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [2, 7]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [2, 7, V]
    expected_ent = torch.zeros(2, T)
    expected = torch.zeros(2, T)
    for b in range(2):
        for t in range(T):
            col = ids.shape[1] - T + t  # column of the target token
            if mask[b, col] == 0:
                continue  # padding target: 0
            lp = torch.log_softmax(logits[b, col - 1] / tau, dim=-1)  # predicted from the column before
            expected[b, t] = lp[ids[b, col]]
            expected_ent[b, t] = -(lp.exp() * lp).sum()
    torch.testing.assert_close(logp.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, expected_ent, atol=1e-5, rtol=0)


def test_each_token_is_an_action_taken_in_the_state_prompt_plus_prefix():
    """Notes 000 "GRPO": the state s_t is the prompt x and the tokens y_<t generated so far, the
    action a_t the next token y_t. So log π(a_t|s_t) must be what the model, run on s_t alone (no
    padding, nothing after it), gives the token y_t at its last position; and the completion's
    log-probability log π(y|x) is the sum of the actions' log-probs, Σ_t log π(y_t|x, y_<t)."""
    model = random_llama()
    prompt, comp = [5, 6, 7], [8, 9, 10, EOS]
    ids = torch.tensor([[PAD, PAD] + prompt + comp])  # [1, 9]: padding that the states must not see
    mask = torch.tensor([[0, 0] + [1] * 7])  # [1, 9]
    logp, _ = common.token_logprobs(model, ids, mask, len(comp))  # [1, 4]
    total = 0.0
    with torch.no_grad():
        for t, y_t in enumerate(comp):
            state = torch.tensor([prompt + comp[:t]])  # s_t = (x, y_<t)   [1, 3 + t]
            lp = torch.log_softmax(model(input_ids=state).logits[0, -1].float(), -1)  # π(·|s_t)   [V]
            assert logp[0, t].item() == pytest.approx(lp[y_t].item(), abs=1e-5)  # log π(a_t | s_t)
            total += lp[y_t].item()
        # log π(y|x) by the chain rule: π(y|x) = Π_t π(y_t | x, y_<t)
        whole = torch.log_softmax(model(input_ids=torch.tensor([prompt + comp])).logits[0].float(), -1)  # [7, V]
        chain = sum(whole[len(prompt) - 1 + t, y_t].item() for t, y_t in enumerate(comp))
    assert logp.sum().item() == pytest.approx(total, abs=1e-5)
    assert chain == pytest.approx(total, abs=1e-5)


#####################################################################################################
#####  masks, padding, masked statistics
#####################################################################################################


def test_completion_mask_covers_first_eos_and_nothing_after():
    ids = torch.tensor([
        [3, 4, EOS, PAD, PAD],  # EOS at 2: keep 0..2
        [3, 4, 5, 6, 7],  # no EOS (cut at the limit): all ones
        [EOS, PAD, PAD, PAD, PAD],  # EOS at position 0: only the EOS itself
        [3, EOS, 4, EOS, 5],  # two EOS: only up to the first
    ])
    assert common.completion_mask(ids, EOS).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ]
    # pad == eos (many real tokenizers): the padding after the first EOS must not count, and
    # the mask must not stop before the first EOS either
    same = torch.tensor([[3, 4, 9, 9, 9], [3, 9, 9, 9, 9], [9, 9, 9, 9, 9], [3, 4, 5, 6, 7]])
    assert common.completion_mask(same, 9).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


def test_left_pad():
    ids, mask = common.left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_concat_prompt_completion():
    p_ids, p_mask = common.left_pad([[5, 6], [7]], 0)
    c_ids, c_mask = torch.tensor([[8, EOS], [EOS, 0]]), torch.tensor([[1, 1], [1, 0]])
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
    assert ids.tolist() == [[5, 6, 8, EOS], [0, 7, EOS, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 6.0], [4.0, float("nan"), float("inf")]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # all: (1 + 2 + 4) / 3 = 7/3; the NaN and inf sit in masked positions and must not leak
    assert common.masked_mean(x, m).item() == pytest.approx(7 / 3)
    # per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    assert common.masked_mean(x, m, dim=1).tolist() == [1.5, 4.0]
    # an empty mask gives 0, not NaN (0 / 0): per row and overall
    empty = torch.zeros_like(m)
    assert common.masked_mean(x, empty).item() == 0.0
    assert common.masked_mean(x, torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1).tolist() == [1.0, 0.0]
    # gradients do not leak either: d/dx of the mean is 1/3 on the three kept entries, 0 elsewhere
    xg = x.clone().requires_grad_(True)
    common.masked_mean(xg, m).backward()
    assert torch.equal(xg.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_masked_whiten_by_hand():
    x = torch.tensor([2.0, 4.0, 6.0, float("nan"), float("-inf")])
    m = torch.tensor([1, 1, 1, 0, 0])
    # mean = 4; Bessel variance = ((−2)² + 0² + 2²) / (3 − 1) = 4; std = 2
    # -> (x − 4) / 2 = [−1, 0, 1] on the kept positions, 0 on the masked ones
    out = common.masked_whiten(x, m, eps=0.0)
    assert out.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0]
    # shift_mean=False scales only: (x − 4) / 2 + 4 = [3, 4, 5]
    assert common.masked_whiten(x, m, shift_mean=False, eps=0.0).tolist() == [3.0, 4.0, 5.0, 0.0, 0.0]
    # with the default eps the values are (x − 4) / sqrt(4 + 1e-8)
    assert common.masked_whiten(x, m)[:3].tolist() == pytest.approx([-1, 0, 1], abs=1e-7)
    # an empty mask gives all zeros, no NaN
    out = common.masked_whiten(x, torch.zeros_like(m))
    assert out.tolist() == [0.0] * 5


#####################################################################################################
#####  data
#####################################################################################################


def test_read_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n   \n{"prompt": "2+2=", "answer": 4}\n')
    rows = tasks.read_jsonl(f, required=("prompt", "answer"))
    assert rows == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}]


@pytest.mark.parametrize("bad_line, reason", [
    ('{"prompt": "x", "answer": ', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x"}', "missing key(s) 'answer'"),
])
def test_read_jsonl_names_file_and_line(tmp_path, bad_line, reason):
    f = tmp_path / "bad.jsonl"
    # line 1 good, line 2 blank, line 3 bad: the error must say line 3 (the file's line, blanks counted)
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n' + bad_line + '\n{"prompt": "y", "answer": 1}\n')
    with pytest.raises(common.UsageError) as e:
        tasks.read_jsonl(f, required=("prompt", "answer"))
    assert str(e.value).startswith(f"{f}:3: ")
    assert reason in str(e.value)
    assert "\n" not in str(e.value)


def test_read_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(common.UsageError, match="--data .*no such file"):
        tasks.read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(common.UsageError, match="no rows"):
        tasks.read_jsonl(tmp_path / "empty.jsonl")


def test_load_task_with_data_file(tmp_path):
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(10)))
    train, heldout = tasks.load_task(str(f))
    # 10 rows: at most a fifth (2) held out, the last ones; answers become strings
    assert [r["prompt"] for r in heldout] == ["q8", "q9"] and len(train) == 8
    assert train[3]["answer"] == "3"
    f.write_text('{"prompt": "q", "answer": "seven"}\n{"prompt": "r", "answer": 1}\n')
    with pytest.raises(common.UsageError, match="'answer' 'seven' is not a number"):
        tasks.load_task(str(f))



def test_load_task_reads_gsm8k_as_published(tmp_path):
    # GSM8K's rows are {"question", "answer": "<worked solution>\n#### <number>"}: the prompt is the
    # question, and the answer is the number after the last ####, commas dropped (1,072 -> 1072)
    rows = [{"question": f"Q{i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(9)] + [{"question": "Big?", "answer": "It costs 1,000 + 72.\n#### 1,072"}]
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, heldout = tasks.load_task(str(f))
    assert train[3] == {"prompt": "Q3?", "answer": "6"}
    assert heldout[-1] == {"prompt": "Big?", "answer": "1072"}
    assert tasks.score("so the answer is 1,072.", heldout[-1]["answer"], True, strict=False) == 1.0
    # a solution without its #### line, and a row with neither prompt nor question
    f.write_text(json.dumps({"question": "Q?", "answer": "She has twelve apples in the end."}) + "\n")
    with pytest.raises(common.UsageError, match=r"gsm8k.jsonl:1: 'answer' .* is not a number \(nor a GSM8K answer ending in '#### NUMBER'\)"):
        tasks.load_task(str(f))
    f.write_text(json.dumps({"text": "Q?", "answer": 3}) + "\n")
    with pytest.raises(common.UsageError, match=r"gsm8k.jsonl:1: missing key 'prompt' \(or GSM8K's 'question'\)"):
        tasks.load_task(str(f))


def test_arithmetic_task_split():
    train, heldout = tasks.arithmetic_task()
    assert len(heldout) == tasks.ARITH_HELDOUT and len(train) + len(heldout) == 100 * 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for r in heldout[:50]:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert r["answer"] == str(a + b)
    assert tasks.arithmetic_task()[1] == heldout  # the split is fixed


#####################################################################################################
#####  the reward
#####################################################################################################


@pytest.mark.parametrize("completion, finished, expected", [
    ("85", True, 1.0),
    ("85", False, 0.0),  # cut off at the token limit: not an answer
    (" 85", True, 0.0),  # leading space
    ("85 ", True, 0.0),  # trailing space
    ("85.", True, 0.0),  # trailing junk
    ("85\n", True, 0.0),
    ("8 5", True, 0.0),
    ("85.0", True, 0.0),  # digits only
    ("+85", True, 0.0),
    ("86", True, 0.0),
    ("8", True, 0.0),
    ("850", True, 0.0),
    ("", True, 0.0),
    ("answer: 85", True, 0.0),
    ("٨٥", True, 0.0),  # Arabic-Indic digits: Python's \d and float() accept them, 'digits only' must not
    ("８５", True, 0.0),  # full-width digits, likewise
])
def test_score_strict(completion, finished, expected):
    assert tasks.score(completion, "85", finished, strict=True) == expected


def test_score_strict_negative_answer():
    assert tasks.score("-3", "-3", True) == 1.0
    assert tasks.score("3", "-3", True) == 0.0


@pytest.mark.parametrize("completion, answer", [
    ("085", "85"),  # a leading zero: `85` has one spelling
    ("00", "0"),
    ("-0", "0"),  # minus zero
    ("-03", "-3"),
])
def test_score_strict_refuses_non_canonical_numbers(completion, answer):
    assert tasks.score(completion, answer, True, strict=True) == 0.0
    assert tasks.score(completion, answer, True, strict=False) == 1.0  # the lenient mode reads them
    # the canonical spellings pass, and the answer itself may be written any way parse_number reads
    assert tasks.score("0", "0", True) == 1.0 and tasks.score("85", "085", True) == 1.0


def test_score_strict_from_ids_refuses_special_tokens_inside_the_answer():
    # The character tokenizer: <pad> = 0, <eos> = 1, <unk> = 2, one digit per token. Decoded with
    # skip_special_tokens=True, `8 <pad> 5 <eos>` and `8 <unk> 5 <eos>` read "85", but what was
    # generated is not the number: strict, from the ids, scores them 0, as digit_step_rewards does.
    tok = build_char_tokenizer()
    d8, d5 = tok.convert_tokens_to_ids(["8", "5"])
    pad, eos, unk = tok.pad_token_id, tok.eos_token_id, tok.unk_token_id
    assert tok.decode([d8, pad, d5, eos], skip_special_tokens=True) == "85"  # the trap
    assert tasks.score([d8, d5, eos], "85", True, tokenizer=tok) == 1.0
    assert tasks.score([d8, d5, eos, pad, pad], "85", True, tokenizer=tok) == 1.0  # the padding after EOS
    assert tasks.score((d8, d5, eos), "85", True, tokenizer=tok) == 1.0  # a tuple too
    for ids in ([d8, pad, d5, eos], [d8, unk, d5, eos], [pad, d8, d5, eos], [d8, d5, unk, eos]):
        assert tasks.score(ids, "85", True, strict=True, tokenizer=tok) == 0.0
        assert tasks.score(ids, "85", True, strict=False, tokenizer=tok) == 1.0  # lenient: as before
    zero_85 = tok.convert_tokens_to_ids(["0", "8", "5"]) + [eos]
    assert tasks.score(zero_85, "85", True, tokenizer=tok) == 0.0  # a leading zero, from ids too
    assert tasks.score([d8, d5, eos], "85", False, tokenizer=tok) == 0.0  # not finished
    assert tasks.score([d8, d5, 10_000, eos], "85", True, tokenizer=tok) == 0.0  # outside the vocabulary
    assert tasks.score([d8, d5], "85", True, tokenizer=None) == 0.0  # ids without a tokenizer: no answer
    # and it agrees with the process reward: the full reward only for the exact target tokens
    c_ids = torch.tensor([[d8, d5, eos, pad], [d8, pad, d5, eos]])
    steps = tasks.digit_step_rewards(c_ids, common.completion_mask(c_ids, eos), [[d8, d5, eos]] * 2)
    assert steps.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_greedy_accuracy_and_pass_at_k_score_the_generated_ids():
    # A model that always answers `8 <pad> 5 <eos>` (its logits are fixed by a bias on the output
    # layer at each position), whose text with the special tokens skipped reads "85": strict, it
    # is wrong; lenient, it is right. greedy_accuracy and pass_at_k must score the ids.
    tok = build_char_tokenizer()
    d8, d5 = tok.convert_tokens_to_ids(["8", "5"])
    script = [d8, tok.pad_token_id, d5, tok.eos_token_id]

    class Scripted(torch.nn.Module):
        """Emits `script` token by token, whatever the prompt (a stand-in for a causal LM)."""
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.training = False

        def forward(self, input_ids, attention_mask, position_ids=None, use_cache=True, cache=None,
                    logits_to_keep=None):
            step = 0 if cache is None else cache + 1
            logits = torch.full((input_ids.shape[0], 1, len(tok)), -1e9)
            logits[:, :, script[min(step, len(script) - 1)]] = 0.0
            return type("Out", (), {"logits": logits + self.w, "cache": step})()

    model = Scripted()
    rows = [{"prompt": "37+48=", "answer": "85"}, {"prompt": "40+45=", "answer": "85"}]
    assert tasks.greedy_accuracy(model, tok, rows, max_new_tokens=4, strict=True) == 0.0
    assert tasks.greedy_accuracy(model, tok, rows, max_new_tokens=4, strict=False) == 1.0
    p = tasks.pass_at_k(model, tok, rows, k=2, max_new_tokens=4, strict=True)
    assert p == {"k": 2, "pass_at_1": 0.0, "pass_at_k": 0.0}
    assert tasks.pass_at_k(model, tok, rows, k=2, max_new_tokens=4, strict=False)["pass_at_k"] == 1.0


@pytest.mark.parametrize("garbage", [None, 85, 8.5, b"85", ["85"], "\x00\uffff\ud800", "é" * 1000,
                                     "9" * 5000, "-", "--85", "..", ",", "1,2,3,,", "nan", "inf",
                                     "∞", "½", "１２３"])
@pytest.mark.parametrize("strict", [True, False])
def test_score_never_crashes(garbage, strict):
    for answer in ["85", "-3.5", "1,234", "not a number", ""]:
        for finished in (True, False):
            assert tasks.score(garbage, answer, finished, strict) in (0.0, 1.0)
    assert tasks.score(garbage, "85", True, strict) == 0.0


@pytest.mark.parametrize("completion, answer, expected", [
    ("The answer is 1,234.", "1234", 1.0),  # thousands separator, sentence end
    ("so 12 + 3 = 15, then -3.5", "-3.5", 1.0),  # the last number, with sign and decimals
    ("so 12 + 3 = 15, then -3.5", "15", 0.0),  # not an earlier one
    ("#### 72", "72", 1.0),
    ("72", "72.0", 1.0),  # compared as numbers
    ("no number here", "0", 0.0),
    ("", "0", 0.0),
])
def test_score_not_strict_takes_the_last_number(completion, answer, expected):
    assert tasks.score(completion, answer, True, strict=False) == expected
    assert tasks.score(completion, answer, False, strict=False) == 0.0  # unfinished: 0 as well


def test_parse_number():
    assert tasks.parse_number("1,234") == 1234.0
    assert tasks.parse_number(" -3.5 ") == -3.5
    assert tasks.parse_number("abc") is None
    assert tasks.parse_number("1.") is None


def test_digit_step_rewards_by_hand():
    # target "85<eos>" as ids [8, 5, EOS]; step j ends at completion token j, reward 1 if it is the
    # j-th target token. The docstring's examples plus a too-long completion:
    #   85<eos>   -> [1, 1, 1, 0]
    #   75<eos>   -> [0, 1, 1, 0]
    #   8<eos>    -> [1, 0, 0, 0]   (EOS sits where 5 should; the pads are outside the mask)
    #   855<eos>  -> [1, 1, 0, 0]   (the 2nd 5 sits where EOS should; the 4th token is past the target)
    c_ids = torch.tensor([[8, 5, EOS, PAD], [7, 5, EOS, PAD], [8, EOS, PAD, PAD], [8, 5, 5, EOS]])
    c_mask = common.completion_mask(c_ids, EOS)
    r = tasks.digit_step_rewards(c_ids, c_mask, [[8, 5, EOS]] * 4)
    assert r.tolist() == [[1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    # a target longer than T is cut, and padding never matches even when pad == a target token
    r = tasks.digit_step_rewards(torch.tensor([[1, 2]]), torch.tensor([[1, 0]]), [[1, 2, 3]])
    assert r.tolist() == [[1, 0]]


#####################################################################################################
#####  generation
#####################################################################################################


def test_generate_greedy_is_deterministic_and_stops_at_eos():
    model = random_llama(seed=3)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    p_ids, p_mask = common.left_pad(prompts, PAD)
    free, _ = common.generate(model, p_ids, p_mask, 8, eos_ids=31, pad_id=PAD, greedy=True)  # [3, 8]
    again, _ = common.generate(model, p_ids, p_mask, 8, eos_ids=31, pad_id=PAD, greedy=True)
    assert torch.equal(free, again)  # greedy: no randomness

    # Make row 0 stop: take the first token it emits at step k ≥ 1 that it has not emitted before
    # as the EOS id. Greedy decoding is the same up to there, so row 0 is [t_0 .. t_k] then padding
    # (and rows 1, 2 stop wherever they meet that token).
    row0 = free[0].tolist()
    k = next(k for k in range(1, 8) if row0[k] not in row0[:k])
    eos = row0[k]
    c_ids, c_mask = common.generate(model, p_ids, p_mask, 8, eos_ids=eos, pad_id=PAD, greedy=True)
    assert c_ids[0, :k + 1].tolist() == row0[:k + 1]
    assert c_mask[0].tolist() == [1] * (k + 1) + [0] * (c_ids.shape[1] - k - 1)
    for row, cm, ref in zip(c_ids, c_mask, free):
        hits = (ref == eos).nonzero()
        stop = int(hits[0]) if len(hits) else None
        if stop is None:
            assert row.tolist() == ref.tolist()[:len(row)] and cm.all()
        else:
            assert row[:stop + 1].tolist() == ref[:stop + 1].tolist()
            assert (row[stop + 1:] == PAD).all()  # pad after the first EOS
            assert cm.tolist() == [1] * (stop + 1) + [0] * (len(row) - stop - 1)
    assert c_ids.shape[1] <= 8
    # when every row has stopped, generation stops: one EOS everywhere at step 0
    first = int(free[0, 0])
    p_same, m_same = common.left_pad([prompts[0]] * 2, PAD)
    c, m = common.generate(model, p_same, m_same, 8, eos_ids=first, pad_id=PAD, greedy=True)
    assert c.tolist() == [[first], [first]] and m.tolist() == [[1], [1]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_kv_cache_matches_full_forward(arch):
    """Greedy decoding with the KV cache picks, at every step, the argmax of a full forward pass
    over [prompt | completion so far] without a cache (teacher-forced)."""
    model = random_model(arch, seed=1)
    p_ids, p_mask = common.left_pad([[5, 6, 7], [8], [9, 10, 11, 12, 13], [2, 3]], PAD)
    c_ids, c_mask = common.generate(model, p_ids, p_mask, 10, eos_ids=EOS, pad_id=PAD, greedy=True)
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    P, T = p_ids.shape[1], c_ids.shape[1]
    argmax = logits[:, P - 1:P + T - 1].argmax(-1)  # [B, T] the full pass's choice for each token
    assert torch.equal(argmax[c_mask.bool()], c_ids[c_mask.bool()])
    assert T == 10  # a random model rarely says EOS: the check covered 10 steps per row


def test_generate_sampling_is_seeded_and_tempered():
    model = random_llama(seed=2)
    p_ids, p_mask = common.left_pad([[5, 6, 7]] * 64, PAD)
    harness.seed_everything(0)
    a, _ = common.generate(model, p_ids, p_mask, 3, eos_ids=EOS, pad_id=PAD, temperature=1.0)
    harness.seed_everything(0)
    b, _ = common.generate(model, p_ids, p_mask, 3, eos_ids=EOS, pad_id=PAD, temperature=1.0)
    assert torch.equal(a, b)
    # a very low temperature samples the greedy tokens
    g, _ = common.generate(model, p_ids[:1], p_mask[:1], 3, eos_ids=EOS, pad_id=PAD, greedy=True)
    cold, _ = common.generate(model, p_ids, p_mask, 3, eos_ids=EOS, pad_id=PAD, temperature=1e-4)
    assert (cold == g).all()
    assert len({tuple(r) for r in a.tolist()}) > 1  # temperature 1 on a random model: diverse


#####################################################################################################
#####  command line and model loading
#####################################################################################################


def test_parse_args_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        harness.parse_args(grpo.Args, ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    docs = harness._field_docs(grpo.Args)
    for f in ("epsilon", "group_size", "loss_agg", "beta", "scale_rewards"):
        assert f in docs
        assert docs[f][:40] in out, f"--{f}: docstring missing from --help"
    assert "--group-size" in out and "--epsilon-high" in out and "--no-scale-rewards" in out


def test_every_args_field_has_a_docstring():
    import dataclasses

    docs = harness._field_docs(grpo.Args)
    assert [f.name for f in dataclasses.fields(grpo.Args) if not docs.get(f.name)] == []


def test_parse_args_types_bools_optionals_and_choices(capsys):
    a = harness.parse_args(grpo.Args, [])
    assert a == grpo.Args()  # no flags: the defaults
    a = harness.parse_args(grpo.Args, ["--group-size", "4", "--epsilon", "0.1", "--no-scale-rewards",
                                      "--overwrite", "--loss-agg", "constant", "--epsilon-high",
                                      "0.28", "--micro-batch", "none", "--data", "x.jsonl"])
    assert (a.group_size, a.epsilon, a.scale_rewards, a.overwrite, a.loss_agg, a.epsilon_high,
            a.micro_batch, a.data) == (4, 0.1, False, True, "constant", 0.28, None, "x.jsonl")
    assert harness.parse_args(grpo.Args, ["--scale-rewards"]).scale_rewards is True
    assert harness.parse_args(grpo.Args, ["--group_size", "3"]).group_size == 3  # underscore alias
    for bad in (["--loss-agg", "bogus"], ["--reward", "dense"], ["--group-size", "two"],
                ["--no-such-flag"]):
        with pytest.raises(SystemExit) as e:
            harness.parse_args(grpo.Args, bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "invalid choice: 'dense'" in err


def test_main_turns_usage_error_into_one_line(capsys):
    def train(args):
        raise common.UsageError("--group-size must be ≥ 2 (got 1)")
    with pytest.raises(SystemExit) as e:
        harness.main(grpo.Args, train, argv=[])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --group-size must be ≥ 2 (got 1)\n"


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "~/no-such-model-xyz"])
def test_load_model_missing_path_names_the_flag(path):
    with pytest.raises(common.UsageError, match=r"^--model "):
        common.load_model(path, torch.device("cpu"))


def test_load_model_folder_without_a_model_names_the_flag(tmp_path):
    with pytest.raises(common.UsageError, match=r"^--model "):
        common.load_model(str(tmp_path), torch.device("cpu"))


def test_prepare_run_dir_refuses_to_overwrite(tmp_path):
    out = harness.prepare_run_dir(tmp_path / "run", overwrite=False)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(common.UsageError, match="--out-dir .*--overwrite"):
        harness.prepare_run_dir(out, overwrite=False)
    harness.prepare_run_dir(out, overwrite=True)
    assert not (out / "metrics.jsonl").exists()


def test_seed_everything_repeats_all_three_generators():
    import random

    import numpy as np

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    harness.seed_everything(7)
    a = draw()
    harness.seed_everything(7)
    assert draw() == a


def test_pick_device():
    assert harness.pick_device("cpu") == torch.device("cpu")
    assert harness.pick_device(None).type in ("cpu", "cuda")
    with pytest.raises(common.UsageError, match="--device"):
        harness.pick_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="--device cuda"):
            harness.pick_device("cuda")


def test_build_char_tokenizer():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1) and tok.padding_side == "left"
    ids = tok.encode("37+48=", add_special_tokens=False)
    assert len(ids) == 6  # one character, one token
    assert tok.decode(ids) == "37+48="
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "37+48="


def test_logger_writes_jsonl_and_summary(tmp_path, capsys):
    log = harness.RunLogger(tmp_path)
    log.log(1, {"reward/mean": 0.5, "loss/policy": torch.tensor(2.0)}, keys=["reward/mean"])
    log.log(2, {"reward/mean": 0.25}, keys=[])  # written, not printed
    log.summary({"start_accuracy": 0.1, "path": tmp_path})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss/policy"] == 2.0
    assert json.loads((tmp_path / "summary.json").read_text())["path"] == str(tmp_path)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "mean 0.5" in out[0] and out[0].startswith("step     1")



def test_a_prompt_with_no_tokens_is_one_clear_error():
    # The character tokenizer turns "" into no tokens; generation and scoring would then run a
    # zero-length prompt into attention. Both refuse it with a UsageError that says why.
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    with pytest.raises(common.UsageError, match="tokenizes to no tokens"):
        common.generate_text(model, tok, ["1+1=", ""], 2)
    with pytest.raises(common.UsageError, match="tokenizes to no tokens"):
        common.encode_prompt_completion(tok, ["", "2+2="], ["1", "4"])
    ids, mask, c_mask, T = common.encode_prompt_completion(tok, ["1+1=", "2+2="], ["2", "4"])  # fine
    assert T == 2 and c_mask.tolist() == [[1, 1], [1, 1]]
