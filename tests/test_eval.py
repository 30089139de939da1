"""Held-out evaluation: per-prompt results and the paired gain with its standard error."""

import math

import pytest

from unigrad.eval import evaluate, paired_gain


def test_paired_gain_by_hand():
    before = {"a": {"correct": [0, 0, 1, 1]}, "b": {"correct": [1, 0, 0]}, "mean": {"pass@1": 0.0}}
    after = {"a": {"correct": [1, 0, 1, 0]}, "b": {"correct": [1, 1, 1]}, "mean": {"pass@1": 0.0}}
    # a: d = (1, 0, 0, -1), mean 0, sample variance 2/3, se^2 = (2/3)/4 = 1/6
    # b: d = (0, 1, 1), mean 2/3, sample variance ((4/9) + 2 (1/9)) / 2 = 1/3, se^2 = (1/3)/3 = 1/9
    gain, se = paired_gain(before, after)
    assert gain == pytest.approx((0 + 2 / 3) / 2)
    assert se == pytest.approx(math.sqrt(1 / 6 + 1 / 9) / 2)
    with pytest.raises(ValueError, match="task 'b'.*per-prompt"):
        paired_gain(before, {**after, "b": {"correct": [1, 1]}})
    with pytest.raises(ValueError, match="same tasks"):
        paired_gain(before, {"a": after["a"], "mean": {}})


def test_per_prompt_results_agree_with_pass_at_1(small_model):
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import get_tasks

    model, tok = load_model_and_tokenizer(str(small_model))
    tasks = [*get_tasks("arithmetic"), *get_tasks("countdown")]
    res = evaluate(model, tok, tasks, 6, max_new_tokens=6, per_prompt=True)
    for t in tasks:
        correct = res[t.name]["correct"]
        assert len(correct) == 6 and set(correct) <= {0, 1}
        assert res[t.name]["pass@1"] == pytest.approx(sum(correct) / 6)
    assert "correct" not in evaluate(model, tok, tasks, 2, max_new_tokens=4)["arithmetic"]
    gain, se = paired_gain(res, res)
    assert gain == 0.0 and se == 0.0
