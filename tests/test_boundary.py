"""The collapse-boundary section of a study (`unigrad.report.boundary`): the Wilson interval by hand, the accuracy
collapse and failure rules on crafted numbers, the section's checks, and the section rendered from crafted runs (a
GRPO line that fails at the middle dial value, a replay line that does not)."""

import json
import math

import pytest

from unigrad.report.boundary import Point, accuracy_collapses, boundary_section, failure_point, kl_bracket, wilson
from unigrad.report.multiplicity import holm
from unigrad.report.seeded_study import Study, StudySpec


def test_wilson_interval_by_hand():
    # 0 of 3: centre z²/2 / (3 + z²) = 1.9207 / 6.8415 = 0.2807, half the same: (0, 0.5615)
    assert wilson(0, 3) == (0.0, pytest.approx(0.5615, abs=1e-4))
    assert wilson(3, 3) == (pytest.approx(0.4385, abs=1e-4), 1.0)
    # 1 of 2: centre 0.5, half 1.96 / 5.8415 · sqrt(0.5 + 0.9604) = 0.4055
    low, high = wilson(1, 2)
    assert low == pytest.approx(0.0945, abs=1e-4) and high == pytest.approx(0.9055, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(4, 3)


def test_accuracy_collapse_is_below_half_the_control_or_stopped():
    # control mean 21 -> half 10.5: 10 collapsed, 11 not, an unevaluated stopped run collapsed
    assert accuracy_collapses([10.0, 11.0, float("nan")], [20.0, 22.0], [False, False, True]) == [True, False, True]
    assert accuracy_collapses([float("nan")], [20.0], [False]) == [False]
    with pytest.raises(ValueError, match="no control"):
        accuracy_collapses([1.0], [], [False])


def _point(dial, collapsed=0, runs=3, vs_control=None, x=None):
    return Point("GRPO", f"a{dial}", dial, (0.0, 0.0), dial if x is None else x, collapsed, runs, (0.0, 0.0),
                 vs_control, None)


def test_failure_rule_and_bracket():
    assert not _point(1, collapsed=1).fails
    assert _point(1, collapsed=2).fails
    assert _point(1, collapsed=1, runs=2).fails  # half counts
    lower, = holm({"x": [-5.0, -5.1, -4.9]})  # a consistent fall: rejected
    upper, = holm({"x": [5.0, 5.1, 4.9]})
    assert lower.rejected and upper.rejected
    assert _point(1, vs_control=lower).fails and not _point(1, vs_control=upper).fails
    noisy, = holm({"x": [-5.0, 3.0, -1.0]})
    assert not noisy.rejected and not _point(1, vs_control=noisy).fails
    line = [_point(0, runs=0, x=0.0), _point(0.3, x=0.02), _point(1, collapsed=3, x=0.25),
            _point(3, collapsed=3, x=1.2)]
    failing = failure_point(line)
    assert failing.dial == 1 and kl_bracket(line, failing) == (0.02, 0.25)
    assert kl_bracket(line[1:], line[1]) == (0.0, 0.02)  # failing at the first value: from 0
    assert failure_point(line[:2]) is None


def _spec(**kw):
    arms = {"control": {}, "grpo_s1": {"rollout.router_noise": 1.0}, "grpo_s3": {"rollout.router_noise": 3.0},
            "replay_s1": {"rollout.router_noise": 1.0, "rollout.routing_replay": True},
            "replay_s3": {"rollout.router_noise": 3.0, "rollout.routing_replay": True}}
    base = {"title": "t", "doc": "d.md", "steps": 2, "seeds": 3, "control": "control", "baseline": "control",
            "train": {"tasks": ["arithmetic"], "model": {"name": "unigrad-tiny-moe"}}, "arms": arms,
            "comparisons": [["replay_s1", "grpo_s1"], ["replay_s3", "grpo_s3"]],
            "boundary": {"dial": "rollout.router_noise", "lines": {"GRPO": ["control", "grpo_s1", "grpo_s3"],
                                                                   "replay": ["control", "replay_s1", "replay_s3"]}}}
    return StudySpec.model_validate({**base, **kw})


def test_boundary_section_checks():
    spec = _spec()
    with pytest.raises(ValueError, match="'nope' not an arm|nope not an arm"):
        _spec(boundary={"dial": "rollout.router_noise", "lines": {"GRPO": ["control", "nope"]}})
    with pytest.raises(ValueError, match="must increase"):
        _spec(boundary={"dial": "rollout.router_noise", "lines": {"GRPO": ["control", "grpo_s3", "grpo_s1"]}})
    with pytest.raises(ValueError, match="one declared `control`"):
        _spec(control=None)
    with pytest.raises(ValueError, match="at least two arms"):
        _spec(boundary={"dial": "rollout.router_noise", "lines": {"GRPO": ["control"]}})
    with pytest.raises(ValueError, match="not all on the first line"):
        _spec(arms={**spec.arms, "tis_s2": {"rollout.router_noise": 2.0}},
              boundary={"dial": "rollout.router_noise", "lines": {"GRPO": ["control", "grpo_s1"],
                                                                  "TIS": ["control", "tis_s2"]}})


def _fake(study, arm, seed, score, kl):
    run = study.run_dir(arm, seed)
    run.mkdir(parents=True)
    rows = [{"step": i + 1, "mismatch/kl_k3": kl, "reward/mean": 0.2, "time/step": 1.0} for i in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "study_eval_test.json").write_text(json.dumps({"mean": {"pass@1": score / 100}}))


def test_boundary_section_from_crafted_runs(tmp_path):
    study = Study(_spec(), tmp_path / "runs")
    scores = {"control": [20.0, 21.0, 22.0], "grpo_s1": [9.0, 8.0, 12.0], "grpo_s3": [2.0, 3.0, 1.0],
              "replay_s1": [20.5, 21.2, 21.9], "replay_s3": [19.0, 22.0, 20.0]}
    kls = {"control": 0.0, "grpo_s1": 0.25, "grpo_s3": 1.2, "replay_s1": 0.0, "replay_s3": 0.0}
    for arm, values in scores.items():
        for seed, score in enumerate(values):
            _fake(study, arm, seed, score, kls[arm] + 0.01 * seed)
    doc = tmp_path / "docs" / "page.md"
    doc.parent.mkdir()
    text = "\n".join(boundary_section(study, doc))
    # control mean 21: grpo_s1 has 9 and 8 below 10.5 -> 2 of 3 collapsed -> fails at sigma 1, whose reference KL is
    # the mean of grpo_s1's runs (0.25, 0.26, 0.27); the bracket starts at the control's KL (0.01 mean)
    assert "GRPO first fails at `rollout.router_noise` = 1: the boundary lies between a measured mismatch KL of " \
           "0.01 and 0.26" in text
    assert "| GRPO | 1 | 0.26 | 0.26 ± 0.025 | 2 of 3 (21–94%) |" in text
    assert "- replay: does not fail there (moves the boundary)" in text
    assert "| replay | 3 | 1.2 |" in text  # replay's points sit at the reference's KL, not at its own (0)
    assert (doc.parent / "page_boundary.png").stat().st_size > 0
    # without the section: nothing
    assert boundary_section(Study(_spec(boundary=None), tmp_path / "runs"), doc) == []
