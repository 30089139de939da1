"""A user environment, the worked example of docs/environments.md: arithmetic with a hint and a second attempt.

    unigrad train tasks='["env:examples/environments/hinted_arithmetic.py:HintedArithmetic"]' max_steps=50

Turn 1 answers the sum; a wrong answer gets "no, more" or "no, less" and one more try. An episode scores 1 when
an attempt is right, 0.5 when only the second is (a per-turn reward: the episode's reward is the sum of its turns').
"""

from __future__ import annotations

from unigrad.environments.base import StepResult
from unigrad.tasks import get_task
from unigrad.tasks.base import Example
from unigrad.tasks.extract import final_number


class HintedEpisode:
    """One episode: `reset` on an example, then one `step` per assistant turn."""

    def __init__(self) -> None:
        self.example: Example | None = None
        self.turn = 0

    def reset(self, example: Example) -> list[dict]:
        self.example, self.turn = example, 0
        return [{"role": "user", "content": example.prompt}]  # a function of the example alone

    def step(self, turn: str) -> StepResult:
        self.turn += 1
        guess, answer = final_number(turn), int(self.example.answer)
        if guess == answer:
            return StepResult(reward=1.0 if self.turn == 1 else 0.5, done=True)
        if guess is None:
            hint = "no, a number"
        else:
            hint = "no, more" if guess < answer else "no, less"
        return StepResult([{"role": "user", "content": hint}])  # the runner stops it after max_turns


class HintedArithmetic:
    """The task: the built-in arithmetic prompts (and their train/test split), played as episodes."""

    name = "hinted_arithmetic"
    multi_turn = True
    max_turns = 2
    tools: tuple[str, ...] = ()
    description = "arithmetic with a hint (more / less) and a second attempt"

    def __init__(self, difficulty: int = 1) -> None:
        self.arithmetic = get_task("arithmetic", difficulty=difficulty)

    def examples(self, split, n: int, seed: int = 0) -> list[Example]:
        return self.arithmetic.examples(split, n, seed)

    def environment(self, tool_style: str = "plain") -> HintedEpisode:
        return HintedEpisode()

    def tool_schemas(self) -> list[dict]:
        return []
