"""Advantage estimators against hand-computed values; edge cases without NaN."""

import math

import pytest
import torch

from unigrad.objective import ESTIMATORS, compute_advantages

R = torch.tensor


def test_grpo_one_group():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866
    adv = compute_advantages(R([1.0, 0.0, 0.0, 1.0]), R([0, 0, 0, 0]), "grpo")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, -a, a])


def test_groups_may_be_interleaved_and_non_contiguous():
    rewards = R([1.0, 3.0, 0.0, 5.0])
    ids = R([7, 42, 7, 42])
    adv = compute_advantages(rewards, ids, "dr_grpo")
    assert adv.tolist() == pytest.approx([0.5, -1.0, -0.5, 1.0])


@pytest.mark.parametrize("method", [m for m in ESTIMATORS if m not in ("reinforce", "sft")])
def test_group_of_one_and_all_equal_groups_give_zero_not_nan(method):
    rewards = R([0.7, 1.0, 1.0, 1.0])
    ids = R([0, 1, 1, 1])
    adv = compute_advantages(rewards, ids, method)
    assert torch.isfinite(adv).all()
    if method not in ("batch_std", "whiten"):  # batch-level estimators see the whole batch
        assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_rloo_leave_one_out_baseline():
    # 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    adv = compute_advantages(R([1.0, 0.0, 0.0]), R([0, 0, 0]), "rloo")
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_batch_std_and_whiten():
    # groups (1, 0) and (1, 1): group-centred (0.5, -0.5, 0, 0); batch mean 0.75, unbiased std 0.5
    rewards, ids = R([1.0, 0.0, 1.0, 1.0]), R([0, 0, 1, 1])
    assert compute_advantages(rewards, ids, "batch_std").tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-5)
    assert compute_advantages(rewards, ids, "whiten").tolist() == pytest.approx([0.5, -1.5, 0.5, 0.5], abs=1e-5)


def test_reinforce_and_sft():
    rewards = R([0.2, 0.9])
    assert compute_advantages(rewards, None, "reinforce").tolist() == pytest.approx([0.2, 0.9])
    assert compute_advantages(R([float("nan"), 0.0]), None, "sft").tolist() == [1.0, 1.0]


def test_nan_reward_is_left_out_of_the_baseline_and_gets_zero():
    # valid rewards 1, 0: mean 0.5, std sqrt(0.5) -> +-0.7071; the NaN one gets 0
    adv = compute_advantages(R([1.0, float("nan"), 0.0]), R([0, 0, 0]), "grpo")
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert adv.tolist() == pytest.approx([a, 0.0, -a])


def test_per_task_standardisation():
    # task 0 has rewards on a 0..10 scale, task 1 on 0..1; after per-task scaling both are unit-std
    rewards = R([10.0, 0.0, 10.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    groups = R([0, 0, 1, 1, 2, 2, 3, 3])
    tasks = R([0, 0, 0, 0, 1, 1, 1, 1])
    adv = compute_advantages(rewards, groups, "dr_grpo", task_ids=tasks, per_task=True)
    assert adv[:4].std().item() == pytest.approx(1.0, abs=1e-5)
    assert adv[4:].std().item() == pytest.approx(1.0, abs=1e-5)
    assert adv.tolist()[:4] == pytest.approx(adv.tolist()[4:], abs=1e-5)
    with pytest.raises(ValueError, match="task_ids"):
        compute_advantages(rewards, groups, "grpo", per_task=True)


def test_grpo_eps_differs_from_trl():
    # TRL 1.16 uses (R - mean)/(std + 1e-4); unigrad defaults to 1e-6 (DeepSeekMath, verl).
    rewards, ids = R([1.0, 0.0]), R([0, 0])
    std = math.sqrt(0.5)
    assert compute_advantages(rewards, ids, "grpo")[0].item() == pytest.approx(0.5 / (std + 1e-6), rel=1e-7)
    assert compute_advantages(rewards, ids, "grpo", eps=1e-4)[0].item() == pytest.approx(0.5 / (std + 1e-4), rel=1e-7)


@pytest.mark.parametrize("method", ["grpo", "batch_std", "whiten"])
def test_large_rewards_are_standardised_like_small_ones(method):
    """Scale-free estimators give the same advantages for rewards x 1e20 (in float32 the group's squared deviations
    overflow to inf and the advantages silently become 0)."""
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.0, 2.0, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    small = compute_advantages(rewards, groups, method)
    large = compute_advantages(rewards * 1e20, groups, method)
    assert small.abs().min() > 0.1 and small.dtype == large.dtype == torch.float32
    torch.testing.assert_close(large, small)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpoo'.*grpo, dr_grpo"):
        compute_advantages(R([1.0]), None, "grpoo")
    with pytest.raises(ValueError, match="1-D"):
        compute_advantages(R([[1.0]]), None, "grpo")
    with pytest.raises(ValueError, match="group_ids shape"):
        compute_advantages(R([1.0, 2.0]), R([0]), "grpo")
