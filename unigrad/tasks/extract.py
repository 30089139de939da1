"""Pulling the final answer out of a completion.

Completions from a policy under training are often truncated, rambling or garbage, so every
function here returns None instead of raising, and the verifiers turn None into reward 0.
Convention shared by the built-in tasks: the answer is what follows the last "Answer:"; if the
completion has no "Answer:", it is the last number in it (so a bare "64" is a valid answer).
"""

from __future__ import annotations

import ast
import re
import warnings
from fractions import Fraction

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
# At most 30 digits: longer runs are garbage, and int() refuses > 4300 digits anyway.
_NUMBER = re.compile(r"-?\d{1,30}(?:\.\d{1,30})?(?:/\d{1,30})?")


def answer_text(completion: str) -> str | None:
    """The text after the last "Answer:" (stripped), or None when there is no "Answer:"."""
    if not isinstance(completion, str):
        return None
    matches = list(_ANSWER.finditer(completion))
    return completion[matches[-1].end() :].strip() if matches else None


def parse_number(text: str) -> Fraction | None:
    """An exact number from text like "17", "-3", "2.5", "1/2" or "1,250"; None if it is not one."""
    if not isinstance(text, str):
        return None
    text = text.strip().rstrip(".").replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(completion: str) -> Fraction | None:
    """The first number after the last "Answer:", or else the last number anywhere; None if none."""
    if not isinstance(completion, str):
        return None
    tail = answer_text(completion)
    text = completion if tail is None else tail
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    if not numbers:
        return None
    return parse_number(numbers[0] if tail is not None else numbers[-1])


def normalise(text: str) -> str:
    """Loose form for exact-match answers: lower case, single spaces, no wrapping quotes, $ or final period."""
    text = " ".join(str(text).split()).lower()
    text = text.rstrip(".").strip()
    for left, right in (('"', '"'), ("'", "'"), ("$", "$"), ("`", "`")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[1:-1].strip()
    return text


def parse_expression(text: str) -> ast.Expression | None:
    """`text` parsed as one Python expression, or None. Model output like `1if x else 2` is valid Python
    that makes the parser print a SyntaxWarning ("invalid decimal literal"); it is silenced here so that
    scoring thousands of completions does not flood the training log."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
