"""The validation split: disjoint from train and test for every built-in task, on request for file and math
tasks, and what `unigrad eval --split` and `eval.split` evaluate."""

import json
import subprocess
import sys

import pytest

from unigrad.tasks import get_task, get_tasks, list_tasks
from unigrad.tasks.splits import split_of, three_way_split_of

N = 60


@pytest.mark.parametrize("name", list_tasks())
def test_every_builtin_task_has_three_disjoint_splits(name):
    task = get_task(name)
    prompts = {s: [e.prompt for e in task.examples(s, N, seed=3)] for s in ("train", "validation", "test")}
    for split, ps in prompts.items():
        assert len(ps) == N
        assert all(three_way_split_of(p) == split for p in ps), split
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["validation"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["test"])
    # the test split is the one the built-in tasks held out before they had a validation split
    assert all(split_of(p) == "test" for p in prompts["test"])


def test_validation_is_about_a_tenth_of_the_prompt_space():
    """Hash buckets 20..29 of 0..99: of the prompts a generator makes, ~10% land in validation."""
    import random

    task = get_task("table_qa")
    rng = random.Random(0)
    splits = [three_way_split_of(task.generate(rng).prompt) for _ in range(3000)]
    assert 0.08 < splits.count("validation") / len(splits) < 0.12
    assert 0.17 < splits.count("test") / len(splits) < 0.23


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("arithmetic").examples("dev", 3)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_task_validation_from_a_column_or_a_fraction(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(40)]
    rows[0]["split"] = "validation"
    data = _write(tmp_path / "d.jsonl", rows)
    (task,) = get_tasks(str(data))
    assert [e.prompt for e in task.examples("validation", 3)] == ["q0"] * 3  # the one row the column names
    (carved,) = get_tasks(f"{data},validation_fraction=0.25,test_fraction=0.25")
    pools = {s: {e.prompt for e in p} for s, p in carved.pools.items()}
    # 39 rows without a split: test ceil(0.25 * 39) = 10; validation q0 + ceil(0.25 * 29) = 1 + 8; train 29 - 8 = 21
    assert len(pools["test"]) == 10 and len(pools["validation"]) == 9 and len(pools["train"]) == 21
    assert "q0" in pools["validation"]
    assert not pools["train"] & pools["validation"] and not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]
    # the test side does not move when validation is carved out (validation comes from what train had)
    (plain,) = get_tasks(f"jsonl:{data},test_fraction=0.25")
    assert {e.prompt for e in plain.pools["test"]} == pools["test"]


def test_file_task_without_validation_says_how_to_get_one(tmp_path):
    (task,) = get_tasks(str(_write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(9)])))
    with pytest.raises(ValueError, match="no validation split.*validation_fraction"):
        task.examples("validation", 2)
    with pytest.raises(ValueError, match="unknown option 'validaton_fraction'"):
        get_tasks(f"{tmp_path / 'd.jsonl'},validaton_fraction=0.1")
    _write(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "1", "split": "dev"}])
    with pytest.raises(ValueError, match="column 'split' must be one of"):
        get_tasks(str(tmp_path / "bad.jsonl"))


def test_math_task_uses_the_datasets_own_validation_split_else_carves_one(tmp_path):
    from datasets import Dataset, DatasetDict

    def rows(prefix, n):
        return Dataset.from_list([{"question": f"{prefix} {i}?", "answer": str(i)} for i in range(n)])

    DatasetDict({"train": rows("tr", 20), "validation": rows("va", 5), "test": rows("te", 6)}).save_to_disk(
        tmp_path / "three")
    task = get_task(f"math:{tmp_path / 'three'}")
    assert {len(p) for p in task.pools.values()} == {20, 5, 6}
    assert all(e.prompt.startswith("va") for e in task.examples("validation", 5))
    DatasetDict({"train": rows("tr", 20), "test": rows("te", 6)}).save_to_disk(tmp_path / "two")
    with pytest.raises(ValueError, match="no validation split"):
        get_task(f"math:{tmp_path / 'two'}").examples("validation", 1)
    carved = get_task(f"math:{tmp_path / 'two'},validation_fraction=0.2")
    assert len(carved.pools["validation"]) == 4 and len(carved.pools["train"]) == 16
    assert all(e.prompt.startswith("tr") for e in carved.pools["validation"])


def test_evaluate_reads_the_split_it_is_given(small_model):
    from unigrad.eval import _held_out_prompts, _Scorer
    from unigrad.models.loading import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(str(small_model))
    task = get_task("arithmetic")
    scorer = _Scorer(None, tok, batch_size=1, style="plain", context=256, max_turns=None, max_new_tokens=6, seed=0)
    for split in ("validation", "test"):
        examples, _, _ = _held_out_prompts(scorer, task, 20, split=split)
        assert [e.prompt for e in examples] == [e.prompt for e in task.examples(split, 20, seed=0)]


@pytest.mark.slow  # 30 s (timed at load average 5-9 on 2 cores)
def test_eval_cli_split_flag(small_model):
    out = {}
    for split in ("validation", "test"):
        res = subprocess.run([sys.executable, "-m", "unigrad.cli", "eval", str(small_model), "--tasks", "arithmetic",
                              "--prompts", "4", "--max-new-tokens", "4", "--split", split, "--json"],
                             capture_output=True, text=True, check=True)
        out[split] = json.loads(res.stdout)
        assert out[split]["arithmetic"]["n"] == 4
    bad = subprocess.run([sys.executable, "-m", "unigrad.cli", "eval", str(small_model), "--split", "train"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_eval_split_config_key():
    from unigrad.config import ConfigError, load_config

    assert load_config(None, ["eval.split=validation"]).eval.split == "validation"
    assert load_config(None, []).eval.split == "test"
    with pytest.raises(ConfigError, match="split"):
        load_config(None, ["eval.split=train"])
