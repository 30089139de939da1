"""Learning-rate schedule: warmup, then constant / linear / cosine decay to a floor, as the learner applies it."""

import math

import pytest
import torch

from unigrad.config import ConfigError, OptimSection, validate_config
from unigrad.train.learning.learner import Learner
from unigrad.train.learning.schedule import lr_multiplier


def test_multipliers_by_hand():
    # warmup 2 steps, decay over steps 2..6 (4 steps), floor 0.1
    cos = [lr_multiplier(s, warmup=2, total=6, schedule="cosine", min_ratio=0.1) for s in range(8)]
    half = 0.5 * (1 + math.cos(math.pi / 4))  # a quarter of the way: 0.8536
    assert cos == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.9 * half, 0.55, 0.1 + 0.9 * (1 - half), 0.1, 0.1])
    lin = [lr_multiplier(s, warmup=2, total=6, schedule="linear") for s in range(8)]
    assert lin == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert [lr_multiplier(s, warmup=3) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert lr_multiplier(10**6, total=5, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_multiplier(3, schedule="step")


def test_learner_follows_the_schedule_and_a_skipped_step_does_not_advance_it():
    model = torch.nn.Linear(3, 1)
    learner = Learner(model, OptimSection(lr=0.1, schedule="linear", min_lr_ratio=0.2), total_steps=4)
    seen = []
    for step in range(6):
        model.weight.grad = torch.full_like(model.weight, float("nan") if step == 2 else 1.0)
        _, status = learner.clip_and_step()
        seen.append((status, round(learner.lr, 6)))
    # after k ok steps the lr is 0.1 * (0.2 + 0.8 * (1 - k / 4)); the non-finite step 3 changes nothing
    assert seen == [("ok", 0.08), ("ok", 0.06), ("nonfinite", 0.06), ("ok", 0.04), ("ok", 0.02), ("ok", 0.02)]


def test_config_checks_the_schedule_keys():
    assert validate_config({"optim": {"schedule": "cosine", "min_lr_ratio": 0.1}}).optim.schedule == "cosine"
    with pytest.raises(ConfigError, match="optim.schedule"):
        validate_config({"optim": {"schedule": "exponential"}})
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        validate_config({"optim": {"min_lr_ratio": 1.5}})
