"""Seeded studies: the statistics over seeds (by hand), the run statistics read from metrics.jsonl, the study file's
checks, and one small study run end to end through the CLI (resumed without retraining)."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from unigrad.report.seeded_study import Study, StudySpec, arm_config, flat_overrides, load_study
from unigrad.report.seeds import mean_ci, moving_average, paired_difference, seed_averaged, t975


def test_t_quantiles_match_tables_and_join_the_normal():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(2) == pytest.approx(4.303, abs=1e-3)
    assert t975(4) == pytest.approx(2.776, abs=1e-3)
    # beyond the table: the expansion, against published values t(0.975, 40) = 2.0211, t(0.975, 120) = 1.9799
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)
    assert t975(31) < t975(30) and t975(10 ** 6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        t975(0)


def test_mean_ci_by_hand():
    mean, half = mean_ci([1.0, 2.0, 3.0])  # sd 1, se 1/sqrt(3), t(0.975, 2) = 4.3027
    assert mean == 2.0 and half == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert mean_ci([0.5, float("nan")]) == (0.5, pytest.approx(float("nan"), nan_ok=True))
    assert math.isnan(mean_ci([])[0])


def test_paired_difference_averages_seeds_per_prompt_first():
    a = [{"t": {"correct": [1, 1, 0, 0]}, "mean": {}}, {"t": {"correct": [1, 0, 0, 1]}, "mean": {}}]
    b = [{"t": {"correct": [0, 1, 0, 0]}, "mean": {}}]
    assert seed_averaged(a)["t"]["correct"] == [1.0, 0.5, 0.0, 0.5]
    # d = (1, -0.5, 0, 0.5): mean 0.25, sample variance (0.5625 + 0.5625 + 0.0625 + 0.0625) / 3 = 5/12
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(5 / 12 / 4))
    with pytest.raises(ValueError, match="different numbers of prompts"):
        seed_averaged([a[0], {"t": {"correct": [1]}, "mean": {}}])


def test_moving_average_is_trailing_and_skips_missing_values():
    assert moving_average([1, float("nan"), 3, 5], 2) == [1, 1, 2, 4]
    # the collapse rule built on it is tested against a control in test_study_verdicts.py


def _fake_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _spec(**kw):
    return StudySpec.model_validate({"title": "t", "doc": "d.md", "steps": 2, "train": {"tasks": ["arithmetic"]},
                                     "arms": {"a": {}, "b": {"objective": "gspo"}}, **kw})


def test_run_statistics_from_metrics(tmp_path):
    study = Study(_spec(seeds=1), tmp_path)
    rows = [{"step": i + 1, "grad_norm": g, "time/step": 6.0} for i, g in enumerate([1, 1, 1, 2, 2, 2, 4, 4, 4, 8])]
    rows[4]["alarm/grad_spike"] = 1.0
    rows[9]["alarm/grad_spike"] = 1.0
    _fake_run(study.run_dir("a", 0), rows)
    assert study.column("a", 0, "mean(grad_norm)") == pytest.approx(2.9)
    assert study.column("a", 0, "max(grad_norm)") == 8
    assert study.column("a", 0, "median(grad_norm)") == 2  # sorted: 1 1 1 2 2 2 4 4 4 8
    assert study.column("a", 0, "sum(grad_norm)") == 29
    assert study.column("a", 0, "last(grad_norm)") == 8  # the last tenth: one step
    assert study.column("a", 0, "growth(grad_norm)") == pytest.approx((4 + 4 + 8) / 3 / 1)  # last third / first
    assert study.column("a", 0, "alarms(grad_spike)") == 2
    assert study.column("a", 0, "count(grad_norm)") == 10
    assert math.isnan(study.column("a", 0, "mean(rl/never_logged)"))
    assert study.train_minutes("a", 0) == pytest.approx(1.0)


def test_study_file_checks():
    with pytest.raises(ValueError, match="train.max_steps: set by the study"):
        _spec(train={"max_steps": 5})
    with pytest.raises(ValueError, match="baseline 'c' is not an arm"):
        _spec(baseline="c")
    with pytest.raises(ValueError, match="baseline 'c' is not an arm"):
        _spec(baseline={"unigrad-tiny": "a", "unigrad-tiny-moe": "c"})
    per_model = Study(_spec(baseline={"unigrad-tiny": "a"}, arms={"a": {}, "b": {"objective": "gspo"},
                                                                   "m": {"model.name": "unigrad-tiny-moe"}}), ".")
    assert [per_model.baseline_of(a) for a in ("a", "b", "m")] == ["a", "a", None]
    with pytest.raises(ValueError, match="stat\\(metric\\)"):
        _spec(columns={"x": "mode(grad_norm)"})
    with pytest.raises(ValueError, match="from 'z' is not an arm"):
        _spec(arms={"a": {"from": "z"}})
    with pytest.raises(ValueError, match="a cycle of from"):
        _spec(arms={"a": {"from": "b"}, "b": {"from": "a"}})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        _spec(arms={"a": {"steps": 0}})
    staged = _spec(arms={"a": {"model.name": "m0"}, "b": {"from": "a", "objective": "sft", "steps": 5}})
    assert arm_config(staged, "b")["max_steps"] == 5 and arm_config(staged, "a")["max_steps"] == 2
    assert arm_config(staged, "b")["model"]["name"] == "m0" and "from" not in arm_config(staged, "b")
    assert Study(staged, ".").jobs() == [[("a", 0), ("a", 1), ("a", 2)], [("b", 0), ("b", 1), ("b", 2)]]
    with pytest.raises(ValueError, match="arm name"):
        _spec(arms={"a/b": {}})
    with pytest.raises(ValueError, match="'c' is not an arm"):
        _spec(comparisons=[["a", "c"]])
    with pytest.raises(ValueError, match="expected two arms"):
        _spec(comparisons=[["a", "b", "a"]])
    with pytest.raises(ValueError, match="compared with itself"):
        _spec(comparisons=[["a", "a"]])
    with pytest.raises(ValueError, match="extra"):
        _spec(sedes=3)
    assert flat_overrides({"optim": {"lr": 1e-4}, "tasks": ["a", "b"], "objective": "gspo"}) == [
        "optim.lr=0.0001", "tasks=[a, b]", "objective=gspo"]


def test_every_shipped_study_file_is_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "examples" / "studies").glob("*.yaml"))
    assert files
    for f in files:
        spec = load_study(f)
        assert spec.doc.startswith("docs/"), f
        for arm in spec.arms:  # every arm's config is a valid training config
            from unigrad.config import validate_config
            from unigrad.report.seeded_study import arm_config

            validate_config(arm_config(spec, arm))


def test_curves_smooth_dense_metrics_and_show_sparse_ones_where_logged():
    from unigrad.report.study_page import curve_points

    nan = float("nan")
    dense = [[1.0, 3.0, 5.0, 7.0], [3.0, 5.0, 7.0, 9.0]]  # window 2: 1, 2, 4, 6 and 3, 4, 6, 8
    assert curve_points(dense, 2) == ([1, 2, 3, 4], [2.0, 3.0, 5.0, 7.0], [1.0, 2.0, 4.0, 6.0],
                                      [3.0, 4.0, 6.0, 8.0], False)
    # An evaluation every third step: its points as logged, not a trailing mean that reaches back to step 3.
    sparse = [[nan, nan, 0.30, nan, nan, 0.50], [nan, nan, 0.40, nan, nan, 0.60]]
    assert curve_points(sparse, 10) == ([3, 6], [0.35, 0.55], [0.30, 0.50], [0.40, 0.60], True)


@pytest.mark.slow  # 128 s (timed at load average 5-7 on 2 cores)
def test_a_small_study_end_to_end_and_resumed(tmp_path, small_model):
    spec = {
        "title": "smoke", "doc": "docs/smoke.md", "question": "does it run?", "seeds": 2, "steps": 2,
        "eval": {"prompts": 4, "splits": ["validation", "test"]}, "baseline": "grpo",
        "train": {"model": {"name": str(small_model)}, "tasks": ["arithmetic"], "prompts_per_step": 2,
                  "micro_batch_size": 4, "rollout": {"num_generations": 2, "max_new_tokens": 4},
                  "eval": {"before_after": False}, "save_every": 0, "tensorboard": False},
        "arms": {"grpo": {"objective": "grpo"}, "gspo": {"objective": "gspo", "optim.mini_batches": 2},
                 "then": {"from": "grpo", "objective": "dr_grpo", "steps": 1}},  # a staged method
        "columns": {"max grad norm": "max(grad_norm)"}, "curves": ["reward/mean"],
        "comparisons": [["gspo", "then"]],
    }
    f = tmp_path / "smoke.yaml"
    f.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "unigrad.cli", "study", str(f), "--out", str(tmp_path / "runs"),
           "--doc-root", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True)
    page = (tmp_path / "docs" / "smoke.md").read_text()
    assert (tmp_path / "docs" / "smoke_reward_mean.png").is_file()
    runs = tmp_path / "runs"
    assert yaml.safe_load((runs / "gspo" / "config.yaml").read_text())["optim"]["mini_batches"] == 2
    scores = [json.loads((runs / "gspo" / f"seed{s}" / "study_eval_test.json").read_text())["mean"]["pass@1"]
              for s in range(2)]
    mean, half = mean_ci(scores)
    expected = f"{100 * mean:.1f}" + (f" ± {100 * half:.1f}" if math.isfinite(half) else "")
    assert f"| `gspo` | {small_model} | {expected} |" in page
    then = [json.loads((runs / "then" / f"seed{s}" / "study_eval_test.json").read_text())["mean"]["pass@1"]
            for s in range(2)]
    mean, half = mean_ci([a - b for a, b in zip(scores, then, strict=True)])
    expected = f"{100 * mean:+.1f}" + (f" ± {100 * half:.1f}" if math.isfinite(half) else "")
    assert f"| `gspo` − `then` | {expected} |" in page  # a further comparison, paired by seed
    assert "2 seeds × 3 arms × 2 rollout steps (then: 1), staged: then starts from grpo's final weights" in page
    assert "Validation pass@1" in page
    assert "Study file smoke.yaml: not committed" in page  # the preregistration record (tmp_path is no repository)
    assert "comparisons this study makes" in page and "after Holm" in page
    start = json.loads(next((runs / "start").glob("*/study_eval_test.json")).read_text())
    assert f"| start: {small_model} | {100 * start['arithmetic']['pass@1']:.1f} |" in page  # per task, the start
    for seed in range(2):  # the second stage trained from the first stage's weights of its own seed, for its steps
        ran = yaml.safe_load((runs / "then" / f"seed{seed}" / "config.yaml").read_text())
        assert ran["model"]["name"] == str(runs / "grpo" / f"seed{seed}" / "final") and ran["max_steps"] == 1
        assert len((runs / "then" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()) == 1
    assert f"| `then` | {small_model} |" in page  # compared with the model its chain starts from
    assert (runs / "start").is_dir() and (runs / "grpo" / "seed1" / "study_eval_validation.json").is_file()
    page_marker = "<!-- notes"
    (tmp_path / "docs" / "smoke.md").write_text(page + "\nhand-written\n")
    before = (runs / "grpo" / "seed0" / "metrics.jsonl").stat().st_mtime
    subprocess.run(cmd, check=True, capture_output=True)  # everything is done: nothing retrains
    assert (runs / "grpo" / "seed0" / "metrics.jsonl").stat().st_mtime == before
    again = (tmp_path / "docs" / "smoke.md").read_text()
    assert page_marker in again and again.rstrip().endswith("hand-written")
    bad = subprocess.run([*cmd[:4], str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr
