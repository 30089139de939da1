"""User tasks from JSONL / parquet files, their verifiers, their error messages, and the registry."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unigrad.tasks import DEFAULT_MIXTURE, Task, get_task, list_tasks
from unigrad.tasks.files import load_file_tasks
from unigrad.tasks.registry import get_tasks

CAPITALS = [{"prompt": f"Capital of country {i}?", "answer": f"City {i}", "task": "capitals", "source": "atlas"}
            for i in range(10)]
HALVES = [{"prompt": f"Half of {i}?", "answer": i / 2, "demonstration": f"Answer: {i / 2}", "task": "halves"}
          for i in range(1, 11)]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_one_file_holds_several_tasks_with_disjoint_splits(tmp_path):
    tasks = load_file_tasks(write_jsonl(tmp_path / "mix.jsonl", CAPITALS + HALVES), test_fraction=0.2)
    assert [t.name for t in tasks] == ["capitals", "halves"]
    for task in tasks:
        assert isinstance(task, Task)
        train, test = task.examples("train", 30, seed=1), task.examples("test", 5, seed=1)
        assert len({e.prompt for e in test}) == 2 and {e.prompt for e in train}.isdisjoint({e.prompt for e in test})
        assert all(e.task == task.name for e in train + test)
        assert task.examples("train", 30, seed=1) == train
    capitals, halves = tasks
    example = capitals.examples("train", 1)[0]
    assert example.demonstration is None and example.meta == {"source": "atlas"}  # extra columns travel in meta
    assert halves.examples("train", 1)[0].answer in {str(i / 2) for i in range(1, 11)}


def test_split_seed_and_fractions_deal_the_rows_without_a_split(tmp_path):
    """Rows naming no split are dealt by the fractions, from split_seed: the same seed deals them the same way, an
    other seed another way; validation_fraction carves its share out of what test leaves."""
    path = write_jsonl(tmp_path / "c.jsonl", CAPITALS)

    def pools(**options):
        (task,) = load_file_tasks(path, test_fraction=0.3, **options)
        return {split: sorted(e.prompt for e in examples) for split, examples in task.pools.items()}

    assert pools(split_seed=0) == pools(split_seed=0) != pools(split_seed=1)
    dealt = pools(split_seed=0, validation_fraction=0.4)
    assert [len(dealt[s]) for s in ("train", "validation", "test")] == [4, 3, 3]


def test_split_column_is_honoured(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i), "split": "test" if i < 3 else "train"} for i in range(8)]
    (task,) = load_file_tasks(write_jsonl(tmp_path / "s.jsonl", rows))
    assert sorted(e.prompt for e in task.pools["test"]) == ["q0", "q1", "q2"]
    assert task.name == "s"  # no task column: the file's stem


def test_parquet_file_loads_like_jsonl(tmp_path):
    pq.write_table(pa.Table.from_pylist(CAPITALS), tmp_path / "caps.parquet")
    task = get_task(f"parquet:{tmp_path / 'caps.parquet'}")
    assert task.name == "capitals" and len(task.pools["train"]) + len(task.pools["test"]) == 10
    assert get_task(str(tmp_path / "caps.parquet")).pools == task.pools


def test_exact_math_and_auto_verifiers(tmp_path):
    rows = [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "Half of one?", "answer": "1/2"}]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    examples = [e for t in load_file_tasks(path) for e in t.pools["train"] + t.pools["test"]]
    paris, half = sorted(examples, key=lambda e: e.answer != "Paris")
    completions = ["Answer: paris.", "  PARIS ", "It is Paris", "Answer: Lyon", "Answer: 0.5", "\\frac{1}{2}", "0.3"]
    pairs = [paris] * 4 + [half] * 3
    auto, exact, math = (load_file_tasks(path, verifier=v)[0] for v in ("auto", "exact", "math"))
    assert auto.verify(completions, pairs) == [1, 1, 0, 0, 1, 1, 0]  # exact match is on the whole answer
    assert exact.verify(completions, pairs) == [1, 1, 0, 0, 0, 0, 0]
    assert math.verify(completions[4:], pairs[4:]) == [1, 1, 0]
    assert auto.verify(["", "Answer:", "\x00"], [paris, half, half]) == [0, 0, 0]
    with pytest.raises(ValueError, match="verifier"):
        load_file_tasks(path, verifier="fuzzy")


def test_malformed_jsonl_row_names_the_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", CAPITALS[:2], ['{"prompt": "x", "answer": \n'])
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 3: malformed JSON"):
        load_file_tasks(path)
    path = write_jsonl(tmp_path / "list.jsonl", CAPITALS[:1], ["[1, 2]\n"])
    with pytest.raises(ValueError, match=r"list\.jsonl: row 2: expected a JSON object"):
        load_file_tasks(path)


def test_text_that_is_not_utf8_names_the_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", CAPITALS[:2], [])
    with path.open("ab") as f:
        f.write('{"prompt": "Capitale de la Norv\u00e8ge ?", "answer": "Oslo"}\n'.encode("latin-1"))  # e-grave: 0xe8
    with pytest.raises(ValueError, match=r"latin1\.jsonl: row 3: not UTF-8 text .*re-encode the file as UTF-8"):
        load_file_tasks(path)
    whole = tmp_path / "latin1.json"
    whole.write_bytes('[{"prompt": "Norv\u00e8ge", "answer": "Oslo"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text"):
        load_file_tasks(whole)


def test_missing_or_bad_column_names_the_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "gap.jsonl", CAPITALS[:3] + [{"prompt": "Where?"}])
    with pytest.raises(ValueError, match=r"gap\.jsonl: row 4: missing column 'answer'"):
        load_file_tasks(path)
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "noprompt.parquet")
    with pytest.raises(ValueError, match=r"noprompt\.parquet: row 1: missing column 'prompt' \(row has: question"):
        load_file_tasks(tmp_path / "noprompt.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "answer": "a"}, {"prompt": "r", "answer": None}]),
                   tmp_path / "null.parquet")
    with pytest.raises(ValueError, match=r"null\.parquet: row 2: column 'answer' is empty"):
        load_file_tasks(tmp_path / "null.parquet")
    path = write_jsonl(tmp_path / "split.jsonl", [{"prompt": "q", "answer": "a", "split": "dev"}])
    with pytest.raises(ValueError, match=r"split\.jsonl: row 1: column 'split'"):
        load_file_tasks(path)
    path = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": ["q"], "answer": "a"}])
    with pytest.raises(ValueError, match=r"typed\.jsonl: row 1: column 'prompt' must be text"):
        load_file_tasks(path)


def test_registry_specs(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", CAPITALS + HALVES)
    assert list_tasks() == [*DEFAULT_MIXTURE, "countdown_calc", "guess", "code_retry"]  # single-turn, then multi
    assert [t.name for t in get_tasks(str(path))] == ["capitals", "halves"]
    assert get_task(f"jsonl:{path}#halves").name == "halves"
    assert get_task(f"{path}#capitals").name == "capitals"
    assert get_task("code:difficulty=1,n_tests=3").n_tests == 3
    with pytest.raises(ValueError, match="holds 2 tasks"):
        get_task(str(path))
    with pytest.raises(ValueError, match="no task 'nope'"):
        get_task(f"{path}#nope")
    with pytest.raises(ValueError, match="unknown task 'arithmetc'.*arithmetic, countdown, word_problems, code"):
        get_task("arithmetc")
    with pytest.raises(FileNotFoundError):
        get_task(str(tmp_path / "absent.jsonl"))
