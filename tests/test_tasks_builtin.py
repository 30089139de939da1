"""Built-in synthetic tasks: determinism, disjoint splits, self-consistent demonstrations, robust verifiers."""

from __future__ import annotations

import warnings

import pytest

from unigrad.tasks import DEFAULT_MIXTURE, Example, Task, get_task
from unigrad.tasks.code_task import expression_of
from unigrad.tasks.countdown import evaluate
from unigrad.tasks.extract import final_number, parse_expression
from unigrad.tasks.registry import BUILTIN_TASKS

GARBAGE = ["", " ", "\n\n", "Answer:", "Answer: ", "abc", "Answer: banana", "((((", "1e999999", "9" * 5000,
           "Answer: 1/0", "\x00\xff", "-", "Answer: -", "def f(x): return", "🙂" * 50]


@pytest.fixture(scope="module", params=DEFAULT_MIXTURE)
def task(request) -> Task:
    return get_task(request.param)


def test_every_builtin_task_satisfies_the_protocol(task):
    assert isinstance(task, Task)
    assert task.name in DEFAULT_MIXTURE


def test_same_seed_gives_same_examples_and_other_seeds_differ(task):
    a = task.examples("train", 50, seed=3)
    assert a == get_task(task.name).examples("train", 50, seed=3)
    assert [e.meta for e in a] == [e.meta for e in get_task(task.name).examples("train", 50, seed=3)]
    assert a != task.examples("train", 50, seed=4)
    assert task.examples("train", 20, seed=3) == a[:20]  # a longer draw extends a shorter one


@pytest.mark.parametrize("name", DEFAULT_MIXTURE)
def test_no_test_prompt_ever_appears_in_train(name):
    for difficulty in range(1, BUILTIN_TASKS[name].max_difficulty + 1):
        task = get_task(name, difficulty=difficulty)
        train = {e.prompt for seed in range(3) for e in task.examples("train", 300, seed=seed)}
        test = {e.prompt for seed in range(3) for e in task.examples("test", 100, seed=seed)}
        assert train and test
        assert not train & test


def test_held_out_split_has_at_least_200_distinct_prompts(task):
    # the acceptance evaluation uses 200 held-out prompts per task; repeats would overweight a few
    assert len({e.prompt for e in task.examples("test", 200)}) == 200


def test_prompts_and_demonstrations_fit_a_tiny_char_model(task):
    for e in task.examples("train", 300) + task.examples("test", 100):
        assert len(e.prompt) <= 80, e.prompt
        assert e.demonstration is not None and len(e.demonstration) <= 40, e.demonstration
        assert e.task == task.name
        assert all(32 <= ord(ch) < 127 for ch in e.prompt + e.demonstration)  # printable ASCII vocabulary


def test_demonstrations_score_one_under_their_own_verifier(task):
    examples = task.examples("train", 150, seed=1) + task.examples("test", 50, seed=1)
    assert task.verify([e.demonstration for e in examples], examples) == [1.0] * len(examples)


def test_wrong_answers_score_zero(task):
    examples = task.examples("test", 50, seed=2)
    wrong = {
        "arithmetic": lambda e: str(int(e.answer) + 1),
        "countdown": lambda e: "+".join(map(str, e.meta["numbers"])) if sum(e.meta["numbers"]) != e.meta["target"]
        else "*".join(map(str, e.meta["numbers"])) + "+1",
        "word_problems": lambda e: f"Answer: {int(e.answer) + 1}",
        "code": lambda e: "'wrong'",
        "table_qa": lambda e: e.demonstration.replace(f"Answer: {e.answer}", f"Answer: {int(e.answer) - 1}"),
    }[task.name]
    assert task.verify([wrong(e) for e in examples], examples) == [0.0] * len(examples)


def test_garbage_and_truncated_completions_score_zero_without_raising(task):
    examples = task.examples("test", len(GARBAGE), seed=5)
    truncated = [e.demonstration[: len(e.demonstration) // 2] for e in examples]
    scores = task.verify(GARBAGE, examples) + task.verify([None] * len(examples), examples)  # type: ignore[list-item]
    assert all(s == 0.0 for s in scores)
    assert all(0.0 <= s <= 1.0 for s in task.verify(truncated, examples))


def test_difficulty_is_validated():
    with pytest.raises(ValueError, match="difficulty"):
        get_task("arithmetic", difficulty=0)
    with pytest.raises(ValueError, match="difficulty"):
        get_task("table_qa:difficulty=9")


def test_difficulty_makes_problems_longer():
    def mean_len(d):
        examples = get_task("arithmetic", difficulty=d).examples("train", 200)
        return sum(len(e.prompt) for e in examples) / len(examples)

    assert mean_len(1) < mean_len(2) < mean_len(4)


def test_final_number_reads_the_answer_marker_then_the_last_number():
    assert final_number("3*4=12. 5+12=17. Answer: 17") == 17
    assert final_number("Answer: -15 because 40-55=-15") == -15
    assert final_number("40-55=-15") == -15
    assert final_number("Answer: 1,250.") == 1250
    assert final_number("the answer is 0.5") == final_number("1/2")
    assert final_number("no number here") is None
    assert final_number("Answer: none") is None


def test_countdown_accepts_any_correct_expression_and_refuses_everything_else():
    ex = Example("use 3 7 9 to make 30", "30", "3*7+9", "countdown", {"numbers": [3, 7, 9], "target": 30})
    task = get_task("countdown")
    ok = ["3*7+9", "9+7*3", "(9+7*3)", "Answer: 3*7+9", "3*7+9=30", " 7*3+9 \nmore text"]
    bad = ["30", "3*7+9+0", "3*7*9", "3*3+7*3", "10*3", "__import__('os').system('true')", "(lambda: 30)()",
           "3*7+9.0", "-3*-7+9", "3**3+3", "True*30", "[30][0]"]
    assert task.verify(ok, [ex] * len(ok)) == [1.0] * len(ok)
    assert task.verify(bad, [ex] * len(bad)) == [0.0] * len(bad)
    assert evaluate("9/3*10", [3, 9, 10]) == 30
    assert evaluate("9/(3-3)", [3, 3, 9]) is None  # division by zero is a wrong answer, not a crash
    assert evaluate("(" * 200 + "1" + ")" * 200, [1]) is None


def test_expression_parsing_is_silent_on_model_output_that_makes_python_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert parse_expression("1if x else 2") is not None  # valid Python that the parser warns about
        assert parse_expression("3a") is None
        assert expression_of("1if k else k") == "1if k else k"
        assert evaluate("7if 1 else 3", [7, 3]) is None  # not arithmetic: refused, and no warning


def test_code_task_keeps_its_tests_hidden_and_passes_an_equivalent_solution():
    task = get_task("code")
    examples = [e for e in task.examples("train", 100) if e.meta["kind"] == "num"][:5]
    for e in examples:
        assert e.meta["tests"] and e.prompt.startswith("def f(") and e.prompt.count("(") == 1  # no examples shown
    equivalent = ["return " + e.demonstration for e in examples]  # "return x*x+3" is accepted too
    assert task.verify(equivalent, examples) == [1.0] * len(examples)
    lying = "type('E', (int,), {'__eq__': lambda s, o: True})(0)"  # an object that claims to equal anything
    assert task.verify([lying], examples[:1]) == [0.0]
