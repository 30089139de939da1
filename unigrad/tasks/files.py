"""User tasks from a JSONL or parquet file: one row per prompt, one Task per value of `task`.

Columns: `prompt` and `answer` (required), `demonstration` (optional, for SFT / HPT), `task`
(optional: the task name, so one file can hold several tasks; default: the file's stem), `split`
(optional: "train", "validation" or "test"; rows without it are split by `splits.seeded_split` over
prompts, and with the option `validation_fraction` > 0 a seeded share of the remaining prompts becomes
"validation": `unigrad train tasks=[data.jsonl,validation_fraction=0.1]`). Without either there is no
validation split and asking for one raises ValueError.
Any other column is kept in `Example.meta` (a reward function receives it as a keyword).

Bad input fails loudly at load time, never mid-training: a malformed row or a missing column
raises ValueError naming the file and the row (1-based; for JSONL the row is the line number).

Verifier (`verifier=`): "exact" compares the normalised text after the last "Answer:" (else the
last non-empty line) with the normalised answer; "math" uses math-verify; "auto" (default) gives
1 if the exact check passes, or if the answer looks mathematical and math-verify agrees.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from unigrad.tasks.base import Example, Split
from unigrad.tasks.extract import answer_text, normalise
from unigrad.tasks.guard import score_each
from unigrad.tasks.mathcheck import looks_like_math, math_equal
from unigrad.tasks.splits import (
    SPLITS,
    SplitFractions,
    draw,
    no_validation_error,
    seeded_split,
    seeded_validation,
)

VERIFIERS = ("auto", "exact", "math")


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs of a .jsonl / .json / .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                             "re-encode the file as UTF-8") from None
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and _first_line_is_object(path):
                raise ValueError(f"{path}: this looks like JSON Lines (one object per line), not one JSON list; "
                                 f"rename it to {path.with_suffix('.jsonl').name}") from None
            raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return list(enumerate(rows, start=1))
    if suffix != ".jsonl":
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: row {lineno}: not UTF-8 text (byte {e.start} of the row: "
                                 f"{raw[e.start:e.start + 1]!r}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    return out


def _first_line_is_object(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _cell(row: dict[str, Any], column: str, where: str, required: bool) -> str | None:
    """A cell as text; numbers are accepted (a JSON 42 means "42")."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return None
        if column not in row:
            raise ValueError(f"{where}: missing column {column!r} (row has: {', '.join(map(str, row)) or 'nothing'})")
        raise ValueError(f"{where}: column {column!r} is empty")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: column {column!r} must be text, got {type(value).__name__}")
    return str(value)


DEFAULT_FRACTIONS = SplitFractions()


class FileTask:
    """One named task over rows of a file; see the module docstring."""

    def __init__(self, name: str, examples: list[Example], splits: list[Split | None], verifier: str = "auto",
                 fractions: SplitFractions = DEFAULT_FRACTIONS, rows: list[int] | None = None):
        """`splits`: each example's split, None where its row names none (dealt by `fractions`); `rows`: each
        example's row number in its file (for messages; default 1, 2, ...)."""
        if verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
        self.name, self.verifier = name, verifier
        unassigned = [e.prompt for e, s in zip(examples, splits, strict=True) if s is None]
        self._split_note = (len(examples), len(set(e.prompt for e in examples)), len(unassigned),
                            fractions.test_fraction)
        held_out = seeded_split(unassigned, fractions.test_fraction, fractions.split_seed)
        validation = seeded_validation([p for p in unassigned if p not in held_out], fractions.validation_fraction,
                                       fractions.split_seed)
        self.pools: dict[str, list[Example]] = {s: [] for s in SPLITS}
        #: row numbers of training rows without a demonstration (checked when SFT / HPT / guidance loads the task)
        self.rows_without_demonstration: list[int] = []
        for row, example, split in zip(rows or range(1, len(examples) + 1), examples, splits, strict=True):
            if split is None:
                split = "test" if example.prompt in held_out else "validation" if example.prompt in validation \
                    else "train"
            self.pools[split].append(example)
            if split == "train" and not example.demonstration:
                self.rows_without_demonstration.append(row)

    def __repr__(self) -> str:
        return f"FileTask({self.name!r}, " + ", ".join(f"{s}={len(p)}" for s, p in self.pools.items()) + ")"

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "validation" and n > 0 and not self.pools["validation"]:
            raise no_validation_error(self.name)
        if split == "test" and n > 0 and not self.pools["test"]:
            raise self._no_test_error()
        return draw(self.pools[split], n, seed, f"task {self.name!r}, split {split!r}")

    def _no_test_error(self) -> ValueError:
        """Why there is no test split, and how to get one."""
        rows, distinct, unassigned, fraction = self._split_note
        return ValueError(
            f"task {self.name!r} has no test split: its {rows} row(s) hold {distinct} distinct prompt(s). Rows "
            f"without a 'split' column ({unassigned} here) are split by distinct prompt, test_fraction={fraction:g} "
            "of them held out for test (at least one, and only when there are two or more). Add distinct prompts, "
            "give some rows split='test', or train without the held-out evaluation (eval.before_after=false)")

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        scores, self.last_failures = score_each(self.name, lambda c, e: self._correct(c, e.answer), completions,
                                                examples)
        return scores

    def _correct(self, completion: str, answer: str) -> bool:
        if self.verifier != "math":
            tail = answer_text(completion)
            lines = [line for line in completion.splitlines() if line.strip()]
            candidate = tail if tail is not None else (lines[-1] if lines else "")
            if candidate.strip() and normalise(candidate) == normalise(answer):
                return True
            if self.verifier == "exact" or not looks_like_math(answer):
                return False
        return math_equal(answer, completion)


def _check_one_answer(answers: dict[tuple[str, str], tuple[str, int]], task: str, prompt: str, answer: str,
                      number: int, path: Path) -> None:
    """A prompt given twice must have the same answer (a repeat is fine): with two, one of them is scored wrong."""
    first = answers.setdefault((task, prompt), (answer, number))
    if normalise(first[0]) != normalise(answer):
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise ValueError(f"{path}: rows {first[1]} and {number} give the prompt {shown!r} two different answers "
                         f"({first[0]!r} and {answer!r}); keep one answer per prompt (remove or fix one of the rows)")


def load_file_tasks(path: str | Path, verifier: str = "auto", test_fraction: float = 0.1,
                    split_seed: int = 0, validation_fraction: float = 0.0) -> list[FileTask]:
    """One FileTask per distinct `task` value in the file (in order of first appearance)."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    grouped: dict[str, tuple[list[Example], list[Split | None], list[int]]] = defaultdict(lambda: ([], [], []))
    answers: dict[tuple[str, str], tuple[str, int]] = {}  # (task, prompt) -> (its answer, the row that gave it)
    for number, row in rows:
        where = f"{path}: row {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt = _cell(row, "prompt", where, required=True)
        answer = _cell(row, "answer", where, required=True)
        demonstration = _cell(row, "demonstration", where, required=False)
        name = _cell(row, "task", where, required=False) or path.stem
        split = row.get("split")
        if split not in (None, *SPLITS):
            raise ValueError(f"{where}: column 'split' must be one of {SPLITS}, got {split!r}")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "answer", "demonstration", "task", "split")}
        _check_one_answer(answers, name, prompt, answer, number, path)
        examples, splits, numbers = grouped[name]
        examples.append(Example(prompt, answer, demonstration, name, meta))
        splits.append(split)
        numbers.append(number)
    fractions = SplitFractions(test_fraction, split_seed, validation_fraction)
    return [FileTask(name, ex, sp, verifier, fractions, rows) for name, (ex, sp, rows) in grouped.items()]
