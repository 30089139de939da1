"""`reasoning_gym:<dataset>`: any Reasoning Gym dataset as a task, scored by the dataset's own verifier.

Reasoning Gym ("Reasoning Gym: Reasoning Environments for Reinforcement Learning with Verifiable Rewards",
arXiv 2505.24760; `pip install "unigrad[reasoning-gym]"`) generates about a hundred families of procedural
problems (arithmetic, algorithms, logic, puzzles, games, ...). Each entry is a dict with a "question", an
"answer" and "metadata", and its dataset's `score_answer(answer, entry)` gives a reward in [0, 1]. Spec:
`reasoning_gym:basic_arithmetic`, or with the dataset config's fields as options,
`reasoning_gym:basic_arithmetic,min_terms=2,max_terms=4` (`size` and `seed` are set here).

Splits: "train", "validation" and "test", a property of the question text (`splits.three_way_split_of`: test
is the same 20% of hash buckets the built-in tasks hold out, validation the next 10%). Each split is drawn from
its own stream of reasoning-gym datasets of `CHUNK` entries, each seeded by a hash of (task name, split, seed,
chunk number), keeping the entries whose question falls in the split and is new, so `examples(s, n, seed)` is
a prefix of `examples(s, n + k, seed)`. Drawing n examples generates about n / 0.7 entries for train, 5 n for
test and 10 n for validation; that is milliseconds for the simple datasets but minutes for the slow
generators (futoshiki, knight_swap, sokoban: ~0.2 s an entry). When a small problem space runs dry, repeats
are allowed after `MAX_MISSES` misses in a row (logged), as in the built-in tasks.

Scoring: the answer is the text inside the completion's last `<answer>...</answer>` (Reasoning Gym's
convention), else the text after its last "Answer:" (unigrad's), else the whole stripped completion; the
dataset's `score_answer` scores it against the entry (kept in `Example.meta["entry"]`), with whatever partial
credit the dataset gives (the default gives len(reference) / len(answer) when the answer contains the
reference). A scorer that raises scores 0.

Demonstrations: "<answer>{reference}</answer>", which the extraction gives back exactly, so a demonstration
scores 1 (checked for every dataset of reasoning-gym 0.1.25 with a single reference answer). Datasets that
accept many answers and have no reference (boxnet, graph_color, propositional_logic, rubiks_cube, rush_hour)
give answer "" and no demonstration: RL only, no SFT / HPT / LUFFY.

Tested (tests/test_reasoning_gym.py, reasoning-gym 0.1.25): right and wrong answers on basic_arithmetic,
chain_sum, letter_counting, word_sorting and spell_backward; demonstrations on those and caesar_cipher,
number_sorting, family_relationships, base_conversion, binary_matrix. Once, by hand: 40 demonstrations of each
of the 100 datasets with a reference answer all score 1 (`composite` needs a list of datasets as its option).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

from unigrad.tasks.base import Example, Split
from unigrad.tasks.extract import answer_text
from unigrad.tasks.splits import SPLITS, three_way_split_of

log = logging.getLogger(__name__)

CHUNK = 500  # entries per generated dataset (some datasets build all their entries when constructed)
MAX_MISSES = 2000  # rejected entries in a row before repeats are allowed
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _reasoning_gym() -> Any:
    """The `reasoning_gym` package, or an ImportError saying how to install it."""
    try:
        import reasoning_gym
        import reasoning_gym.factory
    except ImportError as e:
        raise ImportError('reasoning_gym tasks need the reasoning-gym package: pip install "unigrad[reasoning-gym]"'
                          ) from e
    return reasoning_gym


def extract_answer(completion: str) -> str:
    """The completion's answer: inside its last <answer>...</answer>, else after its last "Answer:", else
    all of it (stripped)."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    tail = answer_text(completion)
    return tail if tail is not None else completion.strip()


def _stable_seed(*parts: object) -> int:
    """A seed in [0, 2**31) from a hash of `parts` (stable across runs and machines; leaves room for the
    `seed + index` many datasets seed their entries with)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class ReasoningGymTask:
    """The reasoning-gym dataset `dataset` as a task; `options` are fields of its config (see the module
    docstring)."""

    def __init__(self, dataset: str, **options: Any):
        rg = _reasoning_gym()
        known = rg.factory.DATASETS
        if dataset not in known:
            close = difflib.get_close_matches(dataset, list(known), n=5, cutoff=0.6)
            hint = f"did you mean: {', '.join(close)}?" if close else f"datasets: {', '.join(sorted(known))}"
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; {hint}")
        self.dataset, self.options, self.name = dataset, dict(options), f"reasoning_gym:{dataset}"
        fields = [f.name for f in dataclasses.fields(known[dataset][1]) if f.name not in ("size", "seed")]
        for key in options:
            if key in ("size", "seed"):
                raise ValueError(f"{self.name}: option {key!r} is set by unigrad (splits are seeded per task, "
                                 "split and seed); leave it out")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
                hint = f"did you mean: {', '.join(close)}? " if close else ""
                raise ValueError(f"{self.name}: unknown option {key!r}; {hint}its options: {', '.join(fields)}")
        self._scorer = self._make(seed=0, size=1)  # also checks the option values

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"ReasoningGymTask({self.dataset!r}{options})"

    def _make(self, seed: int, size: int) -> Any:
        """A reasoning-gym dataset of `size` entries with this task's options."""
        try:
            return _reasoning_gym().create_dataset(self.dataset, size=size, seed=seed, **self.options)
        except Exception as e:  # the config's validate() asserts; a dataset may raise anything
            options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            raise ValueError(f"{self.name}: bad option(s) {options}: {type(e).__name__}: {e}") from e

    def _entries(self, split: Split, seed: int) -> Iterator[dict[str, Any]]:
        """The endless stream of entries a split is drawn from (before filtering), deterministic in (split, seed)."""
        chunk = 0
        while True:
            data = self._make(seed=_stable_seed(self.name, split, seed, chunk), size=CHUNK)
            for i in range(CHUNK):
                yield data[i]
            chunk += 1

    def _example(self, entry: dict[str, Any]) -> Example:
        reference = entry.get("answer")
        answer = "" if reference is None else str(reference)
        demonstration = None if reference is None else f"<answer>{answer}</answer>"
        return Example(prompt=str(entry["question"]), answer=answer, demonstration=demonstration, task=self.name,
                       meta={"entry": entry})

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct questions of `split`; repeats are allowed only once the question space runs dry."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out: list[Example] = []
        seen: set[str] = set()
        misses, unique = 0, True  # misses since the last accepted question
        entries = self._entries(split, seed)
        while len(out) < n:
            entry = next(entries)
            question = str(entry["question"])
            if three_way_split_of(question) != split or (unique and question in seen):
                misses += 1
                if unique and misses > MAX_MISSES:  # the space is (nearly) used up: allow repeats from here on
                    log.warning("%s: only %d distinct %s questions found; repeating some", self.name, len(seen), split)
                    unique, misses = False, 0
                elif misses > 10 * MAX_MISSES:
                    raise ValueError(f"{self.name}: no {split} question in {misses} generated entries "
                                     f"({len(seen)} distinct ones found); the question space is too small to split")
                continue
            misses = 0
            seen.add(question)
            out.append(self._example(entry))
        return out

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        if len(completions) != len(examples):
            raise ValueError(f"{self.name}: {len(completions)} completions for {len(examples)} examples")
        return [self._score(c, e) for c, e in zip(completions, examples, strict=True)]

    def _score(self, completion: str, example: Example) -> float:
        # A verifier must never crash a training step on a garbage completion: any error scores 0.
        try:
            if not isinstance(completion, str):
                return 0.0
            reward = float(self._scorer.score_answer(extract_answer(completion), example.meta["entry"]))
            return min(1.0, max(0.0, reward)) if math.isfinite(reward) else 0.0
        except Exception:
            log.debug("%s: scoring failed for %r", self.name, completion, exc_info=True)
            return 0.0
