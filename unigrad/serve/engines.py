"""The model and engine `unigrad serve MODEL` samples with: the model loaded by name or path (a run directory
loads its final/), on a CUDA GPU when there is one, sampled by the transformers engine or vLLM (`auto`: the rule
of `unigrad.rollout.engine_choice`, for completions of `DEFAULT_MAX_TOKENS` tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrad.models.loading import load_model_and_tokenizer
from unigrad.rollout.base import RolloutEngine
from unigrad.rollout.engine_choice import EngineSituation, choose_rollout_engine
from unigrad.serve.service import DEFAULT_MAX_TOKENS, context_length_of

ENGINES = ("auto", "transformers", "vllm")


@dataclass
class OpenedEngine:
    engine: RolloutEngine
    tokenizer: object
    context_length: int
    name: str  # "transformers" or "vllm"
    reason: str  # why this engine


def vllm_unavailable_for(model) -> str | None:
    """Why vLLM cannot sample `model` here (None: it can), as the trainer's engine choice asks it."""
    from unigrad.rollout.vllm_engine import (
        VLLMUnavailable,
        check_cpu_head_size,
        check_cpu_mixture_of_experts,
        vllm_on_cpu,
        vllm_unavailable_reason,
    )

    reason = vllm_unavailable_reason()
    if reason is None and vllm_on_cpu():
        try:
            check_cpu_head_size(model.config)
            check_cpu_mixture_of_experts(model.config)
        except VLLMUnavailable as err:
            reason = str(err)
    return reason


def open_engine(model_name: str, engine: str = "auto") -> OpenedEngine:
    """Load `model_name` (a name, a model directory or a run directory) and the engine that samples it."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(model_name, device=device)
    model.eval()
    context = context_length_of(tokenizer, model)
    reason = "named by --engine"
    if engine == "auto":
        choice = choose_rollout_engine(EngineSituation(
            vllm_unavailable=vllm_unavailable_for(model), device_type=device,
            parameters=sum(p.numel() for p in model.parameters()), max_new_tokens=DEFAULT_MAX_TOKENS))
        engine, reason = choice.engine, choice.reason
    if engine == "vllm" and (unavailable := vllm_unavailable_for(model)) is not None:
        raise ValueError(f"--engine vllm: {unavailable}")
    if engine == "vllm":
        from unigrad.rollout.vllm_engine import VLLMEngine

        sampler = VLLMEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, max_model_len=context)
    else:
        from unigrad.rollout.transformers_engine import TransformersEngine

        sampler = TransformersEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, device=device)
    return OpenedEngine(sampler, tokenizer, context, engine, reason)
