"""Small local models with the conventions of three real instruct families, for tests:

    family   like                   BOS                       EOS (tokenizer)  generation_config stops
    qwen2.5  Qwen2.5-Instruct       none                      <|im_end|>       [<|im_end|>, <|endoftext|>]
    llama3   Meta-Llama-3-Instruct  <|begin_of_text|>, added  <|end_of_text|>  [<|end_of_text|>, <|eot_id|>]
    gemma2   Gemma-2-it             <bos>, added              <eos>            [<eos>, <end_of_turn>]

Taken from the published files (tokenizer_config.json, tokenizer.json's post-processor,
generation_config.json, config.json), not guessed:
  - Qwen2.5-Instruct: bos_token null, eos <|im_end|>, pad <|endoftext|>; generation_config
    eos_token_id [151645, 151643] = [<|im_end|>, <|endoftext|>], pad 151643; the ChatML template
    with its default system message (QWEN25_TEMPLATE, verbatim).
  - Meta-Llama-3-8B-Instruct, its original tokenizer: bos <|begin_of_text|> (128000), added by the
    tokenizer.json post-processor (TemplateProcessing "<|begin_of_text|> $A"), eos <|end_of_text|>
    (128001), no pad; generation_config eos_token_id [128001, 128009] = [<|end_of_text|>, <|eot_id|>]:
    the instruct model ends its turns with <|eot_id|>, the second stop token. The template writes
    bos_token itself (LLAMA3_TEMPLATE, verbatim).
  - gemma-2-2b-it: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <start_of_turn>, <end_of_turn>; add_bos_token
    true; config and generation_config eos_token_id [1, 107] = [<eos>, <end_of_turn>], pad 0; the
    template starts with {{ bos_token }} (GEMMA_TEMPLATE, verbatim).

The vocabularies are small: the special tokens of the family and one token per printable character
(byte-level for Qwen, whose space is `Ġ`), so the ids differ from the real ones; what matters here
is which token plays which part. The
models are tiny random ones of the family's architecture (Qwen2, Llama, Gemma2), with
`max_position_embeddings` = `context` (256 by default), so that a long prompt is easy to write.
`answer_with="second_stop"` builds a model that answers every prompt with its second stop token at
once: every position's last hidden state is one constant vector (the token embeddings are all one
vector, and every attention and MLP block adds 0), and the LM head scores only that stop token.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# special: in id order, before (gemma) or after (qwen, llama) the characters, as in the real vocabularies
FAMILIES = {
    "qwen2.5": dict(arch="qwen2", special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], first=False,
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, adds_bos=False,
                    stops=["<|im_end|>", "<|endoftext|>"], template=QWEN25_TEMPLATE),
    "llama3": dict(arch="llama", special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                          "<|end_header_id|>", "<|eot_id|>"], first=False,
                   bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, unk=None, adds_bos=True,
                   stops=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE),
    "gemma2": dict(arch="gemma2", special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                           "<end_of_turn>"], first=True,
                   bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", adds_bos=True,
                   stops=["<eos>", "<end_of_turn>"], template=GEMMA_TEMPLATE),
}


def build_tokenizer(family: str):
    """The family's tokenizer: its special tokens, BOS rule and chat template, one token per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    chars = list(string.printable[:-5]) + ["\n"]  # digits, letters, punctuation, space, newline
    if f["arch"] == "qwen2":  # byte-level BPE, as Qwen's (transformers loads it as Qwen2Tokenizer,
        chars = [c for c in chars if c not in " \n"] + ["Ġ", "Ċ"]  # which maps space, newline so)
    vocab = {t: i for i, t in enumerate(f["special"] + chars if f["first"] else chars + f["special"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=f["unk"]))  # no merges: characters
    backend.decoder = decoders.Fuse()
    if f["arch"] == "qwen2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    if f["adds_bos"]:  # Llama-3's tokenizer.json post-processor; Gemma's add_bos_token does the same
        bos = f["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])])
    named = {f[k] for k in ("bos", "eos", "pad", "unk")}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=f["bos"], eos_token=f["eos"], pad_token=f["pad"],
        unk_token=f["unk"], additional_special_tokens=[t for t in f["special"] if t not in named])
    tok.chat_template = f["template"]
    return tok


def build(family: str, path: str | Path, answer_with: str | None = None, context: int = 256,
          seed: int = 0) -> Path:
    """Save a tiny random model of `family` with its tokenizer and generation_config in `path`.
    `answer_with="second_stop"`: the model answers every prompt with its second stop token."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GenerationConfig, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    f, path = FAMILIES[family], Path(path)
    tok = build_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in f["special"]}
    stops = [ids[t] for t in f["stops"]]
    bos, pad = (ids.get(f["bos"]), ids.get(f["pad"]))
    size = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=context,
                tie_word_embeddings=False, bos_token_id=bos, pad_token_id=pad,
                eos_token_id=stops if family == "gemma2" else stops[0])  # as in each config.json
    config, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                   "gemma2": (Gemma2Config, Gemma2ForCausalLM)}[f["arch"]]
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = cls(config(**size))
    torch.random.set_rng_state(rng)
    if answer_with == "second_stop":
        answer_with_token(model, stops[1])
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=stops, pad_token_id=pad)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def answer_with_token(model, token: int) -> None:
    """Make `model` put (almost) all its probability on `token` at every position: one embedding for
    every token, every block's output projections 0 (so the last hidden state is one constant vector
    h), and an LM head whose only non-zero row is 30 h / ‖h‖² (logit 30 for `token`, 0 for the rest)."""
    emb = model.get_input_embeddings().weight
    emb.copy_(emb[emb.norm(dim=-1).argmax()].expand_as(emb))  # a row of norm > 0 (the pad row is 0)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            p.zero_()
    h = model.model(input_ids=torch.zeros(1, 1, dtype=torch.long)).last_hidden_state[0, -1]  # [d]
    head = model.get_output_embeddings().weight
    head.zero_()
    head[token] = 30 * h / h.pow(2).sum()


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)
