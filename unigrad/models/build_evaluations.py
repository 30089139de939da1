"""The held-out evaluation each embedded model's build ends with, by model name.

Evaluation sits in a layer above models (``unigrad.eval``), so a build cannot import it: the package root registers
``unigrad.eval.tiny_heldout_accuracy`` for ``unigrad-tiny`` (and ``unigrad-tiny-moe``, built from the same recipe)
and ``unigrad.eval.chat_heldout_report`` for ``unigrad-chat`` when ``unigrad`` is imported, which every import of a
unigrad module does first; each is imported only when a build calls it. A build handed an evaluation
(``ensure_tiny(evaluate_built=...)``) uses that one instead. This module imports nothing, so that registering costs
``import unigrad`` nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (model, tokenizer, recipe) -> what the build records in report.json
BuildEvaluation = Callable[[Any, Any, Any], dict[str, Any]]

_EVALUATIONS: dict[str, BuildEvaluation] = {}


def register_build_evaluation(model_name: str, evaluation: BuildEvaluation) -> None:
    """Have every build of the embedded model `model_name` end with `evaluation` (replacing any earlier one)."""
    _EVALUATIONS[model_name] = evaluation


def build_evaluation(model_name: str) -> BuildEvaluation | None:
    """The evaluation registered for `model_name`'s builds; None where none is (the build then records none)."""
    return _EVALUATIONS.get(model_name)
