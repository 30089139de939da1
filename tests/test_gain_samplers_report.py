"""Learning gain, the adaptive task samplers, Spearman correlation and the run report."""

import json
import math

import pytest

from unigrad.data.samplers import SamplerChoice, build_sampler
from unigrad.diagnostics.correlation import spearman
from unigrad.diagnostics.learning_gain import LearningGainTracker, learning_gain, learning_gain_series
from unigrad.report.run_report import build_report


def test_learning_gain_by_hand():
    r = [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]
    # t = 2, s = 2: mean(r3, r4) - mean(r0, r1) = 0.6 - 0.05
    assert learning_gain(r, 2, 2) == pytest.approx(0.55)
    assert math.isnan(learning_gain(r, 1, 2)) and math.isnan(learning_gain(r, 4, 2))
    # a step without a measurement is left out of its window
    assert learning_gain([0.2, None, 0.5, 1.0, float("nan")], 2, 2) == pytest.approx(1.0 - 0.2)
    assert [round(g, 6) if math.isfinite(g) else None for g in learning_gain_series(r, 1)] == \
        [None, 0.2, 0.3, 0.6, 0.6, None]
    with pytest.raises(ValueError):
        learning_gain(r, 2, 0)


def test_live_tracker_lags_by_s_and_resumes_exactly():
    rewards = [0.1 * i for i in range(12)]
    tracker = LearningGainTracker(["a"], s=2)
    logged = {}
    for step, v in enumerate(rewards, start=1):
        out = tracker.update(step, {"reward/a": v})
        if out:
            logged[step] = out["gain/a"]
        if step == 6:
            state = json.loads(json.dumps(tracker.state_dict()))
    assert min(logged) == 5  # 2s + 1 steps needed
    # logged at step t: the gain of step t - s, i.e. mean(r[t-1], r[t]) - mean(r[t-4], r[t-3]) = 0.3
    assert all(g == pytest.approx(0.3) for g in logged.values())
    resumed = LearningGainTracker(["a"], s=2)
    resumed.load_state_dict(state)
    again = {step: resumed.update(step, {"reward/a": rewards[step - 1]})["gain/a"] for step in range(7, 13)}
    assert again == {k: v for k, v in logged.items() if k >= 7}
    with pytest.raises(ValueError):
        LearningGainTracker(["b"], s=2).load_state_dict(state)


def test_gradient_sampler_follows_the_ema_with_exploration_and_resumes():
    s = build_sampler(SamplerChoice("gradient", ema_decay=0.5, exploration=0.2), [50, 50], ["a", "b"], seed=0)
    assert s.task_probabilities() == [0.5, 0.5]  # no measurement yet
    s.update({"grad/a/sq_norm": 3.0})
    assert s.task_probabilities() == [0.5, 0.5]  # b still unmeasured
    s.update({"grad/a/sq_norm": 5.0, "grad/b/sq_norm": 1.0})  # ema a = 0.5*3 + 0.5*5 = 4, b = 1
    assert s.task_probabilities() == pytest.approx([0.8 * 4 / 5 + 0.1, 0.8 * 1 / 5 + 0.1])
    s.update({"grad/a/sq_norm": float("nan")})  # non-finite values are ignored
    assert s.task_probabilities() == pytest.approx([0.74, 0.26])
    state = s.state_dict()
    draws = s.sample(30)
    other = build_sampler(SamplerChoice("gradient", ema_decay=0.5, exploration=0.2), [50, 50], ["a", "b"], seed=5)
    other.load_state_dict(state)
    assert other.sample(30) == draws
    counts = [t for t, _ in build_sampler("size", [30, 10], ["a", "b"]).sample(4000)]
    assert counts.count(0) / 4000 == pytest.approx(0.75, abs=0.03)


def test_learning_progress_sampler_uses_absolute_gain():
    s = build_sampler(SamplerChoice("learning_progress", ema_decay=0.0, exploration=0.0), [5, 5, 5], ["a", "b", "c"])
    s.update({"gain/a": -0.3, "gain/b": 0.1, "gain/c": 0.0})
    assert s.task_probabilities() == pytest.approx([0.75, 0.25, 0.0])
    with pytest.raises(ValueError, match="task_weights"):
        build_sampler("gradient", [5, 5], ["a", "b"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("fancy", [5], ["a"])
    with pytest.raises(ValueError, match="checkpoint holds"):
        build_sampler("uniform", [5, 5, 5], ["a", "b", "c"]).load_state_dict(s.state_dict())


def test_spearman_against_hand_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == (pytest.approx(1.0), 4)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    # ties: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4) -> rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4])[0] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    rho, n = spearman([1, float("nan"), 3, None, 5], [2, 1, 4, 0, 6])
    assert n == 3 and rho == pytest.approx(1.0)
    assert math.isnan(spearman([1, 2], [1, 2])[0]) and math.isnan(spearman([1, 1, 1], [1, 2, 3])[0])


def test_report_from_a_metrics_file_with_a_partial_last_line(tmp_path):
    rows = []
    for step in range(1, 41):
        row = {"step": step}
        for k, (name, scale) in enumerate((("a", 10.0), ("b", 0.5))):
            row[f"reward/{name}"] = 0.1 + 0.01 * step * (k + 1)
            row[f"grad/{name}/sq_norm"] = scale * (1 + 0.01 * step)
            row[f"grad/{name}/cross_sq_norm"] = scale / 2
            row[f"grad/{name}/share"] = 0.5
            row[f"advantage_abs/{name}"] = 0.3
            row[f"prompt_length/{name}"] = 10 + k
            row[f"response_length/{name}"] = 5.0 + step
        row["grad/sq_norm_ratio"] = 20.0
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 41, "rew')
    (tmp_path / "config.yaml").write_text("diagnostics:\n  gain_window: 3\n")
    page = build_report(tmp_path)
    text = page.read_text()
    assert "data:image/png;base64," in text and "20.0x" in text  # images inline; imbalance ratio 10/0.5
    for png in ("grad_sq_norm.png", "sq_norm_ratio.png", "learning_gain.png", "reward.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert summary["steps"] == 40
    within_a = {r["variable"]: r for r in summary["correlations"] if r["scope"] == "within a"}
    # sq_norm and reward both rise with the step: rho = 1 over all 40 steps
    assert within_a["reward"]["rho"] == pytest.approx(1.0) and within_a["reward"]["n"] == 40
    assert within_a["learning gain"]["n"] == 40 - 2 * 3  # the gain is undefined s steps from each end
    across = {r["variable"]: r for r in summary["correlations"] if r["scope"] == "across tasks (run means)"}
    assert across["reward"]["n"] == 2 and across["reward"]["rho"] is None  # 2 points: no rho (null)
