"""Where a run is refused: unigrad.train.lifecycle.feasibility (what cannot run here: processes, tasks, engines) and the
config's one defaults step (validators after it only refuse)."""

from __future__ import annotations

import pytest

from unigrad.cli import main
from unigrad.config import ConfigError, load_config, set_dependent_defaults
from unigrad.tasks import get_tasks
from unigrad.train.lifecycle.feasibility import check_processes, check_tasks


def test_prompts_that_do_not_split_over_the_processes_are_refused():
    cfg = load_config(overrides=["prompts_per_step=6"])
    check_processes(cfg, 3)  # 6 = 3 x 2
    with pytest.raises(ConfigError, match=r"prompts_per_step=6 must be a multiple of the number of processes \(4\)"):
        check_processes(cfg, 4)


@pytest.mark.parametrize(("setting", "message"), [
    ("rollout.max_staleness=1", "rollout.max_staleness > 0 runs in one process for now"),
    ("rollout.dynamic_sampling=true", "rollout.dynamic_sampling runs in one process for now"),
])
def test_one_process_settings_run_alone_and_are_refused_over_several(setting, message):
    cfg = load_config(overrides=[setting, "prompts_per_step=4"])
    check_processes(cfg, 1)
    with pytest.raises(ConfigError, match=message):
        check_processes(cfg, 2)


def test_the_cli_refuses_them_before_it_starts_any_process(capsys, tmp_path):
    """--nproc 2 with asynchronous rollouts: exit 2 with the message, nothing launched, no run directory."""
    out = tmp_path / "run"
    assert main(["train", "rollout.max_staleness=1", "prompts_per_step=4", "--nproc", "2",
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unigrad train: rollout.max_staleness > 0 runs in one process for now"), err
    assert not out.exists()


def test_asynchronous_rollouts_are_refused_in_one_place_for_one_process_and_for_several():
    """The config refuses max_staleness with objective=sft (any process count); several processes refuse it
    even where one would take it."""
    with pytest.raises(ConfigError, match="rollout.max_staleness > 0 with objective=sft"):
        load_config(overrides=["rollout.max_staleness=1", "objective=sft"])
    check_processes(load_config(overrides=["rollout.max_staleness=1"]), 1)


def test_tasks_of_one_name_and_weights_of_no_task_are_refused_before_the_model_loads():
    cfg = load_config(overrides=["tasks=[arithmetic,countdown]", "eval.before_after=false"])
    arithmetic, countdown = get_tasks("arithmetic")[0], get_tasks("countdown")[0]
    check_tasks(cfg, [arithmetic, countdown])
    with pytest.raises(ConfigError, match="task names must be distinct"):
        check_tasks(cfg, [arithmetic, arithmetic])
    weighted = load_config(overrides=["tasks=[countdown]", "task_weights={word_problems: 2}",
                                      "eval.before_after=false"])
    with pytest.raises(ConfigError, match="word_problems"):
        check_tasks(weighted, [countdown])


@pytest.mark.parametrize(("objective", "budget", "dynamic", "buffer"), [
    ("dapo", 40, True, 8),   # a fifth of the budget
    ("dapo", 4, True, 1),    # at least one token
    ("grpo", 40, False, 0),  # off without DAPO
])
def test_the_dependent_defaults_follow_the_objective_and_the_budget(objective, budget, dynamic, buffer):
    data = set_dependent_defaults({"objective": objective, "rollout": {"max_new_tokens": budget}}, ["arithmetic"])
    assert data["rollout"]["dynamic_sampling"] is dynamic and data["rollout"]["overlong_buffer"] == buffer
    cfg = load_config(overrides=[f"objective={objective}", f"rollout.max_new_tokens={budget}"])
    assert (cfg.rollout.dynamic_sampling, cfg.rollout.overlong_buffer) == (dynamic, buffer)


def test_a_given_value_is_kept_and_the_input_mapping_is_not_changed():
    given = {"objective": "dapo", "rollout": {"dynamic_sampling": False, "overlong_buffer": 0},
             "tasks": ["arithmetic"], "task_weights": {"arithmetic": 5}}
    snapshot = repr(given)
    data = set_dependent_defaults(given, ["arithmetic"])
    assert data["rollout"] == {"dynamic_sampling": False, "overlong_buffer": 0}
    assert data["task_weights"] == {"arithmetic": 5}
    assert repr(given) == snapshot
    assert set_dependent_defaults({"tasks": ["arithmetic"]}, [])["task_weights"] == {"arithmetic": 2.0}
    assert "task_weights" not in set_dependent_defaults({"tasks": ["countdown"]}, [])
    off = set_dependent_defaults({"diagnostics": {"task_gradients": False}}, [])
    assert off["gradients"] == {"combine": "sum"}


@pytest.mark.parametrize(("given", "model"), [
    ({"tasks": ["countdown_calc"]}, "unigrad-chat"),                      # a built-in task whose episodes call tools
    ({"tasks": ["arithmetic", "countdown_calc"]}, "unigrad-chat"),        # one such task is enough
    ({"tasks": ["arithmetic"], "tools": ["calculator"]}, "unigrad-chat"),  # tools offered to single-turn tasks
    ({"tasks": ["guess", "code_retry"]}, "unigrad-tiny"),                 # multi-turn without tools
    ({"tasks": ["arithmetic"]}, "unigrad-tiny"),
    ({}, "unigrad-tiny"),                                                  # the default mixture
    ({"tasks": ["countdown_calc"], "model": {"name": "unigrad-tiny"}}, "unigrad-tiny"),  # a named model is kept
    ({"tasks": ["countdown_calc"], "model": {"dtype": "bfloat16"}}, "unigrad-chat"),
])
def test_runs_whose_episodes_offer_tools_default_to_the_model_that_calls_them(given, model):
    """unigrad-tiny never saw a tool call (it never makes one); unigrad-chat was pretrained on calculator
    transcripts, so tool tasks default to it unless a model is named."""
    data = set_dependent_defaults(given, ["arithmetic"])
    assert data["model"]["name"] == model
    assert "model" not in given or given["model"].get("name") in (None, "unigrad-tiny")  # input left alone
    overrides = [f"tasks=[{','.join(given['tasks'])}]"] if "tasks" in given else []
    overrides += [f"tools=[{','.join(given['tools'])}]"] if "tools" in given else []
    overrides += [f"model.{key}={value}" for key, value in given.get("model", {}).items()]
    assert load_config(overrides=overrides).model.name == model


def test_a_resolved_config_validates_to_itself():
    """The validators after the defaults step only refuse: validating a resolved config again changes nothing."""
    for overrides in (["objective=dapo"], ["objective=hpt"], ["diagnostics.task_gradients=false"], [],
                      ["tasks=[countdown_calc]"]):
        cfg = load_config(overrides=overrides)
        assert type(cfg).model_validate(cfg.model_dump()) == cfg
