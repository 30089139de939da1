"""A character-level tokenizer for the embedded tiny model.

One token per character: five special tokens, then every printable ASCII character (space to ``~``) and
``"\\n"``, then ``<unk>`` for anything else (a tab, a non-ASCII letter: it decodes to nothing). Built with
the ``tokenizers`` library (``WordLevel`` model behind a ``Split("", "isolated")`` pre-tokenizer and a
``Fuse`` decoder) and wrapped as a ``transformers`` fast tokenizer, so it saves with ``save_pretrained`` and
comes back unchanged from ``AutoTokenizer.from_pretrained`` (``tokenizer_config.json`` names the generic
tokenizers backend, not a model-specific class that would rebuild the pipeline).

Chat format (``CHAT_TEMPLATE``)::

    <bos>[system text "\\n"]<|user|>PROMPT<|assistant|>COMPLETION<eos>

Plain ``tok(text)`` adds no special tokens; prompts are meant to go through ``apply_chat_template``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, USER, ASSISTANT, UNK = "<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT)
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CHARS + (UNK,)
VOCAB_SIZE = len(VOCAB)  # 102

# A system message (optional, first) is written as plain text followed by a newline; any role other than
# system / user / assistant is an error.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the tiny model (deterministic: same vocabulary, same ids, every time)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character its own piece
    backend.decoder = decoders.Fuse()  # join pieces without inserting spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, UNK)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads on the left
    )


def encode_chars(text: str) -> list[int]:
    """Token ids of ``text`` without a tokenizer object (one id per character, ``<unk>`` for others)."""
    return [_CHAR_IDS.get(c, UNK_ID) for c in text]


def prompt_ids(prompt: str) -> list[int]:
    """``<bos><|user|>prompt<|assistant|>``: what the chat template gives with ``add_generation_prompt``."""
    return [BOS_ID, USER_ID, *encode_chars(prompt), ASSISTANT_ID]


def completion_ids(completion: str) -> list[int]:
    """``completion<eos>``: the assistant turn's tokens after ``<|assistant|>``."""
    return [*encode_chars(completion), EOS_ID]


_IDS = {t: i for i, t in enumerate(VOCAB)}
_CHAR_IDS = {c: _IDS[c] for c in CHARS}
PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID, UNK_ID = (_IDS[t] for t in (PAD, BOS, EOS, USER, ASSISTANT, UNK))
