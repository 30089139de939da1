"""`table_qa`: FinQA-like questions over a tiny table given in the prompt.

Prompt "rev: 2021=40, 2022=55. rev change 2021->2022?", demonstration "55-40=15. Answer: 15".
The model must find the right cells, then (above the lookup level) compute. Question kinds by
difficulty: 1 = look up a cell ("rev 2022?" -> "Answer: 55"), say which year is higher
("55>40. Answer: 2022"), or the change between the two years, over one row; 2 adds totals and a
second row (rev and cost) with the profit of a year; 3 adds three-year tables and averages.
The default (1) is the level a ~1 M-parameter char model reaches partially after a short SFT on
the 5-task mixture (22-25% held-out); without lookups and comparisons (2-digit arithmetic only) it
scored 2.5%. Reward 1 iff the
final number (after "Answer:", else the last number) equals the answer.
"""

from __future__ import annotations

import random

from unigrad.tasks.base import Example
from unigrad.tasks.extract import final_number
from unigrad.tasks.synthetic import SyntheticTask

METRICS = ["rev", "sales", "users", "units", "cash", "debt"]


class TableQATask(SyntheticTask):
    name = "table_qa"
    description = "FinQA-like questions over a tiny table given in the prompt"
    max_difficulty = 3

    def generate(self, rng: random.Random) -> Example:
        while True:
            example = self._draw(rng)
            if example is not None and len(example.prompt) <= 80 and len(example.demonstration or "") <= 40:
                return example

    def _draw(self, rng: random.Random) -> Example | None:
        d = self.difficulty
        n_years = 3 if d >= 3 and rng.random() < 0.5 else 2
        start = rng.randint(2015, 2023)
        years = list(range(start, start + n_years))
        two_rows = d >= 2 and rng.random() < 0.5
        names = ["rev", "cost"] if two_rows else [rng.choice(METRICS)]
        table = {m: [rng.randint(10, 99) for _ in years] for m in names}
        if two_rows:  # keep profit non-negative, as in most toy reports
            table["cost"] = [rng.randint(5, r) for r in table["rev"]]
        kinds = ["lookup", "higher", "change"] + (["total"] if d >= 2 else []) + (["profit"] if two_rows else [])
        kind, m = rng.choice(kinds + (["avg"] if d >= 3 else [])), rng.choice(names)
        vals = table[m]
        if kind == "lookup":
            k = rng.randrange(n_years)
            question, steps, ans = f"{m} {years[k]}?", [], vals[k]
        elif kind == "higher":
            i, j = sorted(rng.sample(range(n_years), 2))
            if vals[i] == vals[j]:
                return None
            hi, lo = (j, i) if vals[j] > vals[i] else (i, j)
            question, steps, ans = f"{m} higher in {years[i]} or {years[j]}?", [f"{vals[hi]}>{vals[lo]}"], years[hi]
        elif kind == "change":
            i, j = sorted(rng.sample(range(n_years), 2))
            ans = vals[j] - vals[i]
            question, steps = f"{m} change {years[i]}->{years[j]}?", [f"{vals[j]}-{vals[i]}={ans}"]
        elif kind == "total":
            ans = sum(vals)
            question, steps = f"total {m}?", ["+".join(map(str, vals)) + f"={ans}"]
        elif kind == "profit":
            k = rng.randrange(n_years)
            ans = table["rev"][k] - table["cost"][k]
            question, steps = f"profit {years[k]}?", [f"{table['rev'][k]}-{table['cost'][k]}={ans}"]
        else:
            vals[-1] -= sum(vals) % n_years  # integer averages only: nudge the last value
            total = sum(vals)
            ans = total // n_years
            question, steps = f"avg {m}?", ["+".join(map(str, vals)) + f"={total}", f"{total}/{n_years}={ans}"]
        demo = ". ".join(steps + [f"Answer: {ans}"])
        rows = "; ".join(f"{n}: " + ", ".join(f"{y}={v}" for y, v in zip(years, table[n], strict=True)) for n in names)
        return Example(f"{rows}. {question}", str(ans), demo, self.name)

    def score(self, completion: str, example: Example) -> float:
        return float(final_number(completion) == int(example.answer))
