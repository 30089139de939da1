"""What a multi-turn task is: an environment the policy talks to for up to `max_turns` assistant turns.

An episode: `reset(example)` gives the opening chat messages (a system message with the tools, the user's request);
the policy writes an assistant turn; `step(turn text)` answers with an observation (more chat messages: a tool's
result, the environment's feedback), an optional reward for that turn and whether the episode is over; and so on
until it is done, `max_turns` assistant turns are written, or a turn is cut by the token budget. The episode's
reward is the sum of its turn rewards (None counts 0): GRPO's advantages are per episode, so every assistant turn of
an episode gets that episode's advantage.

The rollout (`unigrad.rollout.episodes`) keeps the token ids: the learner trains on exactly the ids the engine
sampled, with the observation ids in the context between the turns (and out of the loss).

Tool results are messages with role "tool" (and the tool's "name"); where the tokenizer's chat template has no such
role (the tiny model's), the rollout shows them as user messages. A `MultiTurnTask` is a `unigrad.tasks.base.Task`
(examples with splits, a name) that makes one fresh environment per episode. `reset` must be a function of the
example alone: the opening messages are the prompt the learner conditions on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from unigrad.tasks.base import is_multi_turn

if TYPE_CHECKING:
    from unigrad.tasks.base import Example, Split

__all__ = ["Environment", "Message", "MultiTurnTask", "StepResult", "is_multi_turn"]

Message = dict[str, Any]  # a chat message: {"role": "user" | "system" | "tool" | ..., "content": str, ...}


@dataclass
class StepResult:
    """The environment's answer to one assistant turn."""

    observation: list[Message] = field(default_factory=list)  # messages appended before the next turn
    reward: float | None = None  # this turn's reward (the episode's reward is the sum; None counts 0)
    done: bool = False  # the episode is over (no further assistant turn)
    tool_calls: int = 0  # tool calls this turn made (metrics)
    tool_errors: int = 0  # of them, calls that returned an error observation (unknown tool, bad arguments, ...)


@runtime_checkable
class Environment(Protocol):
    def reset(self, example: Example) -> list[Message]:
        """The episode's opening messages (a function of `example` alone)."""
        ...

    def step(self, turn: str) -> StepResult:
        """Take the assistant's turn (its decoded text) and answer."""
        ...


@runtime_checkable
class MultiTurnTask(Protocol):
    name: str
    multi_turn: bool  # True
    max_turns: int  # assistant turns per episode at most
    tools: tuple[str, ...]  # names of the tools its environments offer (for listings)
    description: str  # one line, for `unigrad tasks`

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        ...

    def environment(self, tool_style: str = "plain") -> Environment:
        """A fresh environment for one episode. `tool_style` is how tool calls are written and read:
        "hf" (the `<tool_call>{json}</tool_call>` convention of transformers chat templates that take `tools=`;
        the tools reach the prompt through `tool_schemas`) or "plain" (`@name(arguments)`, for templates without
        tools such as the embedded tiny model's; the environment describes its tools in a system message)."""
        ...

    def tool_schemas(self) -> list[dict[str, Any]]:
        """JSON schemas of its tools, as `apply_chat_template(..., tools=...)` takes them (empty: no tools)."""
        ...
