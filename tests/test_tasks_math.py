"""The math task on real files and `datasets` directories, and math-verify equivalence on and off the main thread."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import datasets
import pytest

from unigrad.tasks import get_task
from unigrad.tasks.math_task import MathTask
from unigrad.tasks.mathcheck import looks_like_math, math_equal

ROWS = [{"question": f"What is {a} + {b}/2?", "answer": str(a + b / 2)} for a in range(1, 8) for b in range(1, 4)]

EQUIVALENT = [("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "Answer: 0.5"),
              ("1/2", "so $\\boxed{\\frac12}$"), ("72", "48+24 = 72\nAnswer: 72"), ("x+1", "$1+x$"),
              ("3", "Answer: 3.0")]
DIFFERENT = [("1/2", "0.3"), ("72", "Answer: 71"), ("1/2", ""), ("1/2", "I don't know"), ("2", "\\frac{1}{0}")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_verify_equivalences_on_the_main_thread():
    assert [math_equal(g, p) for g, p in EQUIVALENT] == [True] * len(EQUIVALENT)
    assert [math_equal(g, p) for g, p in DIFFERENT] == [False] * len(DIFFERENT)


def test_math_verify_works_off_the_main_thread_with_the_same_answers():
    pairs = EQUIVALENT + DIFFERENT
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda gp: math_equal(*gp), pairs)) == [math_equal(g, p) for g, p in pairs]


def test_a_pathological_completion_times_out_and_scores_zero_on_any_thread():
    slow = "$9^{9^{9^{9}}}$"
    start = time.monotonic()
    assert math_equal("1", slow, timeout=1) is False
    assert time.monotonic() - start < 5
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_equal, "1/2", "0.5").result()  # helper warmed up
        start = time.monotonic()
        assert pool.submit(math_equal, "1", slow, 1).result() is False
        assert time.monotonic() - start < 5
        assert pool.submit(math_equal, "1/2", "0.5").result()  # and it recovers


def test_looks_like_math_separates_numbers_and_formulas_from_words():
    assert all(looks_like_math(t) for t in ["42", "-3.5", "\\frac{1}{2}", "x+1", "2\\sqrt{3}"])
    assert not any(looks_like_math(t) for t in ["Paris", "New York", "", "yes"])


def test_math_task_from_jsonl_with_seeded_disjoint_split(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", ROWS + ROWS[:3])  # duplicated rows stay on one side
    task = MathTask(path, test_fraction=0.25)
    train, test = task.examples("train", 100), task.examples("test", 10)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in test})
    assert len({e.prompt for e in test}) == 6  # ceil(0.25 * 21 distinct questions)
    assert task.examples("train", 100) == train and MathTask(path, test_fraction=0.25).examples("test", 10) == test
    assert task.verify([e.demonstration for e in test], test) == [1.0] * len(test)
    wrong = [f"Answer: {float(e.answer) + 1}" for e in test]
    assert task.verify(wrong, test) == [0.0] * len(test)
    assert task.verify(["", "???", "Answer:"] * 3 + [""], test) == [0.0] * len(test)


def test_math_task_with_custom_columns_and_gsm8k_style_answers(tmp_path):
    rows = [{"problem": "Natalia sold 48 clips in April and half as many in May. Total?",
             "solution": "In May she sold 48/2 = 24.\n48+24 = 72\n#### 72"}] * 2 + \
           [{"problem": f"p{i}", "solution": f"#### {i}"} for i in range(5)]
    task = MathTask(write_jsonl(tmp_path / "g.jsonl", rows), question_column="problem", answer_column="solution")
    natalia = next(e for e in task.pools["train"] + task.pools["test"] if e.prompt.startswith("Natalia"))
    assert natalia.answer == "72" and natalia.demonstration.endswith("48+24 = 72\nAnswer: 72")
    assert task.verify(["so the total is \\boxed{72}", "Answer: 71"], [natalia] * 2) == [1.0, 0.0]


def test_math_task_from_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    task = get_task(f"math:{tmp_path / 'single'}")
    assert len(task.pools["train"]) + len(task.pools["test"]) == len(ROWS) and task.pools["test"]

    train = datasets.Dataset.from_list(ROWS[:15])
    test = datasets.Dataset.from_list(ROWS[15:] + ROWS[:1])  # one question in both: kept in test only
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    task = MathTask(tmp_path / "dict")
    assert [e.prompt for e in task.pools["test"]] == [r["question"] for r in ROWS[15:] + ROWS[:1]]
    assert [e.prompt for e in task.pools["train"]] == [r["question"] for r in ROWS[1:15]]
    examples = task.examples("test", 4, seed=1)
    assert task.verify([e.demonstration for e in examples], examples) == [1.0] * 4


def test_math_task_missing_column_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*row 2.*answer"):
        MathTask(path)
    with pytest.raises(ValueError, match="row 1.*problem"):
        MathTask(path, question_column="problem")
