"""Which rollout engine `rollout.engine=auto` runs: the rule, as a pure function of what the run knows.

The rule follows `benchmarks/vllm_rollout_speed.py` (docs/performance.md, "vLLM against the transformers engine"):

- vLLM only where it can run here (`vllm_unavailable_reason` is None) and where none of the run's settings needs
  the transformers engine (`EngineSituation.vllm_refusals`: settings the config refuses with `rollout.engine=vllm`).
- On a CUDA GPU: vLLM. Not measured by this project (its CUDA build has not run here, docs/scaling.md; the GPU
  check's `vllm_rollout` stage measures it where vLLM is installed): chosen for what vLLM is built for, batched
  GPU decoding with a paged KV cache and CUDA graphs ("Efficient Memory Management for Large Language Model
  Serving with PagedAttention", arXiv:2309.06180, reports 14-24 times the throughput of transformers' generation).
- On a CPU (vLLM's CPU build): vLLM only for models of at least `CPU_VLLM_MIN_PARAMETERS` parameters with
  completions of at least `CPU_VLLM_MIN_NEW_TOKENS` tokens, where it was measured faster; at the default run's
  size the transformers engine with its static-cache decoder was faster, and it starts in under a second where
  vLLM takes seconds (4.5-56 s measured, the machine loaded).

The wiring to a run (its config, its model) is `unigrad.train.lifecycle.engine_selection`.
- Anything else (Apple's MPS, ...): the transformers engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EngineName = Literal["transformers", "vllm"]

# Measured (docs/performance.md, 2026-12-07): on 2 cores vLLM's CPU build made 1.8-3.1 times the transformers
# engine's tokens per second on a 25 M-parameter Qwen2 with 256-token completions (64 rows), and 0.55-0.89 times on
# examples/default.yaml (1.06 M parameters, 40 tokens, 128 rows). Nothing between was measured, so vLLM is picked
# from the winning point on. None (either): vLLM's CPU build is never picked.
CPU_VLLM_MIN_PARAMETERS: int | None = 25_000_000
CPU_VLLM_MIN_NEW_TOKENS: int | None = 256


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

