"""The built-in tools: `calculator` (exact arithmetic) and `python` (a program run in the code sandbox).

calculator("3*7+9") -> "30"; "7/2" -> "3.5"; "1/3" -> "1/3"; "0.1+0.2" -> "0.3". Only integer and decimal literals,
+ - * / (unary + -) and parentheses, at most 200 characters; the expression is read with `ast` and never passed to
`eval`, and values are exact fractions: an integer, a terminating decimal, else a reduced fraction "a/b". No `**`,
so no value grows past a few hundred digits.

python("print(6*7)") -> "42": the program runs in unigrad's sandbox (unigrad/sandbox/, docs/sandbox.md: the
jail as configured for the run, `PYTHON_LIMITS`); its stdout is the result ("(no output)" if it printed nothing). A
program that fails or times out raises ValueError with its exit status and the last line of its stderr, which
run_tool_call shows as an error observation.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

from unigrad import sandbox
from unigrad.tools.base import Tool

MAX_EXPRESSION_CHARS = 200
PYTHON_LIMITS = sandbox.SandboxLimits(timeout=5.0, cpu_seconds=5, output_chars=4096)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_OPERATOR_TEXT = {ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
                  ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.Invert: "~",
                  ast.Not: "the not operator"}
_DECIMAL = re.compile(r"\d+\.\d*|\.\d+")


def calculator(expression: str) -> str:
    """The exact value of an arithmetic expression (see the module docstring); ValueError with a short message for
    anything else."""
    if not isinstance(expression, str):
        raise ValueError("the expression must be text")
    text = expression.strip()
    if not text:
        raise ValueError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression too long (over {MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"cannot read {text!r} as arithmetic") from None
    try:
        return format_number(_evaluate(tree.body, text))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def _evaluate(node: ast.AST, text: str) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) is int:
            return Fraction(node.value)
        source = (ast.get_source_segment(text, node) or "").replace("_", "")
        if type(node.value) is float and _DECIMAL.fullmatch(source):
            return Fraction(source)  # from the text: 0.1 is exactly 1/10
        raise ValueError(f"only integer and decimal numbers are allowed, not {source or repr(node.value)}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, text), _evaluate(node.right, text))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, text))
    op = getattr(node, "op", None)
    found = _OPERATOR_TEXT.get(type(op), type(node).__name__.lower()) if op is not None else _describe(node)
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {found}")


def _describe(node: ast.AST) -> str:
    return {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes", ast.Compare: "comparisons",
            ast.Subscript: "subscripts"}.get(type(node), type(node).__name__.lower())


def format_number(value: Fraction) -> str:
    """An integer ("30"), a terminating decimal ("3.5", "-0.125") or a reduced fraction ("1/3")."""
    numerator, denominator = value.numerator, value.denominator
    if denominator == 1:
        return str(numerator)
    rest, twos, fives = denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{numerator}/{denominator}"
    places = max(twos, fives)
    digits = str(abs(numerator) * 10**places // denominator).rjust(places + 1, "0")
    return f"{'-' if numerator < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def python(code: str) -> str:
    """What a Python program printed, run in the sandbox; ValueError with its exit status and last error line if
    it fails or times out."""
    if not isinstance(code, str) or not code.strip():
        raise ValueError("empty program")
    result = sandbox.run(code, PYTHON_LIMITS)
    stdout = result.stdout.rstrip("\n")
    if result.ok:
        return stdout if stdout else "(no output)"
    printed = f"{stdout[-150:]}\n" if stdout else ""
    if result.timed_out:
        raise ValueError(f"{printed}timed out after {PYTHON_LIMITS.timeout:g} s")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    raise ValueError(f"{printed}exit status {result.returncode}: {lines[-1][-200:] if lines else 'no error output'}")


BUILTIN_TOOLS: dict[str, Tool] = {
    "calculator": Tool(
        name="calculator",
        description="evaluates + - * / ( ) on numbers exactly",
        parameters={"type": "object", "required": ["expression"], "properties": {"expression": {
            "type": "string", "description": "integers or decimals with + - * / and parentheses, e.g. 3*7+9"}}},
        function=calculator,
    ),
    "python": Tool(
        name="python",
        description="runs a Python program in a sandbox and returns what it printed",
        parameters={"type": "object", "required": ["code"], "properties": {"code": {
            "type": "string", "description": "the program; print the values you want to see"}}},
        function=python,
        timeout=PYTHON_LIMITS.timeout + 15,  # the sandbox kills the program at its own limit; this is a backstop
    ),
}
