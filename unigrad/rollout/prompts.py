"""A task's prompt as the token ids a model continues: the user message through the tokenizer's chat template."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The user message through the tokenizer's chat template, ending with the assistant header."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers may return a BatchEncoding
        out = out["input_ids"]
    return list(out)
