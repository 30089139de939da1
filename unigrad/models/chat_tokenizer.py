"""The byte-level BPE tokenizer and the chat template (with tools) of ``unigrad-chat``.

Tokenizer: byte-level BPE trained here with the ``tokenizers`` library on the rendered training chats
(``train_chat_tokenizer``). Text is first split by Qwen2's pre-tokenizer pattern (letter runs with one leading
space or punctuation mark, each digit alone, punctuation runs with their trailing newlines, whitespace), then
mapped to bytes; merges never cross those pieces, so digits stay one token each while words and JSON punctuation
merge into multi-byte tokens. Training is deterministic: the same texts and vocabulary size give the same
``tokenizer.json``. Ids 0..6 are the added tokens, in this order:

    <|endoftext|>  pad                       special (skipped by ``decode(skip_special_tokens=True)``)
    <|im_start|>   opens a turn              special
    <|im_end|>     ends a turn: the eos      special
    <tool_call> </tool_call> <tool_response> </tool_response>
                   not special, as in Qwen2.5: a decoded turn keeps them, so the "hf" tool style reads its calls

Chat template (``CHAT_TEMPLATE``; Qwen2.5 / Hermes-like, shortened for a small model)::

    <|im_start|>system\\n[SYSTEM\\n\\n]# Tools\\n<tools>\\n{tool json}\\n...</tools>\\nCall a function as
    <tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n
                                        (only with tools=; else a system message alone, if any)
    <|im_start|>user\\nPROMPT<|im_end|>\\n
    <|im_start|>assistant\\n[CONTENT\\n]<tool_call>\\n{"name": "calculator", "arguments": {...}}\\n</tool_call>
    <|im_end|>\\n                      (an assistant turn with calls: one line here, no newline before <|im_end|>)
    <|im_start|>user\\n<tool_response>\\nRESULT\\n</tool_response>[\\n<tool_response>...]<|im_end|>\\n
    <|im_start|>assistant\\n          (add_generation_prompt)

Consecutive tool messages share one user turn. An assistant message's ``tool_calls`` take the OpenAI / HF shape
``{"type": "function", "function": {"name": ..., "arguments": dict or JSON string}}`` (or the inner object alone);
a JSON string is written as it is. There is no default system message. A conversation's rendering is a prefix of
its continuation's, and every turn boundary is a token boundary (added tokens and newlines split pieces).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
TOOL_TOKENS = (TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END)
ADDED_TOKENS = SPECIAL_TOKENS + TOOL_TOKENS  # ids 0..6
PAD_ID, IM_START_ID, IM_END_ID = 0, 1, 2

# Qwen2's pre-tokenizer pattern: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs (with one leading space and trailing newlines), newlines, other whitespace.
PRETOKENIZE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_TOOLS_BLOCK = (
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a function as <tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
)
_ASSISTANT_WITH_CALLS = (
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
)
_TOOL_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)
CHAT_TEMPLATE = (
    "{%- if tools %}" + _TOOLS_BLOCK +
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{%- endif %}"
    "{%- elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}" + _ASSISTANT_WITH_CALLS +
    "{%- elif message.role == 'tool' %}" + _TOOL_RESULT +
    "{%- else %}{{ raise_exception('unknown chat role: ' + message.role) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ADDED = re.compile("|".join(re.escape(t) for t in ADDED_TOKENS))


def render_chat(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """`messages` (and `tools`) through `CHAT_TEMPLATE` as text, without a tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], tools=tools or None, chat_template=CHAT_TEMPLATE,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def _byte_level_bpe():
    """An untrained byte-level BPE pipeline: Qwen2's split, then bytes; the byte-level decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    """The texts with the added tokens cut out (the BPE trainer never sees them as bytes)."""
    for text in texts:
        yield from filter(None, _ADDED.split(text))


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 1024
                         ) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes, the 7 added tokens, merges) trained on `texts`,
    wrapped as a transformers fast tokenizer with `CHAT_TEMPLATE` (eos ``<|im_end|>``, pad ``<|endoftext|>``)."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    if vocab_size < 256 + len(ADDED_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(ADDED_TOKENS)} (bytes and added tokens)")
    backend = _byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(ADDED_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_pieces(texts), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads on the left
    )
