"""`math`: question / answer pairs from a dataset, checked for mathematical equivalence.

Source: a directory written by `datasets` `save_to_disk` (`load_from_disk`), any other local
dataset directory or data file `datasets.load_dataset` understands, or a .jsonl / .json /
.parquet file. Column names are configurable (default question / answer, as in GSM8K). If the
answer holds a GSM8K-style solution ("... #### 72"), the reference is the part after the last
"####" and the demonstration is the reasoning followed by "Answer: 72"; otherwise the
demonstration is the `solution_column` if given, else "Answer: <answer>".

Splits: the dataset's own "train" and "test" (or "validation", used as test when there is no "test") splits
when it has them (a question found in two is kept in test only), else a seeded split over distinct questions
(`splits.seeded_split`). Validation: the dataset's own "validation" when it also has "train" and "test"; else,
with `validation_fraction` > 0 (`math:PATH,validation_fraction=0.1`), a seeded share of the training questions
(`splits.seeded_validation`); else none. Reward: 1 iff math-verify finds the
completion's answer equal to the reference ("0.5" = "1/2" = "\\frac{1}{2}"), see `mathcheck.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unigrad.tasks.base import Example, Split
from unigrad.tasks.files import read_rows
from unigrad.tasks.guard import score_each
from unigrad.tasks.mathcheck import math_equal
from unigrad.tasks.splits import SPLITS, draw, no_validation_error, seeded_split, seeded_validation


def _load(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows per split name ("all" when the source has no splits)."""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        return {"all": [row for _, row in read_rows(path)]}
    import datasets

    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path))
    if isinstance(loaded, datasets.Dataset):
        return {"all": loaded.to_list()}
    return {name: split.to_list() for name, split in loaded.items()}


def _reference(answer: str) -> tuple[str, str | None]:
    """(final answer, reasoning) from a GSM8K-style "reasoning #### answer", else (answer, None)."""
    if "####" not in answer:
        return answer.strip(), None
    reasoning, final = answer.rsplit("####", 1)
    return final.strip().replace(",", ""), reasoning.strip() or None


class MathTask:
    def __init__(self, path: str | Path, question_column: str = "question", answer_column: str = "answer",
                 solution_column: str | None = None, name: str = "math", test_fraction: float = 0.1,
                 split_seed: int = 0, timeout: int = 5, validation_fraction: float = 0.0):
        self.name, self.path, self.timeout = name, Path(path), timeout
        columns = (question_column, answer_column) + ((solution_column,) if solution_column else ())
        splits = _load(self.path)
        for split, rows in splits.items():
            for i, row in enumerate(rows, start=1):
                missing = [c for c in columns if row.get(c) is None]
                if missing:
                    raise ValueError(f"{self.path}: split {split!r}, row {i}: missing column(s) {missing} "
                                     f"(row has: {', '.join(row)})")
        to_example = lambda row: self._example(row, question_column, answer_column, solution_column)
        test_name = next((s for s in ("test", "validation") if s in splits), None)
        if "train" in splits and test_name:
            test = [to_example(r) for r in splits[test_name]]
            seen = {e.prompt for e in test}  # a question in two of the dataset's splits counts as test only
            own_validation = test_name == "test" and "validation" in splits
            validation = [e for e in map(to_example, splits["validation"]) if e.prompt not in seen] \
                if own_validation else []
            seen |= {e.prompt for e in validation}
            train = [e for e in map(to_example, splits["train"]) if e.prompt not in seen]
        else:
            rows = [r for rs in splits.values() for r in rs]
            examples = [to_example(r) for r in rows]
            held_out = seeded_split([e.prompt for e in examples], test_fraction, split_seed)
            test = [e for e in examples if e.prompt in held_out]
            train, validation, own_validation = [e for e in examples if e.prompt not in held_out], [], False
        if not own_validation:  # carve validation out of train when asked (the dataset has none of its own)
            carved = seeded_validation([e.prompt for e in train], validation_fraction, split_seed)
            validation = [e for e in train if e.prompt in carved]
            train = [e for e in train if e.prompt not in carved]
        self.pools = {"train": train, "validation": validation, "test": test}

    def _example(self, row: dict, question: str, answer: str, solution: str | None) -> Example:
        final, reasoning = _reference(str(row[answer]))
        if solution:
            demonstration = str(row[solution])
        elif reasoning:
            demonstration = f"{reasoning}\nAnswer: {final}"
        else:
            demonstration = f"Answer: {final}"
        return Example(str(row[question]).strip(), final, demonstration, self.name)

    def __repr__(self) -> str:
        return f"MathTask({str(self.path)!r}, " + ", ".join(f"{s}={len(p)}" for s, p in self.pools.items()) + ")"

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "validation" and n > 0 and not self.pools["validation"]:
            raise no_validation_error(self.name)
        return draw(self.pools[split], n, seed, f"task {self.name!r}, split {split!r}")

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        scores, self.last_failures = score_each(self.name, lambda c, e: math_equal(e.answer, c, self.timeout),
                                                completions, examples)
        return scores
