"""`code`: write the expression a one-line Python function returns, checked by hidden tests.

Prompt "def f(x): return # x squared plus 3", demonstration "x*x+3". The completion's first line
(a leading "return " is dropped) must parse as a single Python expression; it becomes the body
of `f` and runs in the sandbox (`sandbox.py`) on the hidden test inputs kept in `Example.meta`
(never in the prompt). The child only prints the JSON of what `f` returned; the expected values
never enter it and the comparison happens here, so a snippet cannot fake a pass without
computing the right values (an object with a lying `__eq__` does not survive JSON).
The child's output is read as untrusted text (`code_result.py`): a result line too long or nested too deep is
refused before parsing, and one completion whose output cannot be read scores 0 on its own, its reason counted in
`last_failures` (logged by the trainer as rewards/failed/code/REASON), never failing the batch.

Reward: all-or-nothing (1 iff every hidden test passes), like every other built-in task, so that
reward scales are comparable across tasks in a mixture; `partial_credit=True` gives the fraction
of tests passed instead. Difficulty 1 (default; 39-51% held-out for the ~1 M-parameter default
model after its short SFT on the 5-task mixture): one operation; 2: two operations, two arguments, lists
and strings; 3: three-term formulas.

Cost: one sandboxed process per distinct (completion, prompt) in a batch, each in its own sub-jail forked from a
long-lived jailed server (a few ms each, run in parallel; docs/sandbox.md); completions that do not parse score 0
without one. Limits per run: 3 s wall clock, 2 s CPU, 256 MB address space (`limits=` to change).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from collections import Counter

from unigrad.sandbox import SandboxLimits, run_many
from unigrad.tasks.base import Example
from unigrad.tasks.code_result import read_results
from unigrad.tasks.extract import parse_expression
from unigrad.tasks.synthetic import SyntheticTask

log = logging.getLogger(__name__)

# (difficulty, kind of arguments, phrasings, canonical expression). {0} and {1} stand for the parameter
# names (drawn from NAMES), A and B for factors in 2..9, C for a term in 1..99. Names and phrasings vary
# so that the held-out split has hundreds of distinct prompts at every difficulty, and a model has to
# read the prompt rather than recall it.
NAMES = {
    "num": (("x",), ("n",), ("a",), ("k",), ("v",)),
    "num2": (("x", "y"), ("a", "b"), ("m", "n")),
    "list": (("xs",), ("nums",), ("items",), ("vals",)),
    "str": (("s",), ("w",), ("text",), ("word",)),
}
TEMPLATES = [
    (1, "num", ("{0} plus C", "add C to {0}"), "{0}+C"),
    (1, "num", ("{0} times A", "A times {0}"), "{0}*A"),
    (1, "num", ("{0} minus C", "subtract C from {0}"), "{0}-C"),
    (1, "num", ("C minus {0}",), "C-{0}"),
    (1, "str", ("{0} in upper case",), "{0}.upper()"),
    (1, "str", ("length of {0}",), "len({0})"),
    (1, "list", ("first item of {0}",), "{0}[0]"),
    (1, "list", ("last item of {0}",), "{0}[-1]"),
    (1, "list", ("sum of {0}",), "sum({0})"),
    (1, "list", ("{0} with C added at the end",), "{0}+[C]"),
    (2, "num", ("{0} squared plus C",), "{0}*{0}+C"),
    (2, "num", ("{0} times A minus C",), "{0}*A-C"),
    (2, "num", ("{0} mod A",), "{0}%A"),
    (2, "num", ("{0} floor-divided by A",), "{0}//A"),
    (2, "num", ("larger of {0} and C",), "max({0},C)"),
    (2, "num", ("distance from {0} to C",), "abs({0}-C)"),
    (2, "num2", ("{0} plus {1} times A",), "{0}+{1}*A"),
    (2, "num2", ("smaller of {0} and {1}",), "min({0},{1})"),
    (2, "list", ("sum of {0} plus C",), "sum({0})+C"),
    (2, "list", ("{0} sorted",), "sorted({0})"),
    (2, "str", ("{0} repeated A times",), "{0}*A"),
    (2, "str", ("first A characters of {0}",), "{0}[:A]"),
    (3, "num", ("{0} cubed minus C",), "{0}*{0}*{0}-C"),
    (3, "num2", ("{0} times A plus {1} times B",), "{0}*A+{1}*B"),
    (3, "list", ("number of items in {0} times A",), "len({0})*A"),
    (3, "list", ("largest item of {0} minus C",), "max({0})-C"),
    (3, "str", ("{0} reversed in upper case",), "{0}[::-1].upper()"),
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


def _inputs(kind: str, rng: random.Random) -> list:
    """One argument tuple of the given kind."""
    if kind == "str":
        return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))]
    if kind == "list":
        return [[rng.randint(-9, 20) for _ in range(rng.randint(1, 5))]]
    return [rng.randint(-10, 30) for _ in range(2 if kind == "num2" else 1)]


@functools.lru_cache(maxsize=4096)
def _hidden_tests(prompt: str, kind: str, params: str, expr: str, n: int) -> str:
    """JSON list of {"args", "expected"}; seeded by the prompt, so one prompt always has the same tests."""
    rng = random.Random(prompt)
    func = eval(f"lambda {params}: {expr}", {"__builtins__": _SAFE_BUILTINS})  # our template, never model text
    tests = []
    for _ in range(n):
        args = _inputs(kind, rng)
        tests.append({"args": args, "expected": func(*args)})
    return json.dumps(tests)


def expression_of(completion: str) -> str | None:
    """The completion's first line as one Python expression, or None if it is not one."""
    lines = completion.strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = text[len("return ") :].strip() if text.startswith("return ") else text
    if not text or len(text) > 300:
        return None
    return text if parse_expression(text) is not None else None


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
    description = "write the expression a one-line Python function returns, checked by hidden tests in the sandbox"
    max_difficulty = 3
    runs_code = True  # its verifier runs model-written code: training checks the sandbox first

    def __init__(self, difficulty: int = 1, n_tests: int = 5, partial_credit: bool = False,
                 limits: SandboxLimits | None = None, max_workers: int | None = None):
        super().__init__(difficulty)
        self.n_tests, self.partial_credit, self.max_workers = n_tests, partial_credit, max_workers
        self.limits = limits or SandboxLimits(timeout=3.0, cpu_seconds=2, memory_bytes=256 * 2**20)

    def generate(self, rng: random.Random) -> Example:
        _, kind, phrasings, expr = rng.choice([t for t in TEMPLATES if t[0] <= self.difficulty])
        names = rng.choice(NAMES[kind])
        desc, expr = rng.choice(phrasings).format(*names), expr.format(*names)
        for letter, value in (("A", rng.randint(2, 9)), ("B", rng.randint(2, 9)), ("C", rng.randint(1, 99))):
            desc, expr = desc.replace(letter, str(value)), expr.replace(letter, str(value))
        params = ", ".join(names)
        prompt = f"def f({params}): return # {desc}"
        tests = _hidden_tests(prompt, kind, params, expr, self.n_tests)
        return Example(prompt, expr, expr, self.name, {"kind": kind, "params": params, "tests": json.loads(tests)})

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
        failures: Counter[str] = Counter()
        scores = [self._score_output(out, ex, failures) for out, ex in zip(outputs, examples, strict=True)]
        self.last_failures = dict(failures)
        return scores

    def _score_output(self, stdout: str, example: Example, failures: Counter[str] | None = None) -> float:
        """The completion's reward from its snippet's stdout; never raises: an output that cannot be read scores 0
        and its reason (`code_result.REASONS`, or "parser_error") is counted in `failures`."""
        failures = Counter() if failures is None else failures
        try:
            results, reason = read_results(stdout, MARKER, len(example.meta["tests"]))
            if reason is not None:
                failures[reason] += 1
            if results is None:
                return 0.0
            passed = sum(status == "ok" and _same(value, test["expected"])
                         for (status, value), test in zip(results, example.meta["tests"], strict=True))
        except Exception:  # noqa: BLE001 - a last resort: one completion's output must never fail the batch
            log.warning("code: reading a snippet's output failed; it scores 0", exc_info=True)
            failures["parser_error"] += 1
            return 0.0
        total = len(example.meta["tests"])
        return passed / total if self.partial_credit else float(passed == total)

    def score(self, completion: str, example: Example) -> float:
        return self.verify([completion], [example])[0]
