"""`countdown`: reach a target from given numbers with + - * /, each number used at most once.

Prompt "use 3 7 9 to make 30", demonstration "3*7+9". Numbers are listed sorted so that one
problem has one prompt (and so one split). The completion's expression (the text after the last
"Answer:" if any, else the first line, cut at "=") is checked with `ast` against a whitelist of
integer literals and + - * / nodes -- the model's text is never passed to `eval` -- and evaluated
with exact fractions. Reward 1 iff the value equals the target, 0 otherwise.
Difficulty: 1 = three numbers from 1..20 of which two make the target with one operation
("use 6 9 14 to make 84" -> "6*14"); 2 = two or three numbers from 1..9, all used; 3 = three or
four from 1..12, all used. Measured on a ~1 M-parameter char model after a short SFT on the
5-task mixture (400 steps of 64): the default 17% held-out; two numbers without a distractor
80% (too easy for RL to matter); difficulty 2 about 7%.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from unigrad.tasks.base import Example
from unigrad.tasks.extract import answer_text, parse_expression
from unigrad.tasks.synthetic import SyntheticTask

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate(expression: str, numbers: list[int]) -> Fraction | None:
    """Exact value of `expression` if it only uses + - * / ( ) and numbers from `numbers` (each at
    most as often as given); None for anything else, including division by zero."""
    if len(expression) > 100:  # deep nesting can overflow the parser; no answer needs this much
        return None
    tree = parse_expression(expression.strip())
    if tree is None:
        return None
    used: list[int] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return ev(node.left) / ev(node.right)  # ZeroDivisionError is caught below
        raise ValueError(f"disallowed node {type(node).__name__}")

    try:
        value = ev(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return value if not Counter(used) - Counter(numbers) else None


def expression_of(completion: str) -> str:
    """The candidate expression: after the last "Answer:", else the first line; left of any "="."""
    tail = answer_text(completion)
    text = tail if tail is not None else completion.strip()
    lines = text.splitlines()
    return lines[0].split("=")[0].strip() if lines else ""


class CountdownTask(SyntheticTask):
    name = "countdown"
    description = "reach a target from given numbers with + - * /, each number used at most once"
    max_difficulty = 3

    def generate(self, rng: random.Random) -> Example:
        # (how many numbers are used, how many extra are shown, largest number) per difficulty
        used, extra, high = {1: ((2, 2), 1, 20), 2: ((2, 3), 0, 9), 3: ((3, 4), 0, 12)}[self.difficulty]
        while True:
            numbers = [rng.randint(1, high) for _ in range(rng.randint(*used))]
            distractors = [rng.randint(1, high) for _ in range(extra)]
            expr, value = str(numbers[0]), numbers[0]
            for b in numbers[1:]:
                op = rng.choice("+-*")
                if op == "*" and ("+" in expr or "-" in expr):
                    expr, value = f"({expr})*{b}", value * b
                else:
                    expr, value = f"{expr}{op}{b}", {"+": value + b, "-": value - b, "*": value * b}[op]
            if 1 <= value <= 200 and value not in numbers + distractors:  # positive, and not solvable by copying
                break
        shown = sorted(numbers + distractors)
        prompt = f"use {' '.join(map(str, shown))} to make {value}"
        return Example(prompt, str(value), expr, self.name, {"numbers": shown, "target": value})

    def score(self, completion: str, example: Example) -> float:
        value = evaluate(expression_of(completion), example.meta["numbers"])
        return float(value is not None and value == int(example.meta["target"]))
