"""Stability alarms fire on planted conditions and stay quiet on a healthy run; a run that stops
itself leaves a checkpoint."""

import json
import math
import random

import pytest

from unigrad.diagnostics.monitors import StabilityMonitor


def healthy(step: int, rng: random.Random) -> dict[str, float]:
    return {"grad_norm": 1.0 + 0.3 * rng.random(), "rl/entropy": 0.8 + 0.05 * rng.random(),
            "rl/clip/region_fraction": 0.02 * rng.random(), "mismatch/kl_k3": 1e-4 * rng.random(),
            "skipped/nonfinite": 0.0, "skipped/grad_cap": 0.0}


def test_quiet_on_a_healthy_run():
    rng = random.Random(0)
    mon = StabilityMonitor()
    assert [a for step in range(1, 301) for a in mon.check(step, healthy(step, rng))] == []


@pytest.mark.parametrize("planted, alarm", [
    ({"mismatch/kl_k3": 0.08}, "mismatch_kl"),
    ({"grad_norm": 9.0}, "grad_spike"),
    ({"rl/entropy": 0.05}, "entropy_collapse"),
    ({"rl/clip/region_fraction": 0.35}, "clip_fraction"),
    ({"skipped/nonfinite": 1.0, "skipped/nonfinite_loss": 1.0, "grad_norm": math.nan}, "nonfinite"),
    ({"skipped/grad_cap": 1.0}, "grad_cap"),
])
def test_each_alarm_fires_on_its_planted_condition(planted, alarm):
    rng = random.Random(1)
    mon = StabilityMonitor()
    for step in range(1, 31):
        assert mon.check(step, healthy(step, rng)) == []
    fired = mon.check(31, {**healthy(31, rng), **planted})
    assert [a.name for a in fired] == [alarm] and fired[0].step == 31
    if alarm == "nonfinite":
        assert "non-finite loss" in fired[0].message and mon.nonfinite_steps == 1


def test_grad_spike_needs_history_and_state_resumes():
    mon = StabilityMonitor(warmup_steps=10)
    assert mon.check(1, {"grad_norm": 100.0}) == []  # no history yet: no spike
    for step in range(2, 12):
        mon.check(step, {"grad_norm": 1.0})
    state = json.loads(json.dumps(mon.state_dict()))
    other = StabilityMonitor(warmup_steps=10)
    other.load_state_dict(state)
    assert [a.name for a in other.check(12, {"grad_norm": 50.0})] == ["grad_spike"]


def test_beta_zero_warning_only_for_long_runs():
    assert [a.name for a in StabilityMonitor.start_alarms(0.0, 5000, 1000)] == ["beta_zero"]
    assert StabilityMonitor.start_alarms(0.001, 5000, 1000) == []
    assert StabilityMonitor.start_alarms(0.0, 500, 1000) == []
