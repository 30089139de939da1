"""Built-in multi-turn tasks (`guess`, `code_retry`): scripted episodes with known transitions, max_turns, splits,
prompts that fit the tiny model, opening messages that depend on the example alone."""

from __future__ import annotations

import random

import pytest

from unigrad.environments.base import Environment, MultiTurnTask, StepResult, is_multi_turn
from unigrad.environments.code_retry import CodeRetryTask
from unigrad.environments.guess import HIGHER, LOWER, SAY_A_NUMBER, GuessTask
from unigrad.sandbox import JailUnavailable, SandboxError, check
from unigrad.tasks import get_task
from unigrad.tasks.base import Example


def _sandbox_problem() -> str | None:
    """Why sandboxed snippets cannot run here (None: they can)."""
    try:
        check()
    except (JailUnavailable, SandboxError) as e:
        return str(e)
    return None


SANDBOX_PROBLEM = _sandbox_problem()
needs_sandbox = pytest.mark.skipif(SANDBOX_PROBLEM is not None, reason=f"sandbox unavailable: {SANDBOX_PROBLEM}")
TASKS = [GuessTask, CodeRetryTask]


def play(env: Environment, turns: list[str]) -> list[StepResult]:
    """Step through `turns` until the episode ends; the results of the turns played."""
    results = []
    for turn in turns:
        results.append(env.step(turn))
        if results[-1].done:
            break
    return results


def feedback(result: StepResult) -> str | None:
    return result.observation[0]["content"] if result.observation else None


def guess_example(low: int, secret: int, size: int = 15) -> Example:
    high = low + size - 1
    return Example(f"guess my number from {low} to {high}", str(secret), None, "guess",
                   {"low": low, "high": high, "secret": secret})


@pytest.mark.parametrize("cls", TASKS)
def test_tasks_satisfy_the_multi_turn_protocol(cls):
    task = cls()
    assert isinstance(task, MultiTurnTask) and is_multi_turn(task)
    assert isinstance(task.environment(), Environment) and isinstance(task.environment("hf"), Environment)
    assert task.tools == () and task.tool_schemas() == []
    assert task.description and "\n" not in task.description
    assert task.max_turns == cls.max_turns == {"guess": 4, "code_retry": 2}[task.name]
    assert cls(max_turns=3).max_turns == 3 and cls.max_turns == task.max_turns  # an option, not a class change
    with pytest.raises(ValueError, match="max_turns"):
        cls(max_turns=0)
    with pytest.raises(ValueError, match="tool_style"):
        task.environment("json")


@pytest.mark.parametrize("cls", TASKS)
def test_splits_are_disjoint_deterministic_and_prefix_stable(cls):
    task = cls()
    train = task.examples("train", 300, seed=1)
    assert train == cls().examples("train", 300, seed=1)
    assert [e.meta for e in train] == [e.meta for e in cls().examples("train", 300, seed=1)]
    assert task.examples("train", 100, seed=1) == train[:100]
    assert train != task.examples("train", 300, seed=2)
    test = [e for seed in range(3) for e in task.examples("test", 150, seed=seed)]
    train_prompts = {e.prompt for seed in range(3) for e in task.examples("train", 300, seed=seed)}
    assert not train_prompts & {e.prompt for e in test}
    assert len({(e.prompt, e.answer) for e in task.examples("test", 200)}) == 200  # 200 distinct held-out episodes


def test_code_retry_holds_out_the_prompts_code_holds_out():
    code_train = {e.prompt for e in get_task("code").examples("train", 500)}
    assert not code_train & {e.prompt for e in CodeRetryTask().examples("test", 200)}


@pytest.mark.parametrize("cls", TASKS)
def test_prompts_are_short_ascii_and_opening_messages_depend_on_the_example_alone(cls):
    task = cls()
    examples = task.examples("train", 200) + task.examples("test", 100)
    for e in examples:
        assert len(e.prompt) <= 80 and all(32 <= ord(ch) < 127 for ch in e.prompt), e.prompt
        assert e.task == task.name
    for e in examples[:20]:
        used = task.environment()
        used.reset(examples[-1])
        used.step("")  # (no sandbox run) an environment that played an episode opens the next exactly like a fresh one
        assert task.environment().reset(e) == task.environment().reset(e) == used.reset(e)
        assert task.environment().reset(e) == [{"role": "user", "content": e.prompt}]


def test_guess_bisection_follows_the_feedback_to_the_secret():
    env = GuessTask().environment()
    env.reset(guess_example(3, 12))  # 3..17: bisection guesses 10, 14, 12
    results = play(env, ["10", "14", "Answer: 12"])
    assert [feedback(r) for r in results] == [HIGHER, LOWER, None]
    assert [r.reward for r in results] == [0.0, 0.0, 1.0] and [r.done for r in results] == [False, False, True]
    with pytest.raises(RuntimeError, match="ended"):
        env.step("12")


def test_bisection_wins_every_default_episode_and_random_guessing_a_minority():
    task, rng = GuessTask(), random.Random(0)
    examples = task.examples("train", 300) + task.examples("test", 200)

    def episode(example: Example, bisect: bool) -> float:
        env, low, high = task.environment(), example.meta["low"], example.meta["high"]
        assert low <= example.meta["secret"] <= high and example.prompt.endswith(f"from {low} to {high}")
        env.reset(example)
        reward = 0.0
        for _ in range(task.max_turns):
            guess = (low + high) // 2 if bisect else rng.randint(example.meta["low"], example.meta["high"])
            result = env.step(str(guess))
            reward += result.reward or 0.0
            if result.done:
                return reward
            low, high = (guess + 1, high) if feedback(result) == HIGHER else (low, guess - 1)
        raise AssertionError("the episode outlived max_turns")

    assert all(episode(e, bisect=True) == 1.0 for e in examples)
    random_rate = sum(episode(e, bisect=False) for e in examples * 4) / (4 * len(examples))
    assert 0.19 < random_rate < 0.30  # 1 - (14/15)**4 = 0.241, as the module docstring says


def test_guess_turn_without_a_number_counts_and_wrong_guesses_end_at_max_turns():
    task = GuessTask()
    env = task.environment()
    env.reset(guess_example(20, 25))
    results = play(env, ["hmm", "7.5", "25"])
    assert [feedback(r) for r in results] == [SAY_A_NUMBER, SAY_A_NUMBER, None] and results[-1].reward == 1.0
    env.reset(guess_example(20, 25))
    results = play(env, ["no", "30", "21", "24", "25"])
    assert [feedback(r) for r in results] == [SAY_A_NUMBER, LOWER, HIGHER, None]  # the 4th turn ends it
    assert results[-1].done and sum(r.reward or 0 for r in results) == 0.0 and len(results) == task.max_turns
    one = GuessTask(max_turns=1).environment()
    one.reset(guess_example(20, 25))
    assert one.step("24").done


def test_guess_verify_scores_one_answer_as_a_one_turn_episode():
    task = GuessTask()
    examples = task.examples("test", 5)
    assert task.verify([e.answer for e in examples], examples) == [1.0] * 5
    assert task.verify([f"Answer: {int(e.answer) + 1}" for e in examples], examples) == [0.0] * 5
    assert task.verify(["", "banana", "1/0", "9" * 5000, None], examples) == [0.0] * 5  # type: ignore[list-item]


@needs_sandbox
def test_code_retry_wrong_then_right_shows_one_failing_case():
    task = CodeRetryTask()
    example = next(e for e in task.examples("train", 50) if e.meta["kind"] == "num")
    first = example.meta["tests"][0]
    env = task.environment()
    assert env.reset(example) == [{"role": "user", "content": example.prompt}]
    results = play(env, [f"{example.answer}+1", f"return {example.answer}"])
    assert feedback(results[0]) == f"f({first['args'][0]}) should be {first['expected']}, got {first['expected'] + 1}"
    assert [r.reward for r in results] == [0.0, 1.0] and [r.done for r in results] == [False, True]
    assert results[1].observation == []


@needs_sandbox
def test_code_retry_wrong_twice_ends_with_zero_and_errors_are_reported():
    task = CodeRetryTask()
    example = next(e for e in task.examples("train", 50) if e.meta["kind"] == "str")
    first = example.meta["tests"][0]
    env = task.environment()
    env.reset(example)
    results = play(env, ["undefined_name", "'wrong'", example.answer])
    assert feedback(results[0]) == f"f({first['args'][0]!r}) should be {first['expected']!r}, got error NameError"
    assert len(results) == 2 and results[1].done and results[1].observation == []
    assert sum(r.reward or 0 for r in results) == 0.0
    env.reset(example)
    assert feedback(env.step("def f(")) == "error: not an expression"
    assert env.step(example.answer).reward == 1.0  # right on the second try


@needs_sandbox
def test_code_retry_right_first_time_and_verify_agrees_with_a_one_turn_episode():
    task = CodeRetryTask()
    examples = task.examples("test", 6)
    answers = [e.answer for e in examples[:3]] + ["'wrong'", "", "x +"]
    one_turn = []
    for answer, example in zip(answers, examples, strict=True):
        env = task.environment()
        env.reset(example)
        one_turn.append(env.step(answer).reward)
    assert one_turn == task.verify(answers, examples) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
