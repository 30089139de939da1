"""HPT's switch, the task sampler's determinism and resumption, and loss-metric merging."""

import math
from collections import Counter

import pytest
import torch

from unigrad.data.samplers import TaskSampler, systematic_draw
from unigrad.objective.hybrid import hpt_switch, prompt_success_rate
from unigrad.train.metrics import merge_loss_metrics

NAN = float("nan")


def rewards_for(successes, n=8):
    return torch.tensor([1.0] * successes + [0.0] * (n - successes))


def test_gamma_zero_sends_only_all_fail_prompts_to_sft():
    rewards = torch.cat([rewards_for(0), rewards_for(1), rewards_for(8)])
    groups = torch.arange(3).repeat_interleave(8)
    assert hpt_switch(rewards, groups, 3, gamma=0.0).tolist() == [True, False, False]


def test_gamma_two_eighths_includes_exactly_two_successes():
    rewards = torch.cat([rewards_for(2), rewards_for(3)])
    groups = torch.arange(2).repeat_interleave(8)
    assert hpt_switch(rewards, groups, 2, gamma=2 / 8).tolist() == [True, False]


def test_unscorable_rollouts_are_left_out_and_all_unscorable_goes_to_sft():
    rewards = torch.tensor([NAN, 1.0, 0.0, 0.0, NAN, NAN])
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    p = prompt_success_rate(rewards, groups, 3)
    assert p[0].item() == pytest.approx(0.5) and p[1].item() == 0.0 and torch.isnan(p[2])
    assert hpt_switch(rewards, groups, 3, gamma=0.0).tolist() == [False, True, True]


def test_sampler_is_deterministic_and_resumes_exactly():
    a = TaskSampler([5, 3, 7], seed=11)
    b = TaskSampler([5, 3, 7], seed=11)
    assert a.sample(20) == b.sample(20)
    state = a.state_dict()
    expected = a.sample(30)
    c = TaskSampler([5, 3, 7], seed=999)
    c.load_state_dict(state)
    assert c.sample(30) == expected


def test_sampler_covers_each_pool_before_repeating():
    s = TaskSampler([4], seed=0)
    first = [i for _, i in s.sample(4)]
    assert sorted(first) == [0, 1, 2, 3]


def test_sampler_weights_and_errors():
    s = TaskSampler([10, 10], seed=0, weights=[1.0, 0.0])
    assert {t for t, _ in s.sample(50)} == {0}
    with pytest.raises(ValueError, match="non-negative"):
        TaskSampler([1, 1], weights=[1.0])
    with pytest.raises(ValueError, match="at least one training prompt"):
        TaskSampler([3, 0])


def test_merge_loss_metrics_sums_losses_and_weights_fractions_by_tokens():
    merged = merge_loss_metrics([
        {"rl/loss": 0.25, "rl/clip/region_fraction": 0.5, "rl/ratio/max": 1.1, "rl/tokens": 10.0},
        {"rl/loss": 0.5, "rl/clip/region_fraction": 0.0, "rl/ratio/max": 1.3, "rl/tokens": 30.0},
        {"sft/loss": 2.0, "sft/tokens": 5.0},
    ])
    assert merged["rl/loss"] == pytest.approx(0.75)
    assert merged["rl/clip/region_fraction"] == pytest.approx(0.125)
    assert merged["rl/ratio/max"] == pytest.approx(1.3)
    assert merged["rl/tokens"] == 40.0
    assert merged["loss"] == pytest.approx(2.75)


@pytest.mark.parametrize("probs", [[0.2, 0.2, 0.2, 0.2, 0.2], [0.55, 0.3, 0.15], [0.0, 0.7, 0.0, 0.3, 0.0]])
def test_systematic_draw_gives_floor_or_ceil_counts_and_is_unbiased(probs):
    k = 16
    grid = 4000  # u on a fine grid: the mean count over u must be k * p_t
    mean = [0.0] * len(probs)
    for j in range(grid):
        tasks = systematic_draw(probs, k, (j + 0.5) / grid)
        assert len(tasks) == k
        for t, p in enumerate(probs):
            n = tasks.count(t)
            assert math.floor(k * p + 1e-9) <= n <= math.ceil(k * p - 1e-9), (t, n)
            mean[t] += n / grid
    assert mean == pytest.approx([k * p for p in probs], abs=1e-2)


def test_stratified_sampler_deals_even_counts_and_independent_does_not():
    stratified = TaskSampler([100] * 4, seed=3)
    independent = TaskSampler([100] * 4, seed=3, draw="independent")
    uneven = 0
    for _ in range(20):
        assert sorted(Counter(t for t, _ in stratified.sample(16)).values()) == [4, 4, 4, 4]
        uneven += sorted(Counter(t for t, _ in independent.sample(16)).values()) != [4, 4, 4, 4]
    assert uneven > 10  # multinomial counts are rarely exactly even
    with pytest.raises(ValueError, match="unknown draw"):
        TaskSampler([1], draw="poisson")


def test_a_checkpoint_of_a_balanced_run_resumes_with_the_uniform_sampler_it_now_is():
    # Before gradients.combine, `balanced` and `pcgrad` were sampler names, saved in the sampler's checkpoint state.
    from unigrad.data.samplers import TaskSampler

    before = TaskSampler([5, 7], seed=3, names=["a", "b"])
    before.sample(4)
    state = {**before.state_dict(), "name": "balanced"}
    after = TaskSampler([5, 7], seed=0, names=["a", "b"])
    after.load_state_dict(state)
    assert after.sample(6) == before.sample(6)
    with pytest.raises(ValueError, match="'size' sampler"):
        after.load_state_dict({**state, "name": "size"})
