"""A tool-calling agent for countdown: the model may call a `calculator` tool before it answers.

Train it on the embedded chat model (its chat template renders tools in the `<tool_call>` style):

    unigrad train model.name=unigrad-chat 'tasks=["agent:examples/agents/countdown_tools.py:solve@countdown"]'

Each episode: the countdown prompt goes to the model with the calculator offered; while the model answers with tool
calls, each expression is evaluated here (a small arithmetic evaluator over Python's `ast`, never `eval`) and sent
back as a tool message; a plain answer (or MAX_CALLS model calls) ends the episode, and the reward is countdown's own
verifier on the final text. Only the `openai` package is used: the same function runs against any OpenAI-compatible
server.
"""

from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction

MAX_CALLS = 4  # model calls per episode (countdown with the calculator gives 4 turns too)
MAX_EXPRESSION_CHARS = 200

CALCULATOR = {"type": "function", "function": {
    "name": "calculator",
    "description": "evaluates + - * / ( ) on numbers exactly",
    "parameters": {"type": "object", "required": ["expression"], "properties": {"expression": {
        "type": "string", "description": "integers or decimals with + - * / and parentheses, e.g. 3*7+9"}}},
}}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def arithmetic(expression: str) -> Fraction:
    """The exact value of `expression` (numbers, + - * /, unary signs, parentheses); a ValueError for anything
    else (names, calls, attributes, powers, strings, ...), an over-long expression or a division by zero."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expected an expression of at most {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {type(node).__name__}")


def show(value: Fraction) -> str:
    """30 -> "30", 7/2 -> "3.5", 1/3 -> "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    return format(float(value), "g") if rest == 1 else f"{value.numerator}/{value.denominator}"


def run_calculator(arguments: str) -> str:
    """A tool call's result: the value of its "expression", or "error: ..." (the model reads it and goes on)."""
    try:
        expression = json.loads(arguments)["expression"]
        return show(arithmetic(expression))
    except (ValueError, KeyError, TypeError) as err:
        return f"error: {err}"


def solve(client, example):
    """One countdown episode with the calculator; returns (reward, info)."""
    messages = [{"role": "user", "content": example["prompt"]}]
    tool_calls = 0
    for _ in range(MAX_CALLS):
        reply = client.chat.completions.create(model=example["model"], messages=messages, tools=[CALCULATOR])
        message = reply.choices[0].message
        if not message.tool_calls:
            text = message.content or ""
            return example["score"](text), {"tool_calls": tool_calls, "answer": text}
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            tool_calls += 1
            result = run_calculator(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return 0.0, {"tool_calls": tool_calls, "answer": None}  # out of calls without an answer
