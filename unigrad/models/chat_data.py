"""The pretraining chats of ``unigrad-chat``: the built-in tasks' train examples as conversations, and token ids with
a loss mask on the assistant turns.

A single-turn task's example is one exchange: the prompt as the user message, the demonstration as the assistant's
answer. A multi-turn task with tools (``countdown_calc``: countdown with the calculator) becomes a tool-use
transcript, the calculator's results computed by the real tool, in one of three shapes drawn per example:

- check (60%): call calculator(solution), read the target back, answer with the solution;
- retry (25%): call it on a wrong expression of two shown numbers first, read its value, then as in check;
- both (15%): one turn with two calls (the wrong expression and the solution), two results, the answer.

The arguments are written as an object or as a JSON string (the template renders both the same way), and the final
answer is the bare expression or "EXPR = TARGET" (the verifier reads the expression left of "=").
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

from unigrad.tasks.base import Example, is_multi_turn

Chat = tuple[list[dict[str, Any]], list[dict] | None]  # (messages, tool schemas or None)
# An assistant turn as the template writes it: its header, then what the model writes, through <|im_end|>.
_ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def task_chats(task, examples: Sequence[Example], seed: int) -> list[Chat]:
    """Each example of `task` as a chat: a calculator transcript for a tool-use task around countdown
    (``countdown_calc``), one exchange for a single-turn task; ValueError for other multi-turn tasks."""
    if is_multi_turn(task) and not (getattr(task, "tool_table", None) and "calculator" in task.tool_table
                                    and getattr(task.task, "name", None) == "countdown"):
        raise ValueError(f"unigrad-chat has no pretraining chats for the multi-turn task {task.name!r} (only "
                         "countdown_calc among them)")
    if not is_multi_turn(task):
        return [([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.demonstration}], None)
                for ex in examples if ex.demonstration is not None]
    rng = random.Random(f"unigrad-chat/{task.name}/{seed}")
    schemas = task.tool_schemas()
    return [(tool_transcript(task.tool_table, ex, rng), schemas) for ex in examples if ex.demonstration is not None]


def tool_transcript(tools: dict, example: Example, rng: random.Random) -> list[dict[str, Any]]:
    """A calculator transcript for a countdown example (see the module docstring for its shapes)."""
    solution = example.demonstration
    wrong = _wrong_expression(example, rng)
    shape = rng.random()
    messages: list[dict[str, Any]] = [{"role": "user", "content": example.prompt}]
    if shape < 0.6 or wrong is None:
        rounds = [[solution]]
    elif shape < 0.85:
        rounds = [[wrong], [solution]]
    else:
        rounds = [[wrong, solution]]
    for expressions in rounds:
        messages.append({"role": "assistant", "content": "",
                         "tool_calls": [_calculator_call(e, rng) for e in expressions]})
        for e in expressions:  # the calculator itself (run_tool_call would add a timeout thread per call)
            messages.append({"role": "tool", "name": "calculator", "content": str(tools["calculator"].function(e))})
    answer = solution if rng.random() < 0.8 else f"{solution} = {example.answer}"
    messages.append({"role": "assistant", "content": answer})
    return messages


def _calculator_call(expression: str, rng: random.Random) -> dict[str, Any]:
    arguments: dict | str = {"expression": expression}
    if rng.random() < 0.3:
        arguments = json.dumps(arguments)
    return {"type": "function", "function": {"name": "calculator", "arguments": arguments}}


def _wrong_expression(example: Example, rng: random.Random) -> str | None:
    """An expression of two of the shown numbers whose value is not the target (None if none is found)."""
    numbers = list(example.meta.get("numbers", []))
    target = int(example.meta.get("target", example.answer))
    for _ in range(20):
        if len(numbers) < 2:
            return None
        a, b = rng.sample(numbers, 2)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        if value != target:
            return f"{a}{op}{b}"
    return None


def chat_text_and_spans(chat: Chat) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered through the template, and the character spans of its assistant turns: each from the end of
    its assistant header to the end of its ``<|im_end|>`` (the tokens a model writes)."""
    from unigrad.models.chat_tokenizer import render_chat

    messages, tools = chat
    text = render_chat(messages, tools)
    spans = [m.span(1) for m in _ASSISTANT_TURN.finditer(text)]
    if len(spans) != sum(m["role"] == "assistant" for m in messages):
        raise ValueError("a chat's text holds an assistant header or end-of-turn token inside a message")
    return text, spans


def encode_with_masks(tokenizer, texts: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) of each (text, spans): a token is trained when it starts inside one of the spans."""
    enc = tokenizer([text for text, _ in texts], add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], texts, strict=True):
        rows.append((list(ids), [any(s <= start < e for s, e in spans) for start, _ in offsets]))
    return rows
