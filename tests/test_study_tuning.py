"""Tuning a study on the validation split (`unigrad tune`): the tuning section's checks, the seed rule, the pick
rule on crafted validation results (a tie, a stopped run, pooled over arms), the table, the record and the study
runner training with the picked values, the study page's provenance line, and one tiny tuning end to end."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from unigrad.cli import main
from unigrad.report.seeded_study import Study, StudySpec, load_study
from unigrad.report.tuning import GridStudy, grid_scores, grid_spec, make_record, pick, picks
from unigrad.report.tuning_page import table_lines, write_tuning_table
from unigrad.report.tuning_record import (
    apply_record,
    load_tuned_study,
    provenance,
    read_record,
    record_path,
    write_record,
)
from unigrad.report.tuning_spec import TUNING_SEED_BASE, tuning_seeds

T975_1 = 12.7062  # t(0.975, 1 df), from tables


def _study(**changes):
    data = {"title": "t", "doc": "docs/studies/t.md", "seeds": 3, "steps": 10,
            "train": {"objective": "grpo", "optim": {"lr": 1e-4}},
            "arms": {"grpo": {"objective": "grpo"}, "gspo": {"objective": "gspo"}},
            "tuning": {"key": "optim.lr", "grid": [3e-5, 1e-4, 3e-4], "per": "arm", "seeds": 2, "steps": 4}}
    data.update(changes)
    return StudySpec.model_validate(data)


def test_the_tuning_section_is_checked():
    assert _study().tuning.grid == [3e-5, 1e-4, 3e-4]
    assert _study(tuning={"grid": [3e-4, 1e-4]}).tuning.grid == [1e-4, 3e-4]  # sorted; key optim.lr by default
    bad = [({"grid": [1e-4]}, "at least 2"), ({"grid": [1e-4, 1e-4]}, "given twice"),
           ({"grid": [0.0, 1e-4]}, "learning rate must be positive"), ({"grid": [1e-4, math.inf]}, "finite"),
           ({"grid": [1e-4, 3e-4], "split": "test"}, "tuning on the test split is refused"),
           ({"grid": [1e-4, 3e-4], "split": "train"}, "unknown split"),
           ({"grid": [1e-4, 3e-4], "key": "seed"}, "the study sets that"),
           ({"grid": [1e-4, 3e-4], "per": "seed"}, "per"), ({"grid": [1e-4, 3e-4], "seed": 2}, "Extra inputs")]
    for tuning, message in bad:
        with pytest.raises(ValueError, match=message):
            _study(tuning=tuning)
    for arm in ({"optim.lr": 1e-3}, {"optim": {"lr": 1e-3}}):  # an arm that sets the tuned key itself
        with pytest.raises(ValueError, match="sets it itself"):
            _study(arms={"a": arm})
    staged = {"a": {}, "b": {"from": "a"}, "c": {"from": "a"}}  # two tuned arms start from tuned a: whose pick?
    with pytest.raises(ValueError, match="tuned arm 'a' is the start of b and c"):
        _study(arms=staged, tuning={"grid": [1e-4, 3e-4]})
    _study(arms=staged, tuning={"grid": [1e-4, 3e-4], "fixed": ["a"]})  # a fixed start: fine
    _study(arms={"a": {}, "b": {"from": "a"}}, tuning={"grid": [1e-4, 3e-4]})  # one stage: fine
    with pytest.raises(ValueError, match="tuning.steps with tuned stages"):  # each stage would train 4 steps
        _study(arms={"a": {}, "b": {"from": "a"}})
    for fixed, message in ((["z"], "'z' is not an arm"), (["b"], "starts from 'a', which is tuned"),
                           (["a", "b", "c"], "every arm is fixed")):
        with pytest.raises(ValueError, match=message):
            _study(arms=staged, tuning={"grid": [1e-4, 3e-4], "fixed": fixed})
    _study(arms={"a": {"optim": {"mini_batches": 4}}})  # another key of the same section is fine


def test_tuning_seeds_never_meet_the_study_seeds(tmp_path):
    assert tuning_seeds(3) == [1000, 1001, 1002] and TUNING_SEED_BASE == 1000
    with pytest.raises(ValueError, match="less than 1000"):
        _study(seeds=1000)
    spec = _study(seeds=999)
    grid = GridStudy(grid_spec(spec), tmp_path)
    launched = {(arm, grid.run_config(arm, seed)["seed"], grid.run_config(arm, seed)["optim"]["lr"],
                 grid.run_config(arm, seed)["max_steps"]) for wave in grid.jobs() for arm, seed in wave}
    assert {seed for _, seed, _, _ in launched} == {1000, 1001}
    assert {seed for _, seed, _, _ in launched}.isdisjoint(range(spec.seeds))
    assert len(launched) == 2 * 3 * 2  # arms x grid x seeds
    assert ("gspo+0.0003", 1000, 3e-4, 4) in launched and ("grpo+3e-05", 1001, 3e-5, 4) in launched
    assert grid.spec.eval.splits == ["validation"] and grid.spec.baseline is None


def test_the_pick_rule():
    nan = math.nan
    assert pick({3e-5: [0.30, 0.32], 1e-4: [0.35, 0.33], 3e-4: [0.31, 0.30]}) == 1e-4
    assert pick({1e-4: [0.30, 0.40], 3e-4: [0.40, 0.30]}) == 1e-4  # a tie: the smaller value
    assert pick({1e-4: [0.30, 0.40], 3e-5: [0.40, 0.30]}) == 3e-5
    assert pick({1e-4: [0.30, 0.32], 3e-4: [0.90, nan]}) == 1e-4  # a stopped run makes its value ineligible
    with pytest.raises(ValueError, match="no grid value"):
        pick({1e-4: [nan, 0.3], 3e-4: [nan, nan]})
    spec = _study(tuning={"grid": [1e-4, 3e-4], "per": "study"})
    scores = {"grpo": {1e-4: [0.50, 0.50], 3e-4: [0.45, 0.45]},  # grpo prefers 1e-4 by 0.05
              "gspo": {1e-4: [0.20, 0.20], 3e-4: [0.30, 0.30]}}  # gspo prefers 3e-4 by 0.10: pooled 0.35 < 0.375
    assert picks(spec, scores) == {"grpo": 3e-4, "gspo": 3e-4}
    assert picks(_study(tuning={"grid": [1e-4, 3e-4]}), scores) == {"grpo": 1e-4, "gspo": 3e-4}


def _fake_grid_runs(grid: GridStudy, scores: dict[str, dict[float, list[float]]]) -> None:
    """The files a grid run leaves: its validation evaluation and one metrics row, and the start's evaluation."""
    for arm, by_value in scores.items():
        for value, xs in by_value.items():
            for seed, x in zip(grid.seeds(), xs, strict=True):
                run = grid.run_dir(f"{arm}+{value:g}", seed)
                run.mkdir(parents=True)
                (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 30.0}) + "\n")
                if math.isnan(x):
                    (run / "study_status.json").write_text(json.dumps({"stopped": "exit 3"}))
                else:
                    (run / "study_eval_validation.json").write_text(json.dumps({"mean": {"pass@1": x}}))
    start = grid.start_dir("unigrad-tiny")
    start.mkdir(parents=True)
    (start / "study_eval_validation.json").write_text(json.dumps({"mean": {"pass@1": 0.25}}))


def test_table_record_and_the_study_trained_with_the_picks(tmp_path):
    study_file = tmp_path / "t.yaml"
    spec = _study()
    study_file.write_text(yaml.safe_dump(spec.model_dump(exclude_none=True)))
    spec = load_study(study_file)
    grid = GridStudy(grid_spec(spec), tmp_path / "runs")
    crafted = {"grpo": {3e-5: [0.30, 0.32], 1e-4: [0.35, 0.33], 3e-4: [0.40, math.nan]},
               "gspo": {3e-5: [0.20, 0.22], 1e-4: [0.25, 0.27], 3e-4: [0.29, 0.31]}}
    _fake_grid_runs(grid, crafted)
    scores = grid_scores(spec, grid)
    assert scores["grpo"][1e-4] == [0.35, 0.33] and math.isnan(scores["grpo"][3e-4][1])
    record = make_record(spec, picks(spec, scores), f"unigrad tune {study_file}", "abc1234")
    assert record["picks"] == {"grpo": 1e-4, "gspo": 3e-4} and record["seeds"] == [1000, 1001]
    lines = table_lines(spec, scores, record)
    half = 100 * T975_1 * 0.01 * math.sqrt(2) / math.sqrt(2)  # two seeds 0.02 apart: sd 0.01 * sqrt(2)
    assert lines[2] == (f"| `grpo` | 31.0 ± {half:.1f} | **34.0 ± {half:.1f}** | 40.0 (1 of 2 runs stopped or "
                        "missing: not eligible) | 0.0001 |")
    assert lines[3].startswith("| `gspo` | 21.0 ± ") and lines[3].endswith("| **30.0 ± 12.7** | 0.0003 |")
    table = write_tuning_table(spec, grid, scores, record, tmp_path)
    text = table.read_text()
    assert table == tmp_path / "docs" / "studies" / "t_tuning.md"
    assert "`unigrad tune " in text and "commit abc1234" in text and "**validation** split" in text
    assert "seeds 1000-1001" in text and "seeds 0 .. 2" in text and "unigrad-tiny 25.0" in text
    assert "12 tuning runs: 6 min" in text  # 12 runs x one 30 s step
    write_record(study_file, record)
    assert record_path(study_file) == tmp_path / "tuned" / "t.yaml"
    tuned, got = load_tuned_study(study_file)
    study = Study(tuned, tmp_path / "study")
    launched = {(arm, seed): study.run_config(arm, seed) for wave in study.jobs() for arm, seed in wave}
    assert {k: c["optim"]["lr"] for k, c in launched.items()} == {
        **{("grpo", s): 1e-4 for s in range(3)}, **{("gspo", s): 3e-4 for s in range(3)}}
    line = provenance(tuned, got)
    assert line.startswith("`optim.lr` tuned on the **validation** split (arm-wise pick over grid 3e-05, 0.0001, "
                           "0.0003; seeds 1000-1001") and "grpo 0.0001, gspo 0.0003" in line
    assert "[t_tuning.md](t_tuning.md)" in line and "commit abc1234" in line
    assert Study(tuned, tmp_path, seeds=2).spec._tuned == got  # a --seeds smoke run keeps the record


def _staged(**tuning):
    """A shared start (fixed), two methods from it, and a two-stage method (half, then from half)."""
    return _study(arms={"start": {"objective": "sft", "steps": 6}, "sft": {"from": "start", "objective": "sft"},
                        "grpo": {"from": "start", "objective": "grpo"},
                        "half": {"from": "start", "objective": "sft", "steps": 3},
                        "then": {"from": "half", "objective": "grpo", "steps": 3}},
                  tuning={"grid": [1e-4, 3e-4], "fixed": ["start"], **tuning})


def test_staged_arms_are_tuned_as_whole_methods(tmp_path):
    spec = _staged()  # no tuning steps: every arm keeps its budget (the study's 10, or its own)
    grid = GridStudy(grid_spec(spec), tmp_path / "g")
    assert [sorted(wave) for wave in grid.jobs()] == [
        [("start", 1000), ("start", 1001)],
        sorted((f"{a}+{v:g}", s) for a in ("sft", "grpo", "half") for v in (1e-4, 3e-4) for s in (1000, 1001)),
        sorted((f"then+{v:g}", s) for v in (1e-4, 3e-4) for s in (1000, 1001))]
    start, then = grid.run_config("start", 1001), grid.run_config("then+0.0003", 1001)
    assert start["optim"]["lr"] == 1e-4 and start["max_steps"] == 6 and start["objective"] == "sft"
    assert then["optim"]["lr"] == 3e-4 and then["max_steps"] == 3
    assert grid.run_config("sft+0.0001", 1000)["max_steps"] == 10
    assert then["model"]["name"] == str(tmp_path / "g" / "half+0.0003" / "seed1001" / "final")
    assert grid.run_config("grpo+0.0001", 1000)["model"]["name"] == str(tmp_path / "g" / "start" / "seed1000" / "final")

    # half alone prefers 1e-4, the method half -> then ends better at 3e-4: half takes then's pick
    crafted = {"sft": {1e-4: [0.30, 0.30], 3e-4: [0.20, 0.20]}, "grpo": {1e-4: [0.20, 0.20], 3e-4: [0.30, 0.30]},
               "half": {1e-4: [0.90, 0.90], 3e-4: [0.10, 0.10]}, "then": {1e-4: [0.25, 0.25], 3e-4: [0.35, 0.35]}}
    _fake_grid_runs(grid, crafted)
    for seed, x in zip(grid.seeds(), (0.40, 0.42), strict=True):
        run = grid.run_dir("start", seed)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 60.0}) + "\n")
        (run / "study_eval_validation.json").write_text(json.dumps({"mean": {"pass@1": x}}))
    scores = grid_scores(spec, grid)
    assert set(scores) == {"sft", "grpo", "half", "then"}  # the fixed start is not scored for a pick
    chosen = picks(spec, scores)
    assert chosen == {"sft": 1e-4, "grpo": 3e-4, "half": 3e-4, "then": 3e-4}
    # per study: pooled over the methods' last stages only (sft, grpo, then: 0.25 at 1e-4 < 0.3167 at 3e-4); with
    # half's scores pooled in too, 1e-4 would win (0.4125 against 0.2375)
    assert set(picks(_staged(per="study"), scores).values()) == {3e-4}

    study_file = tmp_path / "t.yaml"
    study_file.write_text(yaml.safe_dump(spec.model_dump(exclude_none=True)))
    spec = load_study(study_file)
    record = make_record(spec, chosen, "unigrad tune t.yaml", "abc1234")
    assert record["fixed"] == {"start": 1e-4} and "start" not in record["picks"]
    lines = table_lines(spec, scores, record)
    assert lines[4] == "| `half` | 90.0 ± 0.0 | 10.0 ± 0.0 | 0.0003 (stage: then's pick) |"  # nothing bold
    assert lines[5] == "| `then` | 25.0 ± 0.0 | **35.0 ± 0.0** | 0.0003 |"
    text = write_tuning_table(spec, grid, scores, record, tmp_path).read_text()
    assert "- `start` at optim.lr 0.0001: 41.0 ± " in text and "half, sft start from its run" in text
    assert "for 10 rollout steps (an arm with its own `steps` in the study file: those)" in text
    assert "A stage (an arm another tuned arm starts from)" in text
    assert "18 tuning runs: 10 min" in text  # 16 runs x 30 s + 2 x 60 s, each run counted once (not its chain)
    write_record(study_file, record)
    tuned, got = load_tuned_study(study_file)
    study = Study(tuned, tmp_path / "study")
    lrs = {arm: study.run_config(arm, 0)["optim"]["lr"] for arm in tuned.arms}
    assert lrs == {"start": 1e-4, "sft": 1e-4, "grpo": 3e-4, "half": 3e-4, "then": 3e-4}
    assert "not tuned (fixed, the file's value): start 0.0001" in provenance(tuned, got)


def test_per_control_tunes_the_control_alone_and_every_arm_takes_its_pick(tmp_path):
    arms = {"control": {}, "grpo_s1": {"rollout.router_noise": 1.0},
            "tis_s1": {"objective": "grpo_tis", "rollout.router_noise": 1.0}}
    spec = _study(arms=arms, control="control", tuning={"grid": [3e-5, 1e-4], "per": "control", "steps": 4})
    grid = GridStudy(grid_spec(spec), tmp_path)
    assert sorted(grid.spec.arms) == ["control+0.0001", "control+3e-05"]  # the perturbed arms are not trained
    assert grid.run_config("control+3e-05", 1001)["optim"]["lr"] == 3e-5
    # the perturbed arms would pick 1e-4 (pooled, the study-wise pick would too); the control picks 3e-5
    scores = {"control": {3e-5: [0.30, 0.32], 1e-4: [0.25, 0.27]}}
    assert picks(spec, scores) == {"control": 3e-5, "grpo_s1": 3e-5, "tis_s1": 3e-5}
    record = make_record(spec, picks(spec, scores), "unigrad tune t.yaml", "abc1234")
    assert table_lines(spec, scores, record)[2].endswith("| 3e-05 (every arm of its model) |")
    assert "3e-05 for every arm" in provenance(apply_record(spec, record), record)
    assert "pick on the control arm" in provenance(apply_record(spec, record), record)
    per_model = _study(arms={**arms, "moe": {"model": {"name": "m"}}}, control={"unigrad-tiny": "control", "m": "moe"},
                       tuning={"grid": [3e-5, 1e-4], "per": "control", "steps": 4})
    both = {"control": {3e-5: [0.3, 0.3], 1e-4: [0.2, 0.2]}, "moe": {3e-5: [0.2, 0.2], 1e-4: [0.3, 0.3]}}
    assert picks(per_model, both) == {"control": 3e-5, "grpo_s1": 3e-5, "tis_s1": 3e-5, "moe": 1e-4}
    with pytest.raises(ValueError, match="needs the study's control arm"):
        _study(arms=arms, tuning={"grid": [3e-5, 1e-4], "per": "control"})
    with pytest.raises(ValueError, match="no control arm for model"):  # moe's model has no control: whose pick?
        _study(arms={**arms, "moe": {"model": {"name": "m"}}}, control={"unigrad-tiny": "control"},
               tuning={"grid": [3e-5, 1e-4], "per": "control"})
    # arms trained from the control are not stages here (only the control is on the grid): no stage refusals
    after = _study(arms={**arms, "s1": {"from": "control"}, "s2": {"from": "control"}}, control="control",
                   tuning={"grid": [3e-5, 1e-4], "per": "control", "steps": 4})
    assert picks(after, scores)["s2"] == 3e-5
    rec = make_record(after, picks(after, scores), "unigrad tune t.yaml", "abc1234")
    assert table_lines(after, scores, rec)[2].endswith("| 3e-05 (every arm of its model) |")
    with pytest.raises(ValueError, match="no fixed arms"):
        _study(arms={**arms, "s": {"from": "control"}}, control="control",
               tuning={"grid": [3e-5, 1e-4], "per": "control", "fixed": ["control"]})


def test_every_shipped_tuning_section_builds_its_grid():
    from pathlib import Path

    for f in sorted(Path("examples/studies").glob("*.yaml")):
        spec = load_study(f)
        if spec.tuning is None:
            continue
        grid = GridStudy(grid_spec(spec), Path("unused"))
        values = {f"{v:g}" for v in spec.tuning.grid}
        assert all(arm in spec.tuning.fixed or arm.rsplit("+", 1)[1] in values for arm in grid.spec.arms), f
        assert grid.spec.eval.splits == ["validation"], f


def test_a_fixed_start_trains_the_study_budget_not_the_tuning_steps():
    spec = _study(arms={"start": {"objective": "sft"}, "a": {"from": "start"}},
                  tuning={"grid": [1e-4, 3e-4], "fixed": ["start"], "steps": 4})
    grid = GridStudy(grid_spec(spec), "unused")
    assert grid.run_config("start", 1000)["max_steps"] == 10  # the study's 10: the start the study itself runs from
    assert grid.run_config("a+0.0001", 1000)["max_steps"] == 4


def test_records_made_before_staged_tuning_still_read():
    """The committed tuning records (made before `fixed` existed) keep their digest."""
    for name in ("presets", "offpolicy_objectives", "gspo_dense", "kl_beta"):
        path = f"examples/studies/{name}.yaml"
        assert record_path(path).is_file(), name
        tuned, record = load_tuned_study(path)
        assert record is not None and all(arm in record["picks"] for arm in tuned.arms), name


def test_records_that_are_refused(tmp_path, capsys):
    study_file = tmp_path / "t.yaml"
    data = _study().model_dump(exclude_none=True)
    data["train"]["model"] = {"name": str(tmp_path / "no-model")}  # were it to train anyway: it fails at once
    study_file.write_text(yaml.safe_dump(data))
    spec = load_study(study_file)
    assert main(["study", str(study_file), "--out", str(tmp_path / "r")]) == 2  # tuning section, no record
    assert "no tuning record" in capsys.readouterr().err
    record = make_record(spec, {"grpo": 1e-4, "gspo": 1e-4}, "unigrad tune t.yaml", "abc1234")
    write_record(study_file, {**record, "split": "test"})
    with pytest.raises(ValueError, match="picked on the 'test' split"):
        read_record(spec, study_file)
    write_record(study_file, record)
    assert read_record(spec, study_file)["picks"] == {"grpo": 1e-4, "gspo": 1e-4}
    study_file.write_text(yaml.safe_dump({**data, "train": {**data["train"], "objective": "dapo"}}))
    with pytest.raises(ValueError, match="another version"):  # the file changed after its tuning
        load_tuned_study(study_file)
    assert apply_record(spec, record).arms["gspo"] == {"objective": "gspo", "optim.lr": 1e-4}


def test_the_page_says_when_the_rate_was_not_tuned():
    plain = _study(tuning=None)
    assert provenance(plain, None) == "Learning rate not tuned (inherited 1e-4, chosen on test in docs/results.md)."
    assert provenance(_study(), None).startswith("`optim.lr` not tuned yet")
    hot = _study(tuning=None, train={"optim": {"lr": 3e-4}})
    assert provenance(hot, None).startswith("Learning rate not tuned on validation (optim.lr 0.0003")
    noted = _study(tuning=None, lr_note="chosen in a pilot where the control is stable.")  # not "inherited"
    assert provenance(noted, None) == ("Learning rate not tuned on validation (optim.lr 0.0001): chosen in a pilot "
                                       "where the control is stable.")
    compare_arms = ("presets", "offpolicy_objectives", "kl_beta", "mismatch_collapse", "gspo_dense",
                    "gradient_imbalance", "hpt_flat_start")
    for f in compare_arms:
        spec = load_study(f"examples/studies/{f}.yaml")
        assert spec.tuning is not None and spec.tuning.split == "validation", f
        assert spec.tuning.per == ("study" if f == "kl_beta" else "arm"), f


@pytest.mark.slow  # 120 s (timed at load average about 3 on 2 cores)
def test_a_tiny_tuning_end_to_end(tmp_path, small_model):
    spec = {"title": "tiny", "doc": "docs/tiny.md", "seeds": 1, "steps": 2, "eval": {"prompts": 4, "splits": ["test"]},
            "train": {"model": {"name": str(small_model)}, "tasks": ["arithmetic"], "prompts_per_step": 2,
                      "micro_batch_size": 4, "rollout": {"num_generations": 2, "max_new_tokens": 4},
                      "eval": {"before_after": False}, "save_every": 0, "tensorboard": False},
            "arms": {"start": {"objective": "sft", "steps": 1}, "grpo": {"from": "start", "objective": "grpo"}},
            "tuning": {"grid": [1e-4, 1e-2], "seeds": 2, "prompts": 4, "fixed": ["start"]}}  # a staged method
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "tuning"
    subprocess.run([sys.executable, "-m", "unigrad.cli", "tune", str(f), "--out", str(runs), "--doc-root",
                    str(tmp_path)], check=True, capture_output=True)
    scores = {v: [json.loads((runs / f"grpo+{v:g}" / f"seed{s}" / "study_eval_validation.json").read_text())[
        "mean"]["pass@1"] for s in (1000, 1001)] for v in (1e-4, 1e-2)}
    assert not list(runs.glob("*/seed*/study_eval_test.json"))  # the test split was never evaluated
    assert not (runs / "grpo+0.0001" / "seed0").exists()
    ran = yaml.safe_load((runs / "grpo+0.01" / "seed1001" / "config.yaml").read_text())
    assert ran["optim"]["lr"] == 1e-2 and ran["seed"] == 1001 and ran["max_steps"] == 2
    assert ran["model"]["name"] == str(runs / "start" / "seed1001" / "final")  # from the fixed start, same seed
    start = yaml.safe_load((runs / "start" / "seed1000" / "config.yaml").read_text())
    assert start["max_steps"] == 1 and start["objective"] == "sft" and start["optim"]["lr"] == 1e-4
    means = {v: sum(xs) / 2 for v, xs in scores.items()}
    expected = 1e-4 if means[1e-4] >= means[1e-2] else 1e-2
    record = yaml.safe_load((tmp_path / "tuned" / "tiny.yaml").read_text())
    assert record["picks"] == {"grpo": expected} and record["split"] == "validation"
    assert record["fixed"] == {"start": 1e-4}
    table = (tmp_path / "docs" / "tiny_tuning.md").read_text()
    assert f"| {expected:g} |" in table and f"unigrad tune {f}" in table
    subprocess.run([sys.executable, "-m", "unigrad.cli", "study", str(f), "--out", str(tmp_path / "study"),
                    "--doc-root", str(tmp_path)], check=True, capture_output=True)
    assert yaml.safe_load((tmp_path / "study" / "grpo" / "seed0" / "config.yaml").read_text())["optim"]["lr"] == \
        expected
    page = (tmp_path / "docs" / "tiny.md").read_text()
    assert "`optim.lr` tuned on the **validation** split" in page and "[tiny_tuning.md](tiny_tuning.md)" in page
