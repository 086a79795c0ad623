"""A small model with the conventions of Qwen2.5-Instruct, for tests (tests/test_chat_reward.py,
bench/test_to_trl.py): random weights, Qwen2's architecture and tokenizer class, and the special
tokens, BOS behaviour, chat template and stop tokens of its published tokenizer_config.json and
generation_config.json: EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS (`add_bos_token` false,
`bos_token` null), generation_config.eos_token_id [`<|im_end|>`, `<|endoftext|>`], and turns that end
"<|im_end|>\\n". The byte-level BPE has no merges (one token per byte), so it needs no files.
"""

from __future__ import annotations

# Qwen2.5-Instruct's chat template (tokenizer_config.json), its branch without tools: the
# conversations here have none, and the other branch renders the same text for them.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")


def qwen_style_tokenizer():
    """Qwen2.5's tokenizer class (byte-level BPE) with no merges: one token per byte, then its special
    tokens <|endoftext|> (pad), <|im_start|> and <|im_end|> (EOS). No BOS, no unk, as Qwen2.5's."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # the 256 bytes
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN25_TEMPLATE
    return tok


def qwen_config(tok, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id, **kw)


def save_qwen_style(path):
    """A random Qwen2 causal LM with `qwen_style_tokenizer`, and Qwen2.5-Instruct's generation config
    (two stop tokens, pad <|endoftext|>), saved into `path` as a model folder.  -> path"""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tok = qwen_style_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(qwen_config(tok))
    torch.random.set_rng_state(state)
    lm.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path
