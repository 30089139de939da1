"""TRL-style reward functions as verifiers: loading, the columns they receive, and what bad returns become."""

from __future__ import annotations

import json
import logging
import math
import textwrap

import pytest

from unigrad.tasks import get_task
from unigrad.tasks.guard import VerifierError
from unigrad.tasks.registry import get_tasks
from unigrad.tasks.reward_fn import RewardFunctionTask, load_reward_function

REWARDS = textwrap.dedent('''
    import math

    CALLS = []

    def length_bonus(prompts, completions, answer, **kwargs):
        CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, **kwargs})
        return [2.5 if c.strip() == a else -1 for c, a in zip(completions, answer)]

    def raises(prompts, completions, **kwargs):
        raise RuntimeError("grader offline")

    def unusable(prompts, completions, **kwargs):
        return [None, math.nan, math.inf, "1.0", 0.25, True][: len(completions)]

    def too_short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    def scalar(prompts, completions, **kwargs):
        return 1.0

    def as_dict(prompts, completions, **kwargs):
        return {c: 1.0 for c in completions}

    def as_set(prompts, completions, **kwargs):
        return {float(len(c)) for c in completions}

    def list_of_dicts(prompts, completions, **kwargs):
        return [{"reward": 1.0} for c in completions]

    def as_array(prompts, completions, **kwargs):
        import numpy
        return numpy.array([len(c) for c in completions], dtype=numpy.float32)

    def raises_on_sevens(prompts, completions, **kwargs):
        if any("7" in c for c in completions):
            raise IndexError("list index out of range")
        return [float(len(c)) for c in completions]

    NOT_A_FUNCTION = 0.5
''')


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_load_from_a_file_and_from_a_module(reward_file, monkeypatch):
    from_file = load_reward_function(f"{reward_file}:length_bonus")
    monkeypatch.syspath_prepend(str(reward_file.parent))
    from_module = load_reward_function("my_rewards:length_bonus")
    assert from_file(prompts=["p"], completions=["7"], answer=["7"]) == [2.5]
    assert from_module(prompts=["p"], completions=["7"], answer=["8"]) == [-1]
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_reward_function(f"{reward_file}:nope")
    with pytest.raises(ValueError, match="module:function"):
        load_reward_function("just_a_name")
    with pytest.raises(FileNotFoundError):
        load_reward_function("missing/file.py:f")


def test_the_function_gets_prompts_completions_and_dataset_columns(reward_file, tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i), "task": "t", "difficulty": i % 2} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task,) = get_tasks(str(tmp_path / "d.jsonl"), reward=f"{reward_file}:length_bonus")
    examples = task.examples("train", 3)
    rewards = task.verify([examples[0].answer, "wrong", f" {examples[2].answer} "], examples)
    assert rewards == [2.5, -1.0, 2.5]  # any finite float, not clamped to [0, 1]
    call = task.func.__globals__["CALLS"][-1]
    assert call["prompts"] == [e.prompt for e in examples]
    assert call["answer"] == [e.answer for e in examples] and call["task"] == ["t"] * 3
    assert call["difficulty"] == [e.meta["difficulty"] for e in examples]  # extra columns arrive as kwargs


def test_a_raising_function_gives_nan_for_every_completion_with_a_warning(reward_file, caplog):
    task = get_task("arithmetic", reward=f"{reward_file}:raises")
    examples = task.examples("train", 4)
    with caplog.at_level(logging.WARNING):
        rewards = task.verify(["1"] * 4, examples)
    assert all(math.isnan(r) for r in rewards)
    assert "raises" in caplog.text and "grader offline" in caplog.text


def test_none_nan_inf_and_non_numbers_become_nan_with_a_warning(reward_file, caplog):
    task = get_task("arithmetic", reward=f"{reward_file}:unusable")
    examples = task.examples("train", 6)
    with caplog.at_level(logging.WARNING):
        rewards = task.verify(["1"] * 6, examples)
    assert [math.isnan(r) for r in rewards] == [True, True, True, True, False, False]
    assert rewards[4:] == [0.25, 1.0]
    assert "4 of 6 rewards" in caplog.text


@pytest.mark.parametrize("name", ["too_short", "scalar"])
def test_a_wrong_length_return_is_an_error_naming_the_function(reward_file, name):
    task = get_task("arithmetic", reward=f"{reward_file}:{name}")
    examples = task.examples("train", 3)
    with pytest.raises(ValueError, match=f"reward function .*my_rewards.py:{name} returned"):
        task.verify(["1"] * 3, examples)


def test_a_callable_wraps_any_task_and_keeps_its_examples():
    def exact(prompts, completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    base = get_task("table_qa")
    task = RewardFunctionTask(exact, base, name="table_qa_exact")
    examples = task.examples("test", 5, seed=2)
    assert [e.prompt for e in examples] == [e.prompt for e in base.examples("test", 5, seed=2)]
    assert all(e.task == "table_qa_exact" for e in examples)
    assert task.verify([e.answer for e in examples], examples) == [1.0] * 5
    assert "exact" in task.func_name


@pytest.mark.parametrize("name, returned", [
    ("as_dict", r"a dict \(keys 'a', 'bb', 'ccc'\) for 3 completions"),
    ("list_of_dicts", r"a list whose item 0 is a dict \(\{'reward': 1.0\}\)"),
    ("as_set", "a set for 3 completions"),  # unordered: which reward is whose?
])
def test_a_non_numeric_return_is_refused_saying_what_came_back_and_what_is_expected(reward_file, name, returned):
    task = get_task("arithmetic", reward=f"{reward_file}:{name}")
    with pytest.raises(VerifierError, match=f"my_rewards.py:{name} returned {returned}; it must return a list of 3 "
                                            "floats, one per completion in order"):
        task.verify(["a", "bb", "ccc"], task.examples("train", 3))


def test_an_array_of_rewards_is_read_in_completion_order(reward_file):
    task = get_task("arithmetic", reward=f"{reward_file}:as_array")
    assert task.verify(["a", "bb", "ccc"], task.examples("train", 3)) == [1.0, 2.0, 3.0]


def test_a_name_that_is_not_callable_is_named_as_such(reward_file):
    with pytest.raises(ValueError, match=r"has 'NOT_A_FUNCTION', but it is a float \(0.5\), not a function; name a "
                                         r"function def NOT_A_FUNCTION\(prompts, completions, \*\*kwargs\)"):
        load_reward_function(f"{reward_file}:NOT_A_FUNCTION")


def test_a_function_that_raises_on_one_completion_loses_only_that_reward(reward_file, caplog):
    task = get_task("arithmetic", reward=f"{reward_file}:raises_on_sevens")
    with caplog.at_level(logging.WARNING):
        rewards = task.verify(["12", "7", "abcd"], task.examples("train", 3))
    assert rewards[0] == 2.0 and math.isnan(rewards[1]) and rewards[2] == 4.0
    assert "raised on 1 of 3" in caplog.text and "IndexError" in task.last_error
