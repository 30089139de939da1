"""What every built-in synthetic task shares: seeded generation, the train/validation/test split, safe scoring.

The split is a property of the prompt, not of the draw: a prompt is held out for test iff a hash of its
text falls in the lowest `TEST_PERCENT` buckets, for validation iff it falls in the next `VALIDATION_PERCENT`
(`splits.three_way_split_of`). So no two splits can share a prompt, whatever the seed, the number of examples
or the difficulty, and a test prompt stays a test prompt when the generator changes. Each split is drawn from
its own random stream (seeded by task, split, seed and difficulty), rejecting prompts of the other splits, so
`examples(s, n, seed)` is a prefix of `examples(s, n + k, seed)`.
"""

from __future__ import annotations

import logging
import random

from unigrad.tasks.base import Example, Split
from unigrad.tasks.guard import score_each
from unigrad.tasks.splits import SPLITS, three_way_split_of

log = logging.getLogger(__name__)


class SyntheticTask:
    """Base of the built-in tasks: subclasses set `name`, `max_difficulty` and implement
    `generate` (one random example) and `score` (one completion, may raise: raising means 0).

    `difficulty` 1 (the default) is tuned for the embedded ~1 M-parameter model: partial
    competence after a short SFT on the 5-task mixture, so RL has room to improve."""

    name: str = ""
    max_difficulty: int = 3

    def __init__(self, difficulty: int = 1):
        if not isinstance(difficulty, int) or not 1 <= difficulty <= self.max_difficulty:
            raise ValueError(f"{self.name}: difficulty must be an int in 1..{self.max_difficulty}, got {difficulty!r}")
        self.difficulty = difficulty

    def __repr__(self) -> str:
        return f"{type(self).__name__}(difficulty={self.difficulty})"

    def generate(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def score(self, completion: str, example: Example) -> float:
        raise NotImplementedError

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct prompts of `split`; repeats are allowed only once the prompt space runs dry."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}/{self.difficulty}")  # str seeds hash with sha512
        out: list[Example] = []
        seen: set[str] = set()
        misses, unique = 0, True  # misses since the last accepted prompt
        while len(out) < n:
            ex = self.generate(rng)
            if three_way_split_of(ex.prompt) != split or (unique and ex.prompt in seen):
                misses += 1
                if unique and misses > 2000:  # the space is (nearly) used up: allow repeats from here on (debug:
                    # a built-in task's prompt space is what it is, nothing a user could act on)
                    log.debug("%s: only %d distinct %s prompts found; repeating some", self.name, len(seen), split)
                    unique = False
                continue
            misses = 0
            seen.add(ex.prompt)
            out.append(ex)
        return out

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        # a verifier must never crash a training step on a garbage completion: any error scores 0 (and is counted)
        scores, self.last_failures = score_each(self.name, self.score, completions, examples)
        return [min(1.0, max(0.0, s)) for s in scores]
