"""Tool use around a single-turn task: the model may call tools for a few turns, then answers.

`ToolUseEnvironment` runs one episode. `reset(example)` opens with the user's prompt, preceded in the plain style by a
system message listing the tools (`plain_tool_listing`; in the "hf" style the tools reach the prompt through the chat
template's `tools=`, from `ToolUseTask.tool_schemas`). Each assistant turn is read for tool calls
(`parse_tool_calls`):

- a turn with calls: each call runs (`run_tool_call`) and gives one message
  {"role": "tool", "name": <tool name as written>, "content": <result or "error: ...">}; no reward, not done;
- a turn without calls is the final answer: reward = the task's verifier on it (`task.verify([turn], [example])`),
  done. A turn that mixes calls and an answer counts as a turn with calls.

The episode runner stops after `max_turns` assistant turns. A turn with tool calls that is the last allowed turn ends
the episode with reward 0 (the model never answered); its calls are counted but not run, as nobody would read them.

`ToolUseTask` is the `MultiTurnTask` that makes such environments: a single-turn task plus tool names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from unigrad.environments.base import Message, StepResult
from unigrad.tasks.base import Example, Split, Task
from unigrad.tools.base import Tool
from unigrad.tools.calls import STYLES, parse_tool_calls, plain_tool_listing
from unigrad.tools.running import run_tool_call
from unigrad.tools.user import get_tools


class ToolUseEnvironment:
    """One episode of `task` with `tools` (by name), calls written in `style` ("hf" or "plain"), at most `max_turns`
    assistant turns."""

    def __init__(self, task: Task, tools: Mapping[str, Tool], style: str = "plain", max_turns: int = 4):
        if style not in STYLES:
            raise ValueError(f"tool style must be one of {', '.join(STYLES)}, got {style!r}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.task, self.tools, self.style, self.max_turns = task, dict(tools), style, max_turns
        self.example: Example | None = None
        self.turns = 0
        self.done = False

    def reset(self, example: Example) -> list[Message]:
        self.example, self.turns, self.done = example, 0, False
        messages: list[Message] = []
        if self.style == "plain" and self.tools:
            messages.append({"role": "system", "content": plain_tool_listing(self.tools)})
        messages.append({"role": "user", "content": example.prompt})
        return messages

    def step(self, turn: str) -> StepResult:
        if self.example is None:
            raise RuntimeError("step() before reset()")
        if self.done:
            raise RuntimeError("step() after the episode ended")
        self.turns += 1
        calls = parse_tool_calls(turn, self.style, self.tools)
        if not calls:
            self.done = True
            return StepResult(reward=float(self.task.verify([turn], [self.example])[0]), done=True)
        if self.turns >= self.max_turns:  # no turn is left to read the results and answer
            self.done = True
            return StepResult(reward=0.0, done=True, tool_calls=len(calls))
        observation: list[Message] = []
        errors = 0
        for call in calls:
            text, ok = run_tool_call(self.tools, call)
            errors += not ok
            observation.append({"role": "tool", "name": call.name, "content": text})
        return StepResult(observation=observation, tool_calls=len(calls), tool_errors=errors)


class ToolUseTask:
    """`task`'s examples as multi-turn episodes with `tools` (built-in names, user specs "file.py:function" or
    `Tool`s). Its examples carry this task's name; `verify` scores a final answer as `task` does."""

    multi_turn = True

    def __init__(self, task: Task, tools: Sequence[str | Tool] = ("calculator",), name: str | None = None,
                 max_turns: int = 4, description: str | None = None):
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.task = task
        self.tool_table = get_tools(tools)
        self.tools = tuple(self.tool_table)
        self.name = name or f"{task.name}+tools"
        self.max_turns = max_turns
        self.description = description or f"{task.name} with tools: {', '.join(self.tools)}"
        # unigrad.sandbox.prepare checks the jail before training when a task runs model-written code
        self.runs_code = "python" in self.tools or bool(getattr(task, "runs_code", False))

    def __repr__(self) -> str:
        return f"ToolUseTask({self.task!r}, tools={self.tools}, name={self.name!r}, max_turns={self.max_turns})"

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        examples = self.task.examples(split, n, seed)
        return [e if e.task == self.name else dataclasses.replace(e, task=self.name) for e in examples]

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        return self.task.verify(completions, examples)

    def environment(self, tool_style: str = "plain") -> ToolUseEnvironment:
        return ToolUseEnvironment(self.task, self.tool_table, tool_style, self.max_turns)

    def tool_schemas(self) -> list[dict]:
        return [tool.schema() for tool in self.tool_table.values()]


def countdown_with_calculator(difficulty: int = 1, max_turns: int = 4) -> ToolUseTask:
    """`countdown` with the calculator: check partial results with calls, then answer with the expression."""
    from unigrad.tasks.countdown import CountdownTask

    return ToolUseTask(CountdownTask(difficulty), ("calculator",), name="countdown_calc", max_turns=max_turns,
                       description="countdown with a calculator: reach the target with + - * /, checking with calls")
