"""Which rollout engine `rollout.engine=auto` runs: the rule, as a pure function of what the run knows.

The rule follows `benchmarks/vllm_rollout_speed.py` (docs/performance.md, "vLLM against the transformers engine"):

- vLLM only where it can run here (`vllm_unavailable_reason` is None) and where none of the run's settings needs
  the transformers engine (`EngineSituation.vllm_refusals`: settings the config refuses with `rollout.engine=vllm`).
- On a CUDA GPU: vLLM. (Not measured by this project: its CUDA build has not run here, docs/scaling.md. It is
  chosen there for what vLLM is built for, batched GPU decoding with CUDA graphs and a paged KV cache.)
- On a CPU (vLLM's CPU build): vLLM only for models of at least `CPU_VLLM_MIN_PARAMETERS` parameters with
  completions of at least `CPU_VLLM_MIN_NEW_TOKENS` tokens, where it was measured faster; below, the transformers
  engine with its static-cache decoder was as fast or faster, and starts in well under a second instead of tens.
- Anything else (Apple's MPS, ...): the transformers engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EngineName = Literal["transformers", "vllm"]

# Measured thresholds (docs/performance.md). None: vLLM's CPU build is never picked on a CPU.
CPU_VLLM_MIN_PARAMETERS: int | None = None
CPU_VLLM_MIN_NEW_TOKENS: int | None = None


@dataclass(frozen=True)
class EngineSituation:
    """What the choice depends on, gathered by the run once the model is loaded."""

    vllm_unavailable: str | None  # why vLLM cannot run here (`vllm_unavailable_reason`); None: it can
    device_type: str  # the learner's device type: "cpu", "cuda", "mps", ...
    parameters: int  # the model's parameter count
    max_new_tokens: int  # rollout.max_new_tokens
    vllm_refusals: tuple[str, ...] = field(default=())  # why this run's settings rule vLLM out (empty: they do not)


@dataclass(frozen=True)
class EngineChoice:
    engine: EngineName
    reason: str


def choose_rollout_engine(situation: EngineSituation) -> EngineChoice:
    """The engine `rollout.engine=auto` runs in `situation`, and why (module docstring)."""
    if situation.parameters < 1 or situation.max_new_tokens < 1:
        raise ValueError(f"a model with {situation.parameters} parameters sampling {situation.max_new_tokens} "
                         "new tokens: both must be at least 1")
    if situation.vllm_unavailable is not None:
        return EngineChoice("transformers", f"vLLM cannot run here: {situation.vllm_unavailable}")
    if situation.vllm_refusals:
        return EngineChoice("transformers", "the run's settings need the transformers engine: "
                            + "; ".join(situation.vllm_refusals))
    if situation.device_type == "cuda":
        return EngineChoice("vllm", "vLLM is installed and the learner is on a CUDA GPU")
    if situation.device_type != "cpu":
        return EngineChoice("transformers", f"vLLM does not run on {situation.device_type!r} devices")
    if CPU_VLLM_MIN_PARAMETERS is None or CPU_VLLM_MIN_NEW_TOKENS is None:
        return EngineChoice("transformers", "on a CPU the transformers engine was measured as fast as vLLM's CPU "
                            "build or faster at every size tried (docs/performance.md)")
    if situation.parameters >= CPU_VLLM_MIN_PARAMETERS and situation.max_new_tokens >= CPU_VLLM_MIN_NEW_TOKENS:
        return EngineChoice("vllm", f"on a CPU, vLLM's CPU build was measured faster from "
                            f"{CPU_VLLM_MIN_PARAMETERS / 1e6:g} M parameters and {CPU_VLLM_MIN_NEW_TOKENS} new tokens")
    return EngineChoice("transformers", f"on a CPU, below {CPU_VLLM_MIN_PARAMETERS / 1e6:g} M parameters or "
                        f"{CPU_VLLM_MIN_NEW_TOKENS} new tokens the transformers engine was measured as fast or faster")


def vllm_refusals(cfg, processes: int = 1) -> tuple[str, ...]:
    """Why `cfg` (a `TrainConfig`) could not run with `rollout.engine=vllm` over `processes` processes: the
    config's own checks, asked with the engine set to vllm, so that `auto` never picks what the config refuses."""
    from unigrad.config import ConfigError, single_process_refusal, validate_config

    data = cfg.model_dump()
    data["rollout"] = {**data["rollout"], "engine": "vllm"}
    try:
        as_vllm = validate_config(data)
    except ConfigError as err:
        return (str(err),)
    if processes > 1 and (reason := single_process_refusal(as_vllm)) is not None:
        return (reason,)
    return ()


def engine_situation(cfg, model, device_type: str, processes: int = 1) -> EngineSituation:
    """The `EngineSituation` of a run: `cfg` its `TrainConfig`, `model` the loaded learner model."""
    from unigrad.rollout.vllm_engine import VLLMUnavailable, check_cpu_head_size, vllm_on_cpu, vllm_unavailable_reason

    unavailable = vllm_unavailable_reason()
    if unavailable is None and vllm_on_cpu():
        try:
            check_cpu_head_size(model.config)
        except VLLMUnavailable as err:
            unavailable = str(err)
    return EngineSituation(vllm_unavailable=unavailable, device_type=device_type,
                           parameters=sum(p.numel() for p in model.parameters()),
                           max_new_tokens=cfg.rollout.max_new_tokens,
                           vllm_refusals=vllm_refusals(cfg, processes) if unavailable is None else ())


def resolve_engine(cfg, model, device_type: str, processes: int = 1):
    """`cfg` with `rollout.engine=auto` replaced by the engine `choose_rollout_engine` picks, and the choice
    (None when the engine was named explicitly: `cfg` is returned as it is)."""
    if cfg.rollout.engine != "auto":
        return cfg, None
    from unigrad.config import validate_config

    choice = choose_rollout_engine(engine_situation(cfg, model, device_type, processes))
    data = cfg.model_dump()
    data["rollout"] = {**data["rollout"], "engine": choice.engine}
    return validate_config(data), choice
