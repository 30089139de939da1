"""`arithmetic`: sums and differences of 2-digit numbers, answered with the bare result.

Prompt "23+58-17", demonstration "64". Difficulty: 1 = a 2-digit and a 1-digit number ("47+8");
2 = two 2-digit numbers ("47+38"); 3 = three ("23+58-17"); 4 = four. The default (1) is the
level a ~1 M-parameter char model reaches partially after a short SFT (400 steps of 64 on the
5-task mixture): 7% held-out greedy; two 2-digit numbers gave 3% (~50% when trained alone), and three
stay near 10% even when trained alone.
"""

from __future__ import annotations

import random

from unigrad.tasks.base import Example
from unigrad.tasks.extract import final_number
from unigrad.tasks.synthetic import SyntheticTask


class ArithmeticTask(SyntheticTask):
    name = "arithmetic"
    description = "sums and differences of 2-digit numbers, answered with the bare result"
    max_difficulty = 4

    def generate(self, rng: random.Random) -> Example:
        value = rng.randint(10, 99)
        terms = [str(value)]
        for _ in range(max(1, self.difficulty - 1)):
            op, b = rng.choice("+-"), rng.randint(1, 9) if self.difficulty == 1 else rng.randint(10, 99)
            terms.append(f"{op}{b}")
            value = value + b if op == "+" else value - b
        answer = str(value)
        return Example(prompt="".join(terms), answer=answer, demonstration=answer, task=self.name)

    def score(self, completion: str, example: Example) -> float:
        return float(final_number(completion) == int(example.answer))
