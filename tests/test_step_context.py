"""The step reads every setting from the run's config: StepContext declares none of the config's keys again (a
second default beside config.py's would drift from it), and what it reads is what the config holds."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel
from step_helpers import step_context

from unigrad.config import TrainConfig
from unigrad.train.step import StepContext


def config_key_names(model: type[BaseModel] = TrainConfig) -> set[str]:
    """Every leaf key name of the config, sections walked (rollout.max_resample -> max_resample)."""
    names = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names |= config_key_names(kind)
        else:
            names.add(name)
    return names


# Fields named like a config key that hold what the run built from it, not the setting: the loaded tasks, the
# resolved objective, the rollout engine, the per-task gradient accounting.
BUILT_FROM_THE_KEY = {"tasks", "objective", "engine", "task_gradients"}


def test_step_context_declares_no_config_setting_of_its_own():
    fields = {f.name for f in dataclasses.fields(StepContext)} - BUILT_FROM_THE_KEY
    assert "max_resample" in config_key_names() and "prompts_per_step" in config_key_names()
    assert not fields & config_key_names(), f"settings re-declared beside the config: {fields & config_key_names()}"


def test_the_step_reads_the_configs_values():
    ctx = step_context(max_resample=7, mini_batches=2, overlong_buffer=2, seed=3, micro_batch_size=5)
    cfg = ctx.config
    assert (cfg.rollout.max_resample, cfg.optim.mini_batches, cfg.rollout.overlong_buffer, cfg.seed,
            cfg.micro_batch_size) == (7, 2, 2, 3, 5)
    assert (ctx.max_resample, ctx.mini_batches, ctx.overlong_buffer, ctx.seed, ctx.micro_batch_size) == (7, 2, 2, 3, 5)
    assert (ctx.sampling.temperature, ctx.sampling.max_new_tokens) == (cfg.rollout.temperature,
                                                                        cfg.rollout.max_new_tokens)
    cfg.rollout.max_turns = 2  # one home: a change of the config is what the step sees
    assert ctx.max_turns == 2
