"""Holm's adjustment over a study's comparisons (p-values and intervals by hand, from closed forms of Student's t
with 1 and 2 degrees of freedom), the collapse rule against a control arm on crafted reward curves, and both wired
into a study's page and verdicts."""

import json
import math

import pytest

from unigrad.report.multiplicity import holm, holm_adjust, paired_t
from unigrad.report.preregistration import FileHistory
from unigrad.report.seeded_study import Study, StudySpec
from unigrad.report.seeds import collapsed, t975
from unigrad.report.study_verdicts import (
    adjusted_comparisons,
    comparison_pairs,
    holm_section,
    scores_from_page,
    verdict_table,
)
from unigrad.report.t_distribution import incomplete_beta, t_quantile_two_sided, t_two_sided_p


def test_t_distribution_against_closed_forms_and_tables():
    # df 1 (Cauchy): P(|T| >= t) = 1 - 2 atan(t) / pi; df 2: P(|T| >= t) = 1 - t / sqrt(2 + t^2)
    for t in (0.3, 1.0, 4.0, 30.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    for df in (1, 2, 4, 9, 30):  # the two-sided 95% quantile is the table's t(0.975, df)
        assert t_quantile_two_sided(0.95, df) == pytest.approx(t975(df), abs=1e-4)
    # df 2 inverts in closed form: t = sqrt(2 L^2 / (1 - L^2)) at level L
    assert t_quantile_two_sided(0.975, 2) == pytest.approx(math.sqrt(2 * 0.975 ** 2 / (1 - 0.975 ** 2)), rel=1e-9)
    assert incomplete_beta(0.3, 1, 1) == pytest.approx(0.3)  # I_x(1, 1) = x
    assert incomplete_beta(0.3, 2, 1) == pytest.approx(0.09)  # I_x(a, 1) = x^a
    with pytest.raises(ValueError):
        t_quantile_two_sided(1.0, 3)


def test_paired_t_by_hand():
    test = paired_t([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3), df 2
    t = 2 * math.sqrt(3)
    assert (test.n, test.mean, test.se) == (3, 2.0, pytest.approx(1 / math.sqrt(3)))
    assert test.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert paired_t([0.0, 0.0, 0.0]).p == 1.0  # identical runs: nothing to find
    assert math.isnan(paired_t([1.5]).p)
    with pytest.raises(ValueError, match="no finite"):
        paired_t([float("nan")])


def test_holm_step_down_on_hand_computed_p_values():
    # m = 4: sorted 0.005 (<= .05/4), 0.01 (<= .05/3), 0.03 (> .05/2: stop), 0.04 kept with it
    steps = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert [s.rank for s in steps] == [2, 4, 3, 1]
    assert [s.rejected for s in steps] == [True, False, False, True]
    assert [s.p_adjusted for s in steps] == pytest.approx([0.03, 0.06, 0.06, 0.02])  # running max of (m-i+1) p
    assert [s.level for s in steps] == pytest.approx([1 - 0.05 / 3, 0.975, 0.975, 1 - 0.05 / 4])
    # the first fails, so nothing after it is rejected, though 0.04 <= 0.05 / 1 on its own
    steps = holm_adjust([0.02, 0.03, 0.04])
    assert not any(s.rejected for s in steps)
    assert [s.p_adjusted for s in steps] == pytest.approx([0.06, 0.06, 0.06])
    assert all(s.level == pytest.approx(1 - 0.05 / 3) for s in steps)
    assert holm_adjust([float("nan"), 0.001])[0].rejected is False
    with pytest.raises(ValueError):
        holm_adjust([0.1], alpha=0)


def test_holm_intervals_agree_with_the_decisions():
    # b = [3, 4, 5]: t = 4 sqrt(3), p = 1 - t / sqrt(2 + t^2) = 0.0202 <= .05 / 2: rejected, tested at 97.5%;
    # a = [1, 2, 3]: p = 0.0742 > .05: kept, at 95%
    a, b = holm({"a": [1.0, 2.0, 3.0], "b": [3.0, 4.0, 5.0]})
    tb = 4 * math.sqrt(3)
    assert b.test.p == pytest.approx(1 - tb / math.sqrt(2 + tb * tb))
    assert (b.rejected, b.level, b.p_adjusted) == (True, pytest.approx(0.975), pytest.approx(2 * b.test.p))
    assert (a.rejected, a.level, a.p_adjusted) == (False, pytest.approx(0.95), pytest.approx(a.test.p))
    t2 = math.sqrt(2 * 0.975 ** 2 / (1 - 0.975 ** 2))  # t at two-sided 97.5%, df 2
    assert b.half_width() == pytest.approx(t2 / math.sqrt(3)) and b.half_width(adjusted=False) == pytest.approx(
        4.3027 / math.sqrt(3), rel=1e-4)
    assert b.test.mean - b.half_width() > 0 and a.test.mean - a.half_width() < 0
    lines = verdict_table([a, b])
    assert lines[2].endswith("includes 0 |") and lines[3].endswith("excludes 0 |")


def test_collapse_is_judged_against_the_control_from_step_1():
    control = [[0.30] * 30, [0.28] * 30, [0.32] * 30]  # mean 0.30
    assert collapsed([0.3, 0.3] + [0.0] * 28, control)  # a crash at step 3 counts
    assert collapsed([0.0] * 30, control)  # so does a run that never rose (the old rule never counted it)
    assert collapsed([0.3, 0.0, 0.0], control)  # stopped at step 3: its mean 0.1 < half of 0.30 at step 3
    assert not collapsed([0.3, 0.3, 0.2], control)  # 0.267 at step 3: not below 0.15
    decline = [0.30 - 0.009 * i for i in range(30)]  # ends at 0.039: far below half its own peak ...
    shared = [[x * f for x in decline] for f in (0.9, 1.0, 1.1)]
    assert not collapsed([0.95 * x for x in decline], shared)  # ... but the control declined with it
    assert collapsed([0.4 * x for x in decline], shared)  # below half of the control at the end
    assert not collapsed([float("nan")] * 5, control)
    with pytest.raises(ValueError, match="control"):
        collapsed([0.1], [])


def _write(path, name, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(text)


def test_the_study_tests_its_comparisons_together_and_judges_collapses_against_its_control(tmp_path):
    spec = StudySpec.model_validate({
        "title": "t", "doc": "d.md", "steps": 2, "seeds": 3, "train": {"tasks": ["arithmetic"]},
        "arms": {"base": {}, "x": {"objective": "gspo"}, "y": {"objective": "sapo"}}, "baseline": "base",
        "comparisons": [["x", "y"], ["x", "base"]], "control": "base"})
    study = Study(spec, tmp_path)
    assert comparison_pairs(study) == [("x", "base"), ("y", "base"), ("x", "y")]  # x - base counted once
    scores = {"base": [0.30, 0.32, 0.31], "x": [0.33, 0.36, 0.33], "y": [0.30, 0.33, 0.33]}
    for arm, values in scores.items():
        for seed, v in enumerate(values):
            _write(study.run_dir(arm, seed), "study_eval_test.json", json.dumps({"mean": {"pass@1": v}}))
            reward = [0.3] * 20 if arm != "y" or seed else [0.3, 0.3] + [0.0] * 18
            _write(study.run_dir(arm, seed), "metrics.jsonl", "".join(json.dumps({"reward/mean": r}) + "\n"
                                                                      for r in reward))
    # x - base: (3, 4, 2) points; y - base: (0, 1, 2); x - y: (3, 3, 0); three comparisons, Holm over all
    expected = adjusted_comparisons([("x", "base"), ("y", "base"), ("x", "y")],
                                    {"base": [30, 32, 31], "x": [33, 36, 33], "y": [30, 33, 33]})
    section = "\n".join(holm_section(study))
    assert "The 3 comparisons" in section
    for r in expected:
        assert f"| {r.name} | 3 | {r.test.mean:+.1f} ± {r.half_width(False):.1f} |" in section
    assert [r.level for r in expected] == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 3, 1 - 0.05 / 3])
    assert [study.is_collapsed("y", s) for s in range(3)] == [True, False, False]
    assert study.is_collapsed("base", 0) is None  # the control has no verdict against itself
    none = Study(StudySpec.model_validate({**spec.model_dump(), "control": None}), tmp_path)
    assert none.is_collapsed("y", 0) is None
    with pytest.raises(ValueError, match="control 'z' is not an arm"):
        StudySpec.model_validate({**spec.model_dump(), "control": "z"})


def test_collapse_on_held_out_accuracy_ignores_a_reward_low_from_step_1(tmp_path):
    """collapse_metric 'test pass@1': a run whose perturbed sampler earns little reward from step 1 is not collapsed
    when its held-out accuracy holds; one below half of the control's mean test pass@1 (0.31 / 2) is."""
    from unigrad.report.study_page import _collapse_rule

    spec = StudySpec.model_validate({
        "title": "t", "doc": "d.md", "steps": 2, "seeds": 3, "train": {"tasks": ["arithmetic"]},
        "arms": {"base": {}, "noisy": {"rollout.temperature": 2.0}}, "control": "base",
        "collapse_metric": "test pass@1"})
    study = Study(spec, tmp_path)
    for arm, values, reward in (("base", [0.30, 0.32, 0.31], 0.3), ("noisy", [0.29, 0.15, 0.16], 0.05)):
        for seed, v in enumerate(values):
            _write(study.run_dir(arm, seed), "study_eval_test.json", json.dumps({"mean": {"pass@1": v}}))
            _write(study.run_dir(arm, seed), "metrics.jsonl", "".join(json.dumps({"reward/mean": reward}) + "\n"
                                                                      for _ in range(20)))
    assert [study.is_collapsed("noisy", s) for s in range(3)] == [False, True, False]  # 0.15 < 0.155 <= 0.16
    (study.run_dir("noisy", 2) / "study_eval_test.json").unlink()
    assert study.is_collapsed("noisy", 2) is None  # not evaluated: no verdict (not "held up")
    by_reward = Study(StudySpec.model_validate({**spec.model_dump(), "collapse_metric": "reward/mean"}), tmp_path)
    assert [by_reward.is_collapsed("noisy", s) for s in range(3)] == [True, True, True]  # what the reward rule says
    assert "its test pass@1 ended below half of the control arm's mean" in _collapse_rule(spec)
    assert "its training reward (10-step trailing mean" in _collapse_rule(by_reward.spec)
    with pytest.raises(ValueError, match="add test to eval.splits"):
        StudySpec.model_validate({**spec.model_dump(), "eval": {"splits": ["validation"]}})


def test_scores_are_read_back_from_a_committed_page():
    text = "Start 24.2. Per seed (test pass@1): grpo 32.6, 30.6; gspo-moe 31.0, 26.3.\n\nPer task"
    assert scores_from_page(text) == {"grpo": [32.6, 30.6], "gspo-moe": [31.0, 26.3]}
    with pytest.raises(ValueError, match="Per seed"):
        scores_from_page("no seeds here")


def test_the_page_records_when_the_study_file_was_committed(tmp_path):
    import subprocess

    from unigrad.report.preregistration import file_history, parse_log, preregistration_line

    assert parse_log("bbb2222 2026-12-05\naaa1111 2026-12-03\n") == FileHistory("aaa1111", "2026-12-03", "bbb2222",
                                                                                "2026-12-05")
    assert parse_log("") is None
    with pytest.raises(ValueError, match="expected"):
        parse_log("nonsense\n")
    study = tmp_path / "s.yaml"
    study.write_text("title: t\n")
    assert "not committed" in preregistration_line(study)  # not even in a repository

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "before")
    git("add", "s.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "study file")
    first = git("rev-parse", "--short", "HEAD")
    assert file_history(study).first_commit == first == file_history(study).last_commit
    assert preregistration_line(study).startswith(f"Study file first committed at {first} (")
    study.write_text("title: t2\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "edit")
    last = git("rev-parse", "--short", "HEAD")
    history = file_history(study)
    assert (history.first_commit, history.last_commit) == (first, last)
    assert f"last changed at {last}" in preregistration_line(study)


def test_the_page_shows_holm_collapses_against_the_control_and_the_study_files_record(tmp_path):
    from unigrad.report.study_page import render

    source = tmp_path / "s.yaml"
    source.write_text("title: t\n")
    spec = StudySpec.model_validate({
        "title": "t", "doc": "d.md", "steps": 20, "seeds": 2, "train": {"tasks": ["arithmetic"]},
        "arms": {"base": {}, "x": {"objective": "gspo"}}, "baseline": "base", "control": "base"})
    study = Study(spec, tmp_path / "runs", source=source)
    per_prompt = {"arithmetic": {"pass@1": 0.5, "correct": [1, 0]}, "mean": {"pass@1": 0.5}}
    _write(study.start_dir("unigrad-tiny"), "study_eval_test.json", json.dumps(per_prompt))
    for arm, rewards in (("base", [0.3] * 20), ("x", [0.3, 0.3] + [0.0] * 18)):
        for seed in range(2):
            _write(study.run_dir(arm, seed), "study_eval_test.json", json.dumps(per_prompt))
            _write(study.run_dir(arm, seed), "metrics.jsonl", "".join(json.dumps({"reward/mean": r, "time/step": 1.0})
                                                                      + "\n" for r in rewards))
    page = render(study, "unigrad study s.yaml", tmp_path / "d.md")
    assert "| `x` − `base` | 2 |" in page and "after Holm" in page
    assert "| 2 of 2 |" in page and "| (control) |" in page  # x crashed at step 3: both seeds, against the control
    assert "Study file s.yaml: not committed" in page
