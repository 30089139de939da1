"""`guess`: find a secret number in a stated range, told "higher" or "lower" after each wrong guess.

Prompt "guess my number from 3 to 17"; the secret (12, say) is in `Example.meta` ("low", "high", "secret") and
never in the prompt. Each assistant turn is a guess, read as the number a single-turn answer would be
(`extract.final_number`: after the last "Answer:", else the last number): the environment answers "higher" (the
secret is larger), "lower" (smaller) or, for a turn with no whole number, "say a number" (it still counts as a
turn). The right guess ends the episode with reward 1; `max_turns` wrong turns end it with reward 0. A finished
episode has no observation.

The range holds 15 numbers at difficulty 1 (the default; 4 turns), 31 at 2 (5 turns), 63 at 3 (6 turns): the
default `max_turns` is exactly what bisection needs, and the bounds vary (low 1..85) while the size is fixed, so
bisection is a fixed pattern of small steps (low+7, then +-4, +-2, +-1) that a character-level model can learn
rather than a midpoint it has to compute. Success rates at the default (15 numbers, 4 turns), exact:

    bisection (midpoint of what is left)                         100%   (2**4 - 1 = 15 numbers)
    uniform random guesses that ignore the feedback               24.1%  (1 - (14/15)**4)
    uniform random guesses without repeats                        26.7%  (4/15)
    uniform random guesses within what the feedback leaves        60.4%  (follows the direction, no bisection)

so a policy that only learns to read the feedback's direction already gains, and bisection wins every episode.

Splits: by a hash of the prompt (the range), as for every built-in task, so a range is either a training or a
held-out range with all its secrets. The prompt space is small (85 ranges per difficulty, about 17 held out) and
an episode is a (range, secret) pair: `examples` draws distinct pairs (1275 at the default, about 255 held out),
so several examples share a prompt. Code that deduplicates examples by prompt (the single-turn evaluation does)
keeps one secret per range.

`verify` scores a single answer as a one-turn episode would: 1 iff it is the secret. It exists so that code
expecting a verifier works; the task is meant to be played through `environment()`.
"""

from __future__ import annotations

import logging
import random

from unigrad.environments.base import Message, StepResult
from unigrad.tasks.base import Example, Split
from unigrad.tasks.extract import final_number
from unigrad.tasks.splits import SPLITS, three_way_split_of
from unigrad.tasks.synthetic import SyntheticTask

log = logging.getLogger(__name__)

SIZES = {1: 15, 2: 31, 3: 63}  # numbers in the range, by difficulty
LOWEST = (1, 85)  # bounds of the range's low end
HIGHER, LOWER, SAY_A_NUMBER = "higher", "lower", "say a number"
TOOL_STYLES = ("plain", "hf")


def read_guess(turn: str) -> int | None:
    """The whole number a turn guesses, or None if it has none (a fraction or decimal is not a guess)."""
    value = final_number(turn) if isinstance(turn, str) else None
    return int(value) if value is not None and value.denominator == 1 else None


class GuessEnvironment:
    """One episode of `guess`: `reset` with an example, then one `step` per assistant turn."""

    def __init__(self, max_turns: int):
        self.max_turns = max_turns
        self.secret: int | None = None
        self.turns = 0
        self.done = False

    def reset(self, example: Example) -> list[Message]:
        try:
            self.secret = int(example.meta["secret"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"guess: example {example.prompt!r} has no secret in its meta") from e
        self.turns, self.done = 0, False
        return [{"role": "user", "content": example.prompt}]

    def step(self, turn: str) -> StepResult:
        if self.secret is None:
            raise RuntimeError("guess: step before reset")
        if self.done:
            raise RuntimeError("guess: step after the episode ended")
        self.turns += 1
        guess = read_guess(turn)
        if guess == self.secret:
            self.done = True
            return StepResult(reward=1.0, done=True)
        if self.turns >= self.max_turns:
            self.done = True
            return StepResult(reward=0.0, done=True)
        feedback = SAY_A_NUMBER if guess is None else HIGHER if self.secret > guess else LOWER
        return StepResult(observation=[{"role": "user", "content": feedback}], reward=0.0)


class GuessTask(SyntheticTask):
    """The `guess` multi-turn task (see the module docstring); `max_turns` defaults to what bisection needs."""

    name = "guess"
    multi_turn = True
    max_turns = 4  # at the default difficulty; an instance's is 3 + difficulty unless given
    tools: tuple[str, ...] = ()
    description = "guess a secret number in a stated range, told 'higher' or 'lower' after each wrong guess"
    max_difficulty = 3

    def __init__(self, difficulty: int = 1, max_turns: int | None = None):
        super().__init__(difficulty)
        if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 1):
            raise ValueError(f"guess: max_turns must be a positive int, got {max_turns!r}")
        self.size = SIZES[difficulty]
        self.max_turns = max_turns if max_turns is not None else 3 + difficulty

    def __repr__(self) -> str:
        return f"GuessTask(difficulty={self.difficulty}, max_turns={self.max_turns})"

    def generate(self, rng: random.Random) -> Example:
        low = rng.randint(*LOWEST)
        high = low + self.size - 1
        secret = rng.randint(low, high)
        return Example(f"guess my number from {low} to {high}", str(secret), None, self.name,
                       {"low": low, "high": high, "secret": secret})

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct (range, secret) episodes of `split`, split by the prompt (`SyntheticTask.examples`, but
        distinct by episode: a prompt has several secrets); repeats only once the episodes run out."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}/{self.difficulty}")
        out: list[Example] = []
        seen: set[tuple[str, str]] = set()
        misses, unique = 0, True
        while len(out) < n:
            ex = self.generate(rng)
            if three_way_split_of(ex.prompt) != split or (unique and (ex.prompt, ex.answer) in seen):
                misses += 1
                if unique and misses > 2000:  # a built-in's finite space, nothing a user can act on: debug
                    log.debug("%s: only %d distinct %s episodes found; repeating some", self.name, len(seen), split)
                    unique = False
                continue
            misses = 0
            seen.add((ex.prompt, ex.answer))
            out.append(ex)
        return out

    def environment(self, tool_style: str = "plain") -> GuessEnvironment:
        if tool_style not in TOOL_STYLES:
            raise ValueError(f"guess: tool_style must be one of {TOOL_STYLES}, got {tool_style!r}")
        return GuessEnvironment(self.max_turns)

    def tool_schemas(self) -> list[dict]:
        return []

    def score(self, completion: str, example: Example) -> float:
        """A single answer as a one-turn episode: 1 iff it is the secret."""
        env = GuessEnvironment(max_turns=1)
        env.reset(example)
        return env.step(completion).reward or 0.0
