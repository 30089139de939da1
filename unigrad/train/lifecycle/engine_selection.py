"""`rollout.engine=auto` in a run: the situation gathered from its config and model, the rule applied
(`unigrad.rollout.engine_choice`), and the config with the chosen engine."""

from __future__ import annotations

from unigrad.config import ConfigError, TrainConfig, single_process_refusal, validate_config
from unigrad.rollout.engine_choice import EngineChoice, EngineSituation, choose_rollout_engine


def vllm_refusals(cfg: TrainConfig, processes: int = 1) -> tuple[str, ...]:
    """Why `cfg` (a `TrainConfig`) could not run with `rollout.engine=vllm` over `processes` processes: the
    config's own checks, asked with the engine set to vllm, so that `auto` never picks what the config refuses."""
    data = cfg.model_dump()
    data["rollout"] = {**data["rollout"], "engine": "vllm"}
    try:
        as_vllm = validate_config(data)
    except ConfigError as err:
        return (str(err),)
    if processes > 1 and (reason := single_process_refusal(as_vllm)) is not None:
        return (reason,)
    return ()


def engine_situation(cfg: TrainConfig, model, device_type: str, processes: int = 1) -> EngineSituation:
    """The `EngineSituation` of a run: `cfg` its `TrainConfig`, `model` the loaded learner model."""
    from unigrad.rollout.vllm_engine import (
        VLLMUnavailable,
        check_cpu_head_size,
        check_cpu_mixture_of_experts,
        vllm_on_cpu,
        vllm_unavailable_reason,
    )

    unavailable = vllm_unavailable_reason()
    if unavailable is None and vllm_on_cpu():  # the models the CPU build refuses (VLLMEngine's own checks)
        try:
            check_cpu_head_size(model.config)
            check_cpu_mixture_of_experts(model.config)
        except VLLMUnavailable as err:
            unavailable = str(err)
    return EngineSituation(vllm_unavailable=unavailable, device_type=device_type,
                           parameters=sum(p.numel() for p in model.parameters()),
                           max_new_tokens=cfg.rollout.max_new_tokens,
                           vllm_refusals=vllm_refusals(cfg, processes) if unavailable is None else ())


def resolve_engine(cfg: TrainConfig, model, device_type: str,
                   processes: int = 1) -> tuple[TrainConfig, EngineChoice | None]:
    """`cfg` with `rollout.engine=auto` replaced by the engine `choose_rollout_engine` picks, and the choice
    (None when the engine was named explicitly: `cfg` is returned as it is)."""
    if cfg.rollout.engine != "auto":
        return cfg, None
    choice = choose_rollout_engine(engine_situation(cfg, model, device_type, processes))
    data = cfg.model_dump()
    data["rollout"] = {**data["rollout"], "engine": choice.engine}
    return validate_config(data), choice
