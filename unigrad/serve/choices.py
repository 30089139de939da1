"""A choice from its sampled ids: its text, cut at the first stop string; its tool calls; its finish reason; the
text of each of its tokens (for logprobs and streaming).

Text is decoded with the special tokens left out (the end-of-turn token writes no text). A stop string cuts the text
where it starts; the ids (and log-probs) are cut after the token that completed it, as vLLM does, so the ids still
hold every token the choice's text came from.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from unigrad.serve.batcher import Sample
from unigrad.tools.calls import parse_tool_calls

_TOOL_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Choice:
    token_ids: list[int]
    logprobs: list[float]
    text: str  # what the choice says (content), stop string cut off; tool-call blocks left in
    finish_reason: str  # "stop", "length" or "tool_calls"
    pieces: list[str]  # the text each token adds (they join to `text` for the ids kept)
    tool_calls: list[dict] | None = None  # OpenAI shape, arguments as JSON strings

    @property
    def content(self) -> str | None:
        """The message's content: the text less its tool-call blocks when it calls tools (None if nothing else)."""
        if not self.tool_calls:
            return self.text
        return _TOOL_BLOCK.sub("", self.text).strip() or None


def prefix_lengths(tokenizer, ids: list[int]) -> list[int]:
    """The length of the text of ids[:k] for k = 0 .. len(ids), never decreasing (a token that ends inside a
    multi-byte character adds its text with the token that completes it)."""
    lengths, longest = [0], 0
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")
        longest = max(longest, len(text))
        lengths.append(longest)
    return lengths


def cut_at_stop(text: str, lengths: list[int], stops: list[str]) -> tuple[str, int] | None:
    """(text before the first stop string, tokens kept) or None when no stop string occurs."""
    found = [(text.find(s), len(s)) for s in stops if s in text]
    if not found:
        return None
    start, size = min(found)
    tokens = next(k for k, length in enumerate(lengths) if length >= start + size)
    return text[:start], tokens


def openai_tool_calls(text: str) -> list[dict] | None:
    """The well-formed `<tool_call>` blocks of `text` as OpenAI tool calls; None when there is none."""
    calls = [c for c in parse_tool_calls(text, "hf") if c.error is None]
    if not calls:
        return None
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in calls]


def finish_choice(tokenizer, sample: Sample, stops: list[str], tools: bool) -> Choice:
    """The `Choice` of `sample`; `tools`: the request offered tools (its tool-call blocks are parsed)."""
    ids, logprobs = sample.token_ids, sample.logprobs
    lengths = prefix_lengths(tokenizer, ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    finish = "length" if sample.truncated else "stop"
    cut = cut_at_stop(text, lengths, stops)
    if cut is not None:
        text, kept = cut
        ids, logprobs, lengths, finish = ids[:kept], logprobs[:kept], lengths[:kept + 1], "stop"
    lengths = [min(length, len(text)) for length in lengths]
    pieces = [text[lengths[k]:lengths[k + 1]] for k in range(len(ids))]
    calls = openai_tool_calls(text) if tools else None
    return Choice(ids, logprobs, text, "tool_calls" if calls else finish, pieces, calls)
