"""`code_retry`: the `code` task with a second attempt after seeing one failing test.

Turn 1 is the code prompt ("def f(x): return # x plus 3"), answered as in `code` (one Python expression, the body of
`f`). If the answer passes every hidden test the episode ends with reward 1. Otherwise the environment answers with
one failing case, the first hidden test that fails, as a short user message:

    f(3) should be 6, got 7                        a wrong value
    f('ab') should be 'AB', got error NameError    the expression raised
    error: not an expression                       the first line is not one Python expression (no sandbox run)
    error: timed out / error: no result            the run was killed, or printed nothing we could read

and the policy tries again. Values are shown as Python literals (ASCII, lists without spaces, cut at 30 characters).
After `max_turns` (default 2) failing attempts the episode ends with reward 0. A finished episode has no
observation.

Examples, splits, hidden tests and scoring are `CodeTask`'s (this class is a `CodeTask` under another name): the
split is by a hash of the prompt text, so a prompt held out from `code` is held out from `code_retry` too. Each
attempt runs in the same sandbox as `code` (`run_many`: one sandboxed process in the jail, about 10 ms a step on a
loaded 2-core machine, as for one `CodeTask.verify` call); an attempt that does not parse costs no run. `verify` is
`CodeTask.verify`: it scores a single answer as a one-turn episode would (and batches the sandbox runs), so code
expecting a verifier works.
"""

from __future__ import annotations

import json

from unigrad.environments.base import Message, StepResult
from unigrad.sandbox import SandboxLimits, run_many
from unigrad.tasks.base import Example
from unigrad.tasks.code_task import MARKER, CodeTask, _same, expression_of

TOOL_STYLES = ("plain", "hf")
SHOWN_CHARS = 30  # longest value shown in feedback


def show(value) -> str:
    """A JSON value as a short ASCII Python literal: [1,2], 'ab', None, True."""
    if isinstance(value, list):
        text = "[" + ",".join(show(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ",".join(f"{show(k)}:{show(v)}" for k, v in value.items()) + "}"
    else:
        text = ascii(value)
    return cut(text)


def cut(text: str) -> str:
    """`text` in ASCII, at most `SHOWN_CHARS` characters."""
    text = text.encode("ascii", "replace").decode()
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def failing_case(stdout: str, example: Example) -> str | None:
    """Feedback on the first hidden test the run's output fails, "error: ..." if there is no readable result, or
    None if every test passed."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    try:
        results = json.loads(lines[-1][len(MARKER) :]) if lines else None
        if not isinstance(results, list) or len(results) != len(example.meta["tests"]):
            return "error: no result"
        for (status, value), test in zip(results, example.meta["tests"], strict=True):
            call = "f(" + ",".join(show(a) for a in test["args"]) + ")"
            expected = show(test["expected"])
            if status != "ok":
                return f"{call} should be {expected}, got error {cut(str(value))}"
            got = json.loads(value)
            if not _same(got, test["expected"]):
                return f"{call} should be {expected}, got {show(got)}"
    except (ValueError, TypeError):
        return "error: no result"
    return None


class CodeRetryEnvironment:
    """One episode of `code_retry`: `reset` with an example, then one `step` (one sandbox run) per attempt."""

    def __init__(self, task: CodeRetryTask, max_turns: int):
        self.task, self.max_turns = task, max_turns
        self.example: Example | None = None
        self.turns = 0
        self.done = False

    def reset(self, example: Example) -> list[Message]:
        if "tests" not in example.meta:
            raise ValueError(f"code_retry: example {example.prompt!r} has no hidden tests in its meta")
        self.example, self.turns, self.done = example, 0, False
        return [{"role": "user", "content": example.prompt}]

    def step(self, turn: str) -> StepResult:
        if self.example is None:
            raise RuntimeError("code_retry: step before reset")
        if self.done:
            raise RuntimeError("code_retry: step after the episode ended")
        self.turns += 1
        feedback = self.task.attempt(turn, self.example)
        if feedback is None:
            self.done = True
            return StepResult(reward=1.0, done=True)
        if self.turns >= self.max_turns:
            self.done = True
            return StepResult(reward=0.0, done=True)
        return StepResult(observation=[{"role": "user", "content": feedback}], reward=0.0)


class CodeRetryTask(CodeTask):
    """The `code_retry` multi-turn task (see the module docstring): `CodeTask`'s examples and verifier, played as
    an episode of up to `max_turns` attempts."""

    name = "code_retry"
    multi_turn = True
    max_turns = 2
    tools: tuple[str, ...] = ()
    description = "code, with another attempt after each failure, told one failing test"

    def __init__(self, difficulty: int = 1, max_turns: int | None = None, n_tests: int = 5,
                 limits: SandboxLimits | None = None):
        super().__init__(difficulty, n_tests=n_tests, limits=limits)
        if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 1):
            raise ValueError(f"code_retry: max_turns must be a positive int, got {max_turns!r}")
        self.max_turns = max_turns if max_turns is not None else type(self).max_turns

    def __repr__(self) -> str:
        return f"CodeRetryTask(difficulty={self.difficulty}, max_turns={self.max_turns})"

    def environment(self, tool_style: str = "plain") -> CodeRetryEnvironment:
        if tool_style not in TOOL_STYLES:
            raise ValueError(f"code_retry: tool_style must be one of {TOOL_STYLES}, got {tool_style!r}")
        return CodeRetryEnvironment(self, self.max_turns)

    def tool_schemas(self) -> list[dict]:
        return []

    def attempt(self, turn: str, example: Example) -> str | None:
        """Run one attempt in the sandbox: None if it passes every hidden test, else the feedback."""
        expression = expression_of(turn) if isinstance(turn, str) else None
        if expression is None:
            return "error: not an expression"
        result = run_many([self.program(expression, example)], self.limits)[0]
        if result.timed_out:
            return "error: timed out"
        return failing_case(result.stdout, example)
