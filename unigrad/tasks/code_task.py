"""`code`: write the expression a one-line Python function returns, checked by hidden tests.

Prompt "def f(x): return # x squared plus 3", demonstration "x*x+3". The completion's first line
(a leading "return " is dropped) must parse as a single Python expression; it becomes the body
of `f` and runs in the sandbox (`sandbox.py`) on the hidden test inputs kept in `Example.meta`
(never in the prompt). The child only prints the JSON of what `f` returned; the expected values
never enter it and the comparison happens here, so a snippet cannot fake a pass without
computing the right values (an object with a lying `__eq__` does not survive JSON).

Reward: all-or-nothing (1 iff every hidden test passes), like every other built-in task, so that
reward scales are comparable across tasks in a mixture; `partial_credit=True` gives the fraction
of tests passed instead. Difficulty 1 (default; 34-40% held-out for a ~1 M-parameter char model
after a short SFT on the 5-task mixture): one operation; 2: two operations, two arguments, lists
and strings; 3: three-term formulas.

Cost: one sandboxed interpreter per distinct (completion, prompt) in a batch (~30-50 ms each,
run in parallel); completions that do not parse score 0 without one. Limits per run: 3 s wall
clock, 2 s CPU, 256 MB address space (`limits=` to change).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import random

from unigrad.tasks.base import Example
from unigrad.tasks.sandbox import SandboxLimits, run_many
from unigrad.tasks.synthetic import SyntheticTask

# (difficulty, parameters, description, canonical expression); A and B stand for factors in 2..9,
# C for a term in 1..50.
TEMPLATES = [
    (1, "x", "x plus C", "x+C"),
    (1, "x", "x times A", "x*A"),
    (1, "x", "x minus C", "x-C"),
    (1, "s", "s in upper case", "s.upper()"),
    (1, "xs", "first item of xs", "xs[0]"),
    (1, "xs", "sum of xs", "sum(xs)"),
    (1, "x", "C minus x", "C-x"),
    (1, "xs", "last item of xs", "xs[-1]"),
    (1, "xs", "xs with C added at the end", "xs+[C]"),
    (1, "s", "length of s", "len(s)"),
    (2, "x", "x squared plus C", "x*x+C"),
    (2, "x", "x times A minus C", "x*A-C"),
    (2, "x", "x mod A", "x%A"),
    (2, "x", "x floor-divided by A", "x//A"),
    (2, "x", "larger of x and C", "max(x,C)"),
    (2, "x", "distance from x to C", "abs(x-C)"),
    (2, "x, y", "x plus y times A", "x+y*A"),
    (2, "x, y", "smaller of x and y", "min(x,y)"),
    (2, "xs", "sum of xs plus C", "sum(xs)+C"),
    (2, "xs", "xs sorted", "sorted(xs)"),
    (2, "s", "s repeated A times", "s*A"),
    (2, "s", "first A characters of s", "s[:A]"),
    (3, "x", "x cubed minus C", "x*x*x-C"),
    (3, "x, y", "x times A plus y times B", "x*A+y*B"),
    (3, "xs", "number of items in xs times A", "len(xs)*A"),
    (3, "xs", "largest item of xs minus C", "max(xs)-C"),
    (3, "s", "s reversed in upper case", "s[::-1].upper()"),
]
_SAFE_BUILTINS = {"abs": abs, "max": max, "min": min, "sum": sum, "sorted": sorted, "len": len}
MARKER = "@@unigrad-result@@"
HARNESS = """import json
def f({params}):
    return ({expression})
_results = []
for _args in json.loads({inputs!r}):
    try:
        _results.append(["ok", json.dumps(f(*_args))])
    except BaseException as _e:
        _results.append(["error", type(_e).__name__])
print({marker!r} + json.dumps(_results))
"""


def _inputs(params: str, rng: random.Random) -> list:
    """One argument tuple of the right kind for `params`."""
    if params == "s":
        return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))]
    if params == "xs":
        return [[rng.randint(-9, 20) for _ in range(rng.randint(1, 5))]]
    return [rng.randint(-10, 30) for _ in params.split(", ")]


@functools.lru_cache(maxsize=4096)
def _hidden_tests(prompt: str, params: str, expr: str, n: int) -> str:
    """JSON list of {"args", "expected"}; seeded by the prompt, so one prompt always has the same tests."""
    rng = random.Random(prompt)
    func = eval(f"lambda {params}: {expr}", {"__builtins__": _SAFE_BUILTINS})  # our template, never model text
    tests = []
    for _ in range(n):
        args = _inputs(params, rng)
        tests.append({"args": args, "expected": func(*args)})
    return json.dumps(tests)


def expression_of(completion: str) -> str | None:
    """The completion's first line as one Python expression, or None if it is not one."""
    lines = completion.strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = text[len("return ") :].strip() if text.startswith("return ") else text
    if not text or len(text) > 300:
        return None
    try:
        ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return text


def _same(a, b) -> bool:
    """Equal values of the same JSON type (True is not 1, 2.0 is not 2), floats up to rounding."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class CodeTask(SyntheticTask):
    name = "code"
    max_difficulty = 3

    def __init__(self, difficulty: int = 1, n_tests: int = 5, partial_credit: bool = False,
                 limits: SandboxLimits | None = None, max_workers: int | None = None):
        super().__init__(difficulty)
        self.n_tests, self.partial_credit, self.max_workers = n_tests, partial_credit, max_workers
        self.limits = limits or SandboxLimits(timeout=3.0, cpu_seconds=2, memory_bytes=256 * 2**20)

    def generate(self, rng: random.Random) -> Example:
        level, params, desc, expr = rng.choice([t for t in TEMPLATES if t[0] <= self.difficulty])
        for letter, value in (("A", rng.randint(2, 9)), ("B", rng.randint(2, 9)), ("C", rng.randint(1, 50))):
            desc, expr = desc.replace(letter, str(value)), expr.replace(letter, str(value))
        prompt = f"def f({params}): return # {desc}"
        tests = _hidden_tests(prompt, params, expr, self.n_tests)
        return Example(prompt, expr, expr, self.name, {"params": params, "tests": json.loads(tests)})

    def program(self, expression: str, example: Example) -> str:
        """The script the sandbox runs: `f` with the completion as body, applied to the test inputs."""
        inputs = json.dumps([t["args"] for t in example.meta["tests"]])
        return HARNESS.format(params=example.meta["params"], expression=expression, inputs=inputs, marker=MARKER)

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        if len(completions) != len(examples):
            raise ValueError(f"code: {len(completions)} completions for {len(examples)} examples")
        programs: dict[str, int] = {}  # identical programs (common within a GRPO group) run once
        keys: list[str | None] = []
        for completion, example in zip(completions, examples, strict=True):
            expression = expression_of(completion) if isinstance(completion, str) else None
            key = None if expression is None else self.program(expression, example)
            if key is not None:
                programs.setdefault(key, len(programs))
            keys.append(key)
        results = run_many(list(programs), self.limits, max_workers=self.max_workers)
        outputs = [results[programs[k]].stdout if k is not None else "" for k in keys]
        return [self._score_output(out, ex) for out, ex in zip(outputs, examples, strict=True)]

    def _score_output(self, stdout: str, example: Example) -> float:
        lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
        if not lines:
            return 0.0
        try:
            results = json.loads(lines[-1][len(MARKER) :])
            passed = sum(
                status == "ok" and _same(json.loads(value), test["expected"])
                for (status, value), test in zip(results, example.meta["tests"], strict=True)
            )
        except (ValueError, TypeError):
            return 0.0
        total = len(example.meta["tests"])
        return passed / total if self.partial_credit else float(passed == total)

    def score(self, completion: str, example: Example) -> float:
        return self.verify([completion], [example])[0]
