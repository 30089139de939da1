"""Reasoning Gym datasets as tasks: scoring, answer extraction, demonstrations, three disjoint splits, specs, errors."""

from __future__ import annotations

import logging
import sys

import pytest

pytest.importorskip("reasoning_gym")

from unigrad.tasks import Task, get_task  # noqa: E402
from unigrad.tasks.reasoning_gym_task import ReasoningGymTask, extract_answer  # noqa: E402
from unigrad.tasks.registry import get_tasks  # noqa: E402
from unigrad.tasks.splits import TEST_PERCENT, VALIDATION_PERCENT, split_of, three_way_split_of  # noqa: E402

# basic_arithmetic's default (up to 4 digits, with division) takes ~2 ms an entry; 2 digits keeps it fast.
FAST_ARITHMETIC = {"max_digits": 2}


def plus_one(answer: str) -> str:
    """A wrong numeric answer that does not contain the right one (the default scorer gives credit for that)."""
    return str(int(answer) + 1)


def test_three_way_split_holds_out_the_test_prompts_of_split_of_and_a_validation_share():
    prompts = [f"question {i}" for i in range(20_000)]
    splits = [three_way_split_of(p) for p in prompts]
    assert all((s == "test") == (split_of(p) == "test") for p, s in zip(prompts, splits, strict=True))
    for split, percent in (("test", TEST_PERCENT), ("validation", VALIDATION_PERCENT),
                           ("train", 100 - TEST_PERCENT - VALIDATION_PERCENT)):
        assert splits.count(split) / len(prompts) == pytest.approx(percent / 100, abs=0.015)


@pytest.mark.parametrize(("dataset", "options", "wrong"), [
    ("basic_arithmetic", FAST_ARITHMETIC, plus_one),
    ("chain_sum", {}, plus_one),
    ("letter_counting", {}, plus_one),
    ("word_sorting", {}, lambda answer: "zebra, yak, xylophone"),
    ("spell_backward", {}, lambda answer: "#" * len(answer)),
])
def test_right_answers_score_one_and_wrong_answers_zero(dataset, options, wrong):
    task = ReasoningGymTask(dataset, **options)
    assert isinstance(task, Task) and task.name == f"reasoning_gym:{dataset}"
    examples = task.examples("train", 20, seed=1)
    assert all(e.task == task.name and e.meta["entry"]["question"] == e.prompt for e in examples)
    assert task.verify([f"<answer>{e.answer}</answer>" for e in examples], examples) == [1.0] * 20
    assert task.verify([f"<answer>{wrong(e.answer)}</answer>" for e in examples], examples) == [0.0] * 20


def test_partial_credit_is_the_datasets_own():
    task = ReasoningGymTask("word_sorting")
    example = task.examples("train", 1, seed=2)[0]
    backwards = ", ".join(reversed(example.meta["entry"]["metadata"]["sorted_words"]))
    assert 0.0 < task.verify([f"<answer>{backwards}</answer>"], [example])[0] < 1.0  # right words, wrong order


def test_answer_is_read_from_the_last_answer_tag_else_after_answer_colon_else_the_whole_completion():
    assert extract_answer("think <answer>1</answer> again <answer>\n 2 \n</answer> done") == "2"
    assert extract_answer("Answer: 1 <answer>2</answer>\nAnswer: 3") == "2"  # the tag wins
    assert extract_answer("so... Answer: 1\nno, Answer:  3 ") == "3"
    assert extract_answer("  3\n") == "3"
    assert extract_answer("<answer>3") == "<answer>3"  # an unclosed tag is no tag
    task = ReasoningGymTask("chain_sum")
    [example] = task.examples("train", 1, seed=4)
    right, wrong = example.answer, plus_one(example.answer)
    completions = [f"<answer>{right}</answer>", f"First I add.\nAnswer: {right}", right,
                   f"<answer>{wrong}</answer>\n<answer>{right}</answer>", f"Answer: {wrong}\nAnswer: {right}",
                   f"<answer>{wrong}</answer>\nAnswer: {right}", f"Answer: {wrong}", "", "<answer></answer>", None]
    rewards = task.verify(completions, [example] * len(completions))
    assert rewards == [1.0] * 5 + [0.0] * 5


def test_a_scorer_that_raises_scores_zero():
    task = ReasoningGymTask("chain_sum")
    [example] = task.examples("train", 1)
    broken = type(example)(prompt=example.prompt, answer=example.answer, demonstration=None, task=task.name, meta={})
    assert task.verify([f"<answer>{example.answer}</answer>"], [broken]) == [0.0]
    with pytest.raises(ValueError, match="2 completions for 1 examples"):
        task.verify(["1", "2"], [example])


@pytest.mark.parametrize(("dataset", "options"), [
    ("basic_arithmetic", FAST_ARITHMETIC), ("chain_sum", {}), ("letter_counting", {}), ("word_sorting", {}),
    ("spell_backward", {}), ("caesar_cipher", {}), ("number_sorting", {}), ("family_relationships", {}),
    ("base_conversion", {}), ("binary_matrix", {}),  # a multi-line answer
])
def test_every_demonstration_scores_full_marks(dataset, options):
    task = ReasoningGymTask(dataset, **options)
    examples = task.examples("train", 15, seed=5) + task.examples("test", 5, seed=5)
    assert all(e.demonstration == f"<answer>{e.answer}</answer>" for e in examples)
    assert all(extract_answer(e.demonstration) == e.answer for e in examples)
    assert task.verify([e.demonstration for e in examples], examples) == [1.0] * len(examples)


def test_a_dataset_without_a_reference_answer_has_no_demonstration():
    task = ReasoningGymTask("graph_color")
    example = task.examples("train", 1)[0]
    assert example.answer == "" and example.demonstration is None and example.meta["entry"]["answer"] is None


def test_three_splits_are_disjoint_deterministic_and_prefix_stable():
    task = ReasoningGymTask("chain_sum")
    drawn = {split: task.examples(split, n, seed=7) for split, n in (("train", 300), ("validation", 60),
                                                                     ("test", 60))}
    prompts = {split: [e.prompt for e in examples] for split, examples in drawn.items()}
    for split, ps in prompts.items():
        assert len(set(ps)) == len(ps)  # distinct within a split
        assert all(three_way_split_of(p) == split for p in ps)
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])
    assert all(split_of(p) == "test" for p in prompts["test"])  # the held-out test set of the built-in tasks
    assert all(split_of(p) == "train" for p in prompts["validation"] + prompts["train"])
    for split in ("train", "validation", "test"):
        assert task.examples(split, 25, seed=7) == drawn[split][:25]  # a prefix, and the same again
        assert ReasoningGymTask("chain_sum").examples(split, 25, seed=7) == drawn[split][:25]
        assert task.examples(split, 25, seed=8) != drawn[split][:25]
    assert task.examples("test", 0) == []
    with pytest.raises(ValueError, match="split must be one of"):
        task.examples("dev", 1)


def test_a_small_question_space_repeats_with_a_warning(caplog):
    task = ReasoningGymTask("chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)  # ~200 questions
    with caplog.at_level(logging.WARNING, logger="unigrad.tasks.reasoning_gym_task"):
        examples = task.examples("validation", 60, seed=0)
    assert len(examples) == 60 and len({e.prompt for e in examples}) < 60
    assert all(three_way_split_of(e.prompt) == "validation" for e in examples)
    assert "distinct validation questions" in caplog.text


def test_spec_with_options_through_the_registry():
    [task] = get_tasks("reasoning_gym:basic_arithmetic,min_terms=3,max_terms=3,max_digits=2")
    assert isinstance(task, ReasoningGymTask) and task.name == "reasoning_gym:basic_arithmetic"
    assert task.options == {"min_terms": 3, "max_terms": 3, "max_digits": 2}
    assert all(e.meta["entry"]["metadata"]["num_terms"] == 3 for e in task.examples("train", 20))
    task = get_task("reasoning_gym:basic_arithmetic,min_terms=2", max_digits=1)  # keywords join the spec's options
    assert task.options == {"min_terms": 2, "max_digits": 1}
    assert get_task("reasoning_gym:letter_counting").name == "reasoning_gym:letter_counting"


def test_unknown_datasets_and_bad_options_are_clear_value_errors():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym dataset 'basic_arithmetc'.*basic_arithmetic"):
        get_task("reasoning_gym:basic_arithmetc")
    with pytest.raises(ValueError, match=r"reasoning_gym:basic_arithmetic: unknown option 'min_term'.*min_terms"):
        get_task("reasoning_gym:basic_arithmetic,min_term=2")
    with pytest.raises(ValueError, match=r"reasoning_gym:basic_arithmetic: bad option\(s\) min_terms=0.*positive"):
        get_task("reasoning_gym:basic_arithmetic,min_terms=0")
    with pytest.raises(ValueError, match="'seed' is set by unigrad"):
        ReasoningGymTask("chain_sum", seed=3)
    with pytest.raises(ValueError, match="quote specs with commas"):  # what a YAML list makes of an unquoted spec
        get_tasks("min_terms=2")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match=r'pip install "unigrad\[reasoning-gym\]"'):
        get_task("reasoning_gym:chain_sum")
