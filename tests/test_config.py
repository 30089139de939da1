"""The typed config: YAML + dotted overrides, errors that name the key."""

import pytest

from unigrad.config import ConfigError, config_to_yaml, load_config
from unigrad.objective.presets import PRESETS


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: dapo\nrollout:\n  temperature: 0.8\n")
    cfg = load_config(path, ["max_steps=7", "rollout.num_generations=4", "objective_args.beta=0.001",
                             "tasks=[arithmetic]"])
    assert cfg.objective == "dapo" and cfg.max_steps == 7
    assert cfg.rollout.temperature == 0.8 and cfg.rollout.num_generations == 4
    assert cfg.resolved_objective().beta == 0.001 and cfg.resolved_objective().epsilon_upper == 0.28
    assert cfg.tasks == ["arithmetic"]
    again = tmp_path / "again.yaml"
    again.write_text(config_to_yaml(cfg))
    saved = load_config(again)  # the saved config reproduces the run: the same settings and the same objective
    assert saved.model_copy(update={"objective_args": cfg.objective_args}) == cfg
    assert saved.resolved_objective() == cfg.resolved_objective()


@pytest.mark.parametrize(
    "override,message",
    [
        ("max_stepz=3", "max_stepz: unknown key"),
        ("rollout.temprature=1", "rollout.temprature: unknown key"),
        ("rollout.temperature=-1", "rollout.temperature: Input should be greater than or equal to 0"),
        ("max_steps=0", "max_steps: Input should be greater than or equal to 1"),
        ("objective=grpoo", "objective: unknown objective 'grpoo'"),
        ("objective_args.epsilonn=0.1", "unknown objective_args ['epsilonn']"),
        ("objective_args.epsilon=-1", "epsilon: Input should be greater than or equal to 0"),
        ("hybrid.gamma=2", "hybrid.gamma: Input should be less than or equal to 1"),
        ("tasks=[]", "tasks: at least one task is needed"),
        ("maxsteps", "is not of the form key=value"),
        ("task_weights={arithmetic: -1}", "task_weights: task weights must be finite and >= 0"),
        ("report_to=[neptune]", "report_to: unknown tracker 'neptune'"),
        ("sampler.name=greedy", "sampler.name: Input should be 'uniform', 'size', 'gradient'"),
        ("sampler.exploration=2", "sampler.exploration: Input should be less than or equal to 1"),
        ("diagnostics.gain_window=0", "diagnostics.gain_window: Input should be greater than or equal to 1"),
        ("sharding=zero3", "sharding: Input should be 'none' or 'fsdp'"),

    ],
)
def test_bad_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_hpt_uses_unclipped_rl_part():
    cfg = load_config(None, ["objective=hpt"])
    assert cfg.is_hybrid
    assert cfg.resolved_objective().stabiliser == "none"
    assert cfg.resolved_objective().aggregation == "seq_mean_token_sum_norm"


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_dropping_masked_tokens_from_the_denominator_is_refused_by_the_trainer():
    with pytest.raises(ConfigError, match="masked_tokens_in_denominator=false is not supported"):
        load_config(None, ["objective=grpo_icepop", "objective_args.masked_tokens_in_denominator=false"])
    assert load_config(None, ["objective=grpo_icepop"]).resolved_objective().correction == "icepop"


def test_task_weights_map_names_to_the_loaded_tasks():
    from unigrad.tasks import get_task
    from unigrad.train.lifecycle.feasibility import task_weights

    tasks = [get_task("arithmetic"), get_task("countdown"), get_task("code")]
    assert task_weights(tasks, {}) is None  # uniform
    assert task_weights(tasks, {"countdown": 3}) == [1.0, 3.0, 1.0]
    with pytest.raises(ConfigError, match=r"task_weights names \['table_qa'\]"):
        task_weights(tasks, {"table_qa": 2})
    with pytest.raises(ConfigError, match="at least one task needs a positive weight"):
        task_weights(tasks, {"arithmetic": 0, "countdown": 0, "code": 0})


def test_sampler_combinations_that_make_no_sense_are_refused():
    with pytest.raises(ConfigError, match="task_weights cannot be combined with sampler.name='gradient'"):
        load_config(None, ["sampler.name=gradient", "task_weights={arithmetic: 2}"])
    with pytest.raises(ConfigError, match="needs diagnostics.task_gradients"):
        load_config(None, ["gradients.combine=balanced", "diagnostics.task_gradients=false"])
    cfg = load_config(None, ["gradients.combine=balanced", "task_weights={arithmetic: 2}"])
    assert cfg.gradients.combine == "balanced" and cfg.diagnostics.task_gradients is None


def test_the_built_in_defaults_are_the_example_config():
    """`unigrad train` with no arguments runs the tuned configuration that examples/default.yaml writes out."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "default.yaml"
    assert load_config(None) == load_config(example)
    assert load_config(None).task_weights == {"arithmetic": 2.0}


def test_defaults_that_depend_on_other_keys():
    # arithmetic's default weight only where it is trained and the sampler takes weights; a weight given is kept
    assert load_config(None, ["tasks=[countdown, code]"]).task_weights == {}
    assert load_config(None, ["sampler.name=gradient"]).task_weights == {}
    assert load_config(None, ["task_weights={code: 3}"]).task_weights == {"code": 3.0}
    assert load_config(None, ["tasks=[arithmetic, code]"]).task_weights == {"arithmetic": 2.0}
    # balanced by default, the plain sum when per-task accounting is turned off
    assert load_config(None).gradients.combine == "balanced"
    assert load_config(None, ["diagnostics.task_gradients=false"]).gradients.combine == "sum"
    assert load_config(None, ["diagnostics.task_gradients=false", "gradients.balance_target=2"]).gradients.combine \
        == "sum"


def test_asynchronous_rollouts_refuse_what_they_do_not_support_yet():
    for other in ("model.lora_r=4", "rollout.num_engines=2", "objective=dapo", "sharding=fsdp"):
        with pytest.raises(ConfigError, match="rollout.max_staleness > 0 with .* is not supported yet"):
            load_config(None, ["rollout.max_staleness=1", other])
    assert load_config(None, ["rollout.max_staleness=2"]).rollout.max_staleness == 2


def test_sharding_with_lora_is_refused():
    with pytest.raises(ConfigError, match="sharding=fsdp with model.lora_r > 0 is not supported yet"):
        load_config(None, ["sharding=fsdp", "model.lora_r=4"])


def test_a_saved_config_records_every_part_of_the_resolved_objective(tmp_path, monkeypatch):
    import dataclasses

    from unigrad.objective import presets

    for objective in ("grpo", "hpt", "luffy"):
        cfg = load_config(None, [f"objective={objective}", "objective_args.epsilon_high=0.3"])
        path = tmp_path / f"{objective}.yaml"
        path.write_text(config_to_yaml(cfg))
        saved = load_config(path)
        assert saved.resolved_objective() == cfg.resolved_objective()
        assert set(saved.objective_args) == set(presets.OBJECTIVE_FIELDS)
    # A preset whose defaults change later: the saved run keeps the objective it trained with.
    grpo = presets.PRESETS["grpo"]
    changed = dataclasses.replace(grpo, objective=grpo.objective.model_copy(update={"epsilon": 0.1}))
    monkeypatch.setitem(presets.PRESETS, "grpo", changed)
    presets._resolve_cached.cache_clear()
    try:
        assert load_config(None, ["objective=grpo"]).resolved_objective().epsilon == 0.1
        assert load_config(tmp_path / "grpo.yaml").resolved_objective().epsilon == 0.2
    finally:
        presets._resolve_cached.cache_clear()


def test_a_config_yaml_written_before_this_version_still_loads_as_a_run_directory(tmp_path):
    # The form of config.yaml before it recorded the resolved objective (the preset's name, no objective_args) and
    # before gradients.combine (the combination spelled as a sampler).
    from unigrad.config import load_run_config

    (tmp_path / "config.yaml").write_text("objective: dapo\nobjective_args: {}\nmax_steps: 7\nsampler:\n"
                                          "  name: balanced\n  balance_target: 2.0\n")
    cfg = load_run_config(tmp_path)
    assert cfg.objective == "dapo" and cfg.max_steps == 7 and cfg.resolved_objective().epsilon_high == 0.28
    assert (cfg.sampler.name, cfg.gradients.combine, cfg.gradients.balance_target) == ("uniform", "balanced", 2.0)
    # Saved before DAPO's trainer options existed: trained without them, resumed without them.
    assert cfg.rollout.dynamic_sampling is False and cfg.rollout.overlong_buffer == 0


@pytest.mark.parametrize("old, new", [("sampler.name=balanced", "gradients.combine=balanced"),
                                      ("sampler.name=pcgrad", "gradients.combine=pcgrad"),
                                      ("sampler.balance_target=2", "gradients.balance_target")])
def test_the_old_spelling_of_gradient_combination_is_refused_naming_the_new_key(old, new, tmp_path):
    with pytest.raises(ConfigError, match=new.replace(".", r"\.")):
        load_config(None, [old])
    path = tmp_path / "mine.yaml"
    key, value = old.split("=")
    path.write_text(f"sampler:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=new.replace(".", r"\.")):
        load_config(path)  # a config the user writes is not migrated


def test_the_default_config_combines_task_gradients_by_balancing_and_samples_uniformly():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "default.yaml")
    assert (cfg.sampler.name, cfg.gradients.combine) == ("uniform", "balanced")


def test_train_help_lists_every_config_key_with_its_description():
    import typing

    from pydantic import BaseModel

    from unigrad.cli import build_parser
    from unigrad.config import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    text = train.format_help()
    keys = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, prefix + name + ".")
            else:
                assert field.description, f"{prefix}{name} has no description"
                keys.append((prefix + name, field))

    walk(TrainConfig, "")
    for key, field in keys:
        assert f"  {key} (" in text and field.description in text, key
    assert "optim.beta2 (float, >=0 <1; default 0.99)" in text
    assert typing.get_args(TrainConfig.model_fields["sharding"].annotation) == ("none", "fsdp")


def _greedy_trains_nothing(objective: str, advantage: str | None = None) -> bool:
    """Whether the objective's advantage is 0 on every row when each group's completions are identical (greedy
    sampling: identical completions, identical rewards), computed from the estimator itself."""
    import torch

    from unigrad.config import TrainConfig
    from unigrad.objective import compute_advantages

    cfg = TrainConfig.model_construct(objective=objective, objective_args={"advantage": advantage} if advantage else {},
                                      hybrid=TrainConfig.model_fields["hybrid"].default_factory())
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5])  # three groups, identical within each
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    advantages = compute_advantages(rewards, groups, cfg.resolved_objective().advantage)
    return not cfg.uses_guidance and bool((advantages == 0).all())


@pytest.mark.parametrize("objective", sorted(PRESETS) + ["hpt"])
def test_greedy_sampling_is_refused_exactly_where_it_would_train_nothing(objective):
    greedy = ["rollout.temperature=0", f"objective={objective}"]
    if objective == "sft" or not _greedy_trains_nothing(objective):
        load_config(None, greedy)  # demonstrations, or an advantage that does not compare within the group
        return
    with pytest.raises(ConfigError, match="rollout.temperature=0 samples greedily, so the 8 completions of a prompt's "
                                          "group are identical .* would train nothing. Use rollout.temperature > 0"):
        load_config(None, greedy)
    load_config(None, [f"objective={objective}", "rollout.temperature=0.7"])


def test_greedy_sampling_with_an_estimator_without_groups_is_accepted_and_left_as_given():
    assert not _greedy_trains_nothing("grpo", "reinforce")
    overrides = ["rollout.temperature=0", "rollout.num_generations=1", "objective_args={advantage: reinforce}"]
    cfg = load_config(None, overrides)
    assert cfg.rollout.temperature == 0 and cfg.rollout.num_generations == 1  # a refusal only: nothing reset
    assert cfg.resolved_objective().advantage == "reinforce"
