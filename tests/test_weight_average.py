"""The moving average of the weights kept for the final model (optim.weight_ema_decay)."""

import pytest
import torch

from unigrad.config import ConfigError, OptimSection, validate_config
from unigrad.train.learning.learner import Learner
from unigrad.train.learning.weight_average import WeightAverage


def test_average_is_the_normalised_weighted_sum_of_every_steps_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    d = 0.7
    learner = Learner(model, OptimSection(lr=0.05, weight_ema_decay=d, schedule="constant"))
    seen = []  # the weights after each optimizer step that changed them
    for step in range(5):
        model.weight.grad = torch.full_like(model.weight, float("nan")) if step == 2 else torch.randn(2, 3)
        model.bias.grad = torch.randn(2)
        _, status = learner.clip_and_step()
        if status == "ok":
            seen.append([p.detach().clone() for p in model.parameters()])
    t = len(seen)
    assert t == 4 and learner.weight_average.steps == 4  # the skipped step folds nothing in
    coeffs = [d ** (t - i) * (1 - d) / (1 - d ** t) for i in range(1, t + 1)]
    assert sum(coeffs) == pytest.approx(1.0)
    expected = [sum(c * w[j] for c, w in zip(coeffs, seen, strict=True)) for j in range(2)]
    averaged = learner.weight_average.averaged()
    for a, e in zip(averaged, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    live = [p.detach().clone() for p in model.parameters()]
    assert not torch.equal(live[0], averaged[0])
    learner.weight_average.copy_to_params()
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def test_before_any_step_the_average_is_the_live_weights_and_state_round_trips():
    model = torch.nn.Linear(2, 2)
    avg = WeightAverage(list(model.parameters()), 0.9)
    assert all(torch.equal(a, p) for a, p in zip(avg.averaged(), model.parameters(), strict=True))
    avg.update()
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update()
    other = WeightAverage(list(torch.nn.Linear(2, 2).parameters()), 0.9)
    other.load_state_dict(avg.state_dict())
    # other's parameters differ, but the average it reports is rebuilt from the loaded state
    assert other.steps == 2 and torch.equal(other.ema[0], avg.ema[0])
    with pytest.raises(ValueError, match="cannot be loaded"):
        WeightAverage([model.weight], 0.9).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="optim.weight_ema_decay=0.9"):
        WeightAverage(list(model.parameters()), 0.99).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage([model.weight], 1.0)


def test_config_checks_the_decay():
    assert validate_config({"optim": {"weight_ema_decay": 0.99}}).optim.weight_ema_decay == 0.99
    with pytest.raises(ConfigError, match="optim.weight_ema_decay"):
        validate_config({"optim": {"weight_ema_decay": 1.0}})
    with pytest.raises(ConfigError, match="weight_ema_decay"):
        validate_config({"sharding": "fsdp", "optim": {"weight_ema_decay": 0.9}})
    assert Learner(torch.nn.Linear(2, 1), OptimSection(schedule="constant")).weight_average is None  # off by default
