"""Rollout engines: the `RolloutEngine` protocol, the transformers engine, teacher-forced log-probs."""

from .base import Rollout, RolloutEngine, SamplingParams
from .logprobs import sequence_logprobs
from .sampling import filter_logits, select_next_tokens

__all__ = [
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "TransformersEngine",
    "filter_logits",
    "select_next_tokens",
    "sequence_logprobs",
]


def __getattr__(name: str):
    if name == "TransformersEngine":  # imported lazily: it pulls in transformers
        from .transformers_engine import TransformersEngine

        return TransformersEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
