"""A careless user's mistakes with `unigrad eval`, `study` and `report`: each ends in one clear line naming the cause
and the fix (exit 2), or in correct behaviour; never in exit 0 with a wrong result, lost data or a raw traceback.
The real CLI (its `main`) on a small real model."""

import json
import os
import shutil

import pytest
import yaml

from unigrad.cli import main
from unigrad.config import config_to_yaml, validate_config


def run_main(capsys, *argv):
    """(exit code, stdout, stderr) of `unigrad ARGV` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse refuses with SystemExit(2)
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err


# --- unigrad eval ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-5", "0"])
def test_eval_refuses_max_new_tokens_below_one(capsys, value):
    code, out, err = run_main(capsys, "eval", "no-such-model", "--max-new-tokens", value)
    assert code == 2 and out == ""
    assert f"--max-new-tokens: the tokens per completion must be at least 1, got {value}" in one_error_line(err)


def test_evaluate_refuses_a_budget_below_one_instead_of_replacing_it(small_model):
    from unigrad.eval import evaluate
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import get_tasks

    model, tok = load_model_and_tokenizer(small_model)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        evaluate(model, tok, get_tasks("arithmetic"), 2, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts_per_task must be at least 1, got 0"):
        evaluate(model, tok, get_tasks("arithmetic"), 0)


def test_eval_prompts_zero_has_its_own_message_not_the_context(capsys, small_model):
    code, _, err = run_main(capsys, "eval", small_model, "--tasks", "arithmetic", "--prompts", "0")
    assert code == 2 and "--prompts: the held-out prompts per task must be at least 1, got 0" in one_error_line(err)
    assert "context" not in err


PRINTING_REWARD = """
print("loading my reward")


def reward(prompts, completions, **kwargs):
    print("scoring", len(completions))
    return [1.0 for _ in completions]
"""


def fake_run_dir(tmp_path, small_model, **settings):
    """A run directory as `unigrad train` leaves it: config.yaml and final/ (the small model)."""
    run = tmp_path / "run"
    shutil.copytree(small_model, run / "final")
    cfg = validate_config({"model": {"name": str(small_model)}, "tasks": ["arithmetic"],
                           "rollout": {"max_new_tokens": 4}, **settings})
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    return run


def test_eval_json_stays_pure_json_when_the_reward_function_prints(capsys, tmp_path, small_model):
    (tmp_path / "my_reward.py").write_text(PRINTING_REWARD)
    run = fake_run_dir(tmp_path, small_model, reward=f"{tmp_path / 'my_reward.py'}:reward")
    code, out, err = run_main(capsys, "eval", run, "--prompts", "2", "--json")
    assert code == 0, err
    res = json.loads(out)  # nothing but the JSON on stdout
    assert res["mean"]["pass@1"] == 1.0  # the run's own reward function scored it
    assert "loading my reward" in err and "scoring" in err  # what it printed is not lost


def test_eval_of_a_run_configured_auto_asks_the_engine_rule(capsys, tmp_path, small_model, monkeypatch):
    # rollout.engine=auto (the default) is resolved for `unigrad eval RUN` as for training. The rule is made to pick
    # vLLM: the evaluation then asks for vLLM (built, or refused where it cannot run), not the transformers engine.
    from unigrad.rollout.engine_choice import EngineChoice
    from unigrad.train.lifecycle import engine_selection

    run = fake_run_dir(tmp_path, small_model)
    assert yaml.safe_load((run / "config.yaml").read_text())["rollout"]["engine"] == "auto"
    monkeypatch.setattr(engine_selection, "choose_rollout_engine", lambda situation: EngineChoice("vllm", "test"))
    code, out, err = run_main(capsys, "eval", run, "--prompts", "2", "--json")
    assert "unigrad eval: --engine vllm:" in err or "unigrad eval: sampling with vLLM" in err, err


def test_eval_names_a_truncated_weights_file(capsys, tmp_path, small_model):
    run = fake_run_dir(tmp_path, small_model)
    weights = run / "final" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code, out, err = run_main(capsys, "eval", run, "--prompts", "2", "--json")
    assert code == 2 and out == ""
    assert f"{weights} is truncated or corrupt" in one_error_line(err)
    assert "copy the model again" in err


def test_a_prompt_with_two_answers_is_refused_at_load_naming_the_rows(capsys, tmp_path, small_model):
    rows = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}, {"prompt": "2+2?", "answer": "5"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_main(capsys, "eval", small_model, "--tasks", str(data), "--prompts", "2")
    assert code == 2 and out == ""
    assert "rows 1 and 3 give the prompt '2+2?' two different answers ('4' and '5')" in one_error_line(err)
    assert str(data) in err


def test_a_prompt_repeated_with_its_answer_is_fine(tmp_path):
    from unigrad.tasks.files import load_file_tasks

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "2+2?", "answer": "4"}] * 2
                            + [{"prompt": "2+2?", "answer": "4", "task": "other"},
                               {"prompt": "2+2?", "answer": "5", "task": "again"}]))  # other tasks: their own answers
    assert [t.name for t in load_file_tasks(data)] == ["qa", "other", "again"]


# --- unigrad report -------------------------------------------------------------------------------------------


def test_report_on_a_missing_run_creates_nothing(capsys, tmp_path):
    missing = tmp_path / "runs" / "typo"
    code, out, err = run_main(capsys, "report", missing)
    assert code == 2 and f"run directory {missing} does not exist" in one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_report_on_an_sft_run(capsys, tmp_path, small_model):
    run = tmp_path / "sft"
    code, _, err = run_main(capsys, "train", f"model.name={small_model}", "objective=sft", "max_steps=2",
                            "tasks=[arithmetic]", "prompts_per_step=2", "micro_batch_size=4", "save_every=0",
                            "eval.before_after=false", "threads=1", "--output-dir", run)
    assert code == 0, err
    code, _, err = run_main(capsys, "report", run)
    assert code == 0, err
    page = (run / "report" / "index.html").read_text()
    assert "<td>arithmetic</td>" in page and "Supervised (SFT) loss" in page  # its task, and the loss it trains on


def test_report_on_a_run_without_per_task_metrics(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "grad_norm": 2.0}) + "\n")
    code, _, err = run_main(capsys, "report", run)
    assert code == 0, err
    assert "No per-task metrics" in (run / "report" / "index.html").read_text()


# --- unigrad study --------------------------------------------------------------------------------------------


def study_file(tmp_path, small_model, **changes):
    spec = {"title": "smoke", "doc": "docs/smoke.md", "seeds": 1, "steps": 2, "eval": {"prompts": 2},
            "train": {"model": {"name": str(small_model)}, "tasks": ["arithmetic"], "prompts_per_step": 2,
                      "micro_batch_size": 4, "rollout": {"num_generations": 2, "max_new_tokens": 4},
                      "eval": {"before_after": False}, "save_every": 0, "tensorboard": False},
            "arms": {"grpo": {"objective": "grpo"}}, **changes}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("option, what", [("--seeds", "the number of seeds"), ("--steps", "the rollout steps per run"),
                                          ("--parallel", "the runs at once")])
def test_study_refuses_counts_below_one(capsys, tmp_path, small_model, option, what):
    code, out, err = run_main(capsys, "study", study_file(tmp_path, small_model), option, "0", "--out",
                              tmp_path / "o", "--doc-root", tmp_path)
    assert code == 2 and f"{option}: {what} must be at least 1, got 0" in one_error_line(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "docs").exists()


def test_study_file_with_a_tab_names_the_file_and_line(capsys, tmp_path):
    f = tmp_path / "tab.yaml"
    f.write_text("title: t\ndoc: d.md\nsteps: 2\ntrain:\n\ttasks: [arithmetic]\narms: {a: {}}\n")
    code, _, err = run_main(capsys, "study", f)
    assert code == 2
    assert f"{f}: line 5: a tab character; YAML indents with spaces only" in one_error_line(err)


def test_study_unknown_train_key_is_named_before_any_run(capsys, tmp_path, small_model):
    f = study_file(tmp_path, small_model)
    spec = yaml.safe_load(f.read_text())
    spec["train"]["rollout"]["temprature"] = 0.7
    f.write_text(yaml.safe_dump(spec))
    code, _, err = run_main(capsys, "study", f, "--out", tmp_path / "o")
    assert code == 2 and "arm 'grpo'" in one_error_line(err) and "rollout.temprature: unknown key" in err
    assert not (tmp_path / "o").exists()


def train_like_the_study(capsys, spec_file, run_dir, *overrides):
    """Train one run as `unigrad study` trains it: the arm's pinned config, then seed=0 and `overrides`."""
    from unigrad.report.seeded_study import arm_config, load_study

    config = run_dir.parent / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(arm_config(load_study(spec_file), "grpo")))
    code, _, err = run_main(capsys, "train", config, "seed=0", "threads=1", *overrides, "--output-dir", run_dir)
    assert code == 0, err


def test_runs_with_another_step_budget_are_not_reused(capsys, tmp_path, small_model):
    f = study_file(tmp_path, small_model)  # steps: 2
    runs = tmp_path / "o"
    train_like_the_study(capsys, f, runs / "grpo" / "seed0", "max_steps=1")  # what `--steps 1` left there
    before = (runs / "grpo" / "seed0" / "metrics.jsonl").read_text()
    for extra in ([], ["--page-only"], ["--seeds", "1"]):
        code, _, err = run_main(capsys, "study", f, "--out", runs, "--doc-root", tmp_path, *extra)
        assert code == 2 and "were trained with other settings than this study's" in one_error_line(err)
        assert "max_steps: 1 in the run, 2 in the study" in err and "another --out" in err
    assert (runs / "grpo" / "seed0" / "metrics.jsonl").read_text() == before  # refused before anything ran
    assert not (tmp_path / "docs").exists()


def test_a_smoke_study_leaves_the_docs_page_alone(capsys, tmp_path, small_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = study_file(tmp_path, small_model)  # steps: 2; the page: docs/smoke.md
    runs = tmp_path / "runs" / "studies" / "smoke-steps1"  # a smoke run's own directory, apart from the study's
    code, _, err = run_main(capsys, "study", f, "--steps", "1", "--page-only")
    assert code == 2 and "holds no results of this study yet" in one_error_line(err)
    start = runs / "start" / str(small_model).replace("/", "_")  # the start model's evaluation, as the study runs it
    code, out, err = run_main(capsys, "eval", small_model, "--tasks", "arithmetic", "--prompts", "2", "--json",
                              "--per-prompt", "--max-new-tokens", "4")
    assert code == 0, err
    start.mkdir(parents=True)
    (start / "study_eval_test.json").write_text(out)
    code, out, err = run_main(capsys, "study", f, "--steps", "1", "--page-only")
    assert code == 0, err
    assert not (tmp_path / "docs").exists()  # the page the file names: only the study itself writes it
    assert (runs / "page" / "docs" / "smoke.md").is_file() and "a smoke run" in out


def test_a_retired_study_is_neither_run_nor_tuned_and_its_page_says_so(capsys, tmp_path, small_model):
    from unigrad.report.seeded_study import Study, load_study
    from unigrad.report.study_page import _intro

    f = study_file(tmp_path, small_model, retired="2026-12-08: replaced by the boundary study",
                   tuning={"grid": [1e-4, 3e-4]})
    code, _, err = run_main(capsys, "study", f, "--out", tmp_path / "o", "--doc-root", tmp_path)
    assert code == 2 and "is retired (2026-12-08: replaced by the boundary study)" in one_error_line(err)
    code, _, err = run_main(capsys, "tune", f, "--out", tmp_path / "t", "--doc-root", tmp_path)
    assert code == 2 and "it is not tuned or run again" in one_error_line(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists() and not (tmp_path / "docs").exists()
    intro = _intro(Study(load_study(f), tmp_path / "o"), "unigrad study smoke.yaml", None)
    assert intro[:3] == ["# smoke", "", "**Retired**, not to be run or tuned again: 2026-12-08: replaced by the "
                         "boundary study"]
