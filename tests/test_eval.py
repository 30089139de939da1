"""Held-out evaluation: per-prompt results and the paired gain with its standard error."""

import itertools
import math

import pytest
import torch

from unigrad.eval import evaluate, paired_gain, pass_at_k


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


# Three prompts x five samples, sample j of prompt i at i * 5 + j (the layout `evaluate` scores them in); the prompts
# have 0, 1 and 4 correct samples, at positions chosen so that neither the mean over samples (for k > 1) nor the table
# read with prompts and samples swapped (its columns hold 1, 2, 2 correct) gives the same numbers.
TABLE = [[0, 0, 0, 0, 0],
         [0, 1, 0, 0, 0],
         [1, 1, 0, 1, 1]]


def brute_force_pass_at_k(table: list[list[int]], k: int) -> float:
    """The mean over prompts of the fraction of a prompt's k-sample subsets that hold a correct sample: what the
    unbiased estimator 1 - C(n - c, k) / C(n, k) of arXiv 2107.03374 counts, enumerated subset by subset."""
    per_prompt = []
    for samples in table:
        subsets = list(itertools.combinations(samples, k))
        per_prompt.append(sum(any(s) for s in subsets) / len(subsets))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_pass_at_k_is_the_unbiased_estimator_over_prompts(k):
    flat = torch.tensor([c for row in TABLE for c in row], dtype=torch.bool)
    want = brute_force_pass_at_k(TABLE, k)
    assert pass_at_k(flat, 5, k) == pytest.approx(want)
    # by hand for k = 2: prompt 1 has its correct sample in 4 of the 10 pairs, prompt 2 (one wrong sample) in all 10
    assert brute_force_pass_at_k(TABLE, 2) == pytest.approx((0 + 0.4 + 1.0) / 3)


def test_pass_at_k_with_k_samples_counts_the_prompts_with_a_correct_one():
    flat = torch.tensor([c for row in TABLE for c in row], dtype=torch.bool)
    assert pass_at_k(flat, 5, 5) == pytest.approx(2 / 3)  # what `evaluate(..., pass_k=5)` reports for this table
    assert pass_at_k(flat, 5, 1) == pytest.approx(5 / 15)  # pass@1: the mean over samples
    with pytest.raises(ValueError, match="samples per prompt"):
        pass_at_k(flat[:-1], 5, 2)
    with pytest.raises(ValueError):
        pass_at_k(flat, 5, 6)


def test_evaluate_reports_pass_at_k_of_the_samples_it_scored():
    """`evaluate(pass_k=4)`: every sampled completion's verdict is recorded as the task scores it (a reward that
    depends on the text, so prompts get different numbers of correct samples); the reported pass@4 is the brute-force
    estimator over those verdicts, grouped by prompt."""
    from step_helpers import small_char_llama

    from unigrad.models.tokenizer import build_char_tokenizer
    from unigrad.tasks import get_tasks

    tok = build_char_tokenizer(model_max_length=256)
    model = small_char_llama(tok)
    task = get_tasks("arithmetic")[0]
    verdicts: dict[str, list[int]] = {}

    def verify(texts, examples):
        rewards = [float(sum(map(ord, t)) % 3 == 0) for t in texts]
        if len(texts) == 4 * len(set(e.prompt for e in examples)):  # the sampled call (greedy: one per prompt)
            for e, r in zip(examples, rewards, strict=True):
                verdicts.setdefault(e.prompt, []).append(int(r))
        return rewards

    task.verify = verify
    res = evaluate(model, tok, [task], 5, pass_k=4, max_new_tokens=4)
    assert len(verdicts) == 5 and all(len(v) == 4 for v in verdicts.values())
    counts = [sum(v) for v in verdicts.values()]
    assert min(counts) < max(counts) and any(0 < c < 4 for c in counts)  # any() is not the mean over samples
    assert res[task.name]["pass@4"] == pytest.approx(brute_force_pass_at_k(list(verdicts.values()), 4))
