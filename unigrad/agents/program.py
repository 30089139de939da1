"""Agent programs as tasks: `agent:PATH.py:FUNCTION@TASK` (or `agent:module:FUNCTION@TASK`).

`FUNCTION(client, example)` is a user's agent: plain code against the `openai` package. It gets a client pointed at
the trainer's own endpoint (`openai.OpenAI` for a plain function, `openai.AsyncOpenAI` for a coroutine function) and
one example as a dict, makes model calls, and returns the episode's reward: a number, or (number, info dict). The
dict has:

    prompt, answer, task    the example's prompt, reference answer and task name
    meta                    the example's other fields (hidden tests, ...)
    model                   the model name to pass to the client (the one the run serves)
    score                   score(text) -> float: the task's own verifier on a final answer (with @TASK only)

After `@` comes any task spec a run accepts (built-in, data file, Reasoning Gym); its examples are the ones the agent
plays and its verifier is `example["score"]`. Without `@`, the agent's module supplies `examples(split)`: a list of
dicts with at least "prompt" and "answer" for "train" and "test" (and "validation" where it has one).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unigrad.tasks.base import Example, Split, Task
from unigrad.user_code import load_object

AGENT_PREFIX = "agent:"
DEFAULT_MAX_CALLS = 8
DEFAULT_AGENT_TIMEOUT = 120.0  # seconds per episode (rollout.agent_timeout's default; evaluations use it)


@dataclass(frozen=True)
class AgentProgram:
    """A user's agent function and how to call it."""

    spec: str  # "PATH.py:FUNCTION" or "module:FUNCTION"
    function: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2]


def load_agent(spec: str) -> AgentProgram:
    """The agent function `spec` names; a ValueError saying what is wrong otherwise."""
    function = load_object(spec, "agent", kind="function")
    if not callable(function):
        raise ValueError(f"agent {spec!r}: {type(function).__name__} is not callable")
    params = [p for p in inspect.signature(function).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(function).parameters.values()):
        raise ValueError(f"agent {spec!r}: an agent takes (client, example), {function.__name__} takes "
                         f"{len(params)} positional argument(s)")
    return AgentProgram(spec, function)


def parse_agent_spec(spec: str) -> tuple[str, str | None]:
    """"agent:my_agent.py:solve@arithmetic" -> ("my_agent.py:solve", "arithmetic"); no "@": (program, None)."""
    if not spec.startswith(AGENT_PREFIX):
        raise ValueError(f"not an agent task spec: {spec!r}")
    program, sep, task = spec[len(AGENT_PREFIX):].partition("@")
    if not program or (sep and not task):
        raise ValueError(f"agent task {spec!r}: expected 'agent:PATH.py:FUNCTION[@TASK]'")
    return program, (task or None)


class AgentTask:
    """A multi-turn task whose episodes an agent program plays through the endpoint (`unigrad.agents.runner`)."""

    multi_turn = True
    agent = True
    tools: tuple[str, ...] = ()

    def __init__(self, program: AgentProgram, task: Task | None, module_examples: Callable | None = None,
                 max_calls: int = DEFAULT_MAX_CALLS):
        if task is None and module_examples is None:
            raise ValueError(f"agent {program.spec!r}: without '@TASK' its module must define examples(split)")
        if max_calls < 1:
            raise ValueError(f"agent {program.spec!r}: max_calls must be at least 1, got {max_calls}")
        self.program, self.task, self._module_examples = program, task, module_examples
        self.max_turns = max_calls  # model calls an episode may make (the endpoint refuses more)
        self.name = f"{program.name}@{task.name}" if task is not None else program.name
        self.description = f"agent {program.spec}" + (f" playing {task.name}" if task is not None else "")

    def __repr__(self) -> str:
        return f"AgentTask({self.program.spec!r}, {self.task!r})"

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        if self.task is not None:
            return self.task.examples(split, n, seed)
        return _module_examples(self._module_examples, self.program.spec, self.name, split, n, seed)

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        if self.task is None:
            raise ValueError(f"agent task {self.name!r} scores whole episodes; it has no verifier of its own")
        return self.task.verify(completions, examples)

    def tool_schemas(self) -> list[dict[str, Any]]:
        return []

    def environment(self, tool_style: str = "plain"):
        return _AgentPromptOnly()

    def example_dict(self, example: Example, model: str) -> dict[str, Any]:
        """What the agent function gets for `example` (module docstring)."""
        out: dict[str, Any] = {"prompt": example.prompt, "answer": example.answer, "task": example.task,
                               "meta": dict(example.meta), "model": model}
        if self.task is not None:
            task = self.task
            out["score"] = lambda text: float(task.verify([str(text)], [example])[0])
        return out


class _AgentPromptOnly:
    """What stands for an agent episode's opening where the trainer needs one before the agent runs (prompt pools,
    listings): the example's prompt as one user message. The agent's own first request is the row's prompt."""

    def reset(self, example: Example) -> list[dict[str, Any]]:
        return [{"role": "user", "content": example.prompt}]

    def step(self, turn: str):  # pragma: no cover - agent episodes are played by their agent, never stepped
        raise RuntimeError("an agent task's episodes are played by its agent program")


def served_model_name(model: str) -> str:
    """The name a run's endpoint serves its model under (what agents pass as `model`): a hub id or embedded name as
    it is, a local directory by its last component."""
    from pathlib import Path

    path = Path(str(model))
    return path.name if path.is_dir() else str(model)


def is_agent_task(task: Any) -> bool:
    return bool(getattr(task, "agent", False))


def _module_examples(function: Callable, spec: str, name: str, split: Split, n: int, seed: int) -> list[Example]:
    """`n` examples of the agent module's `examples(split)` (a list of dicts with "prompt" and "answer"), drawn
    with `seed` (with repeats where the split holds fewer than `n`)."""
    rows = list(function(split))
    if not rows:
        raise ValueError(f"agent {spec!r}: examples({split!r}) returned no examples")
    examples = []
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise ValueError(f"agent {spec!r}: examples({split!r})[{k}] is not a dict with 'prompt' and 'answer'")
        meta = {key: value for key, value in row.items() if key not in ("prompt", "answer", "demonstration")}
        examples.append(Example(str(row["prompt"]), str(row["answer"]), row.get("demonstration"), name, meta))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    reps = math.ceil(n / len(order))
    return [examples[i] for i in (order * reps)[:n]]


def make_agent_task(spec: str, load_task: Callable[[str], Task], max_calls: int = DEFAULT_MAX_CALLS) -> AgentTask:
    """The `AgentTask` an "agent:..." spec names; `load_task` turns the spec after "@" into its task."""
    program_spec, task_spec = parse_agent_spec(spec)
    program = load_agent(program_spec)
    if task_spec is not None:
        return AgentTask(program, load_task(task_spec), max_calls=max_calls)
    where = program_spec.rpartition(":")[0]
    module_examples = load_object(f"{where}:examples", "agent examples", kind="function")
    return AgentTask(program, None, module_examples, max_calls=max_calls)
