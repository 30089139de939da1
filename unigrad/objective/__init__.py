"""Pure tensor maths of the unified policy-gradient estimator (no model, no I/O).

    from unigrad.objective import compute_policy_loss
    out = compute_policy_loss(logprobs, mask, advantages, objective="grpo")
    out.loss.backward(); out.metrics["clip/region_fraction"]
"""

from unigrad.objective.advantages import ESTIMATORS, compute_advantages
from unigrad.objective.aggregation import AGGREGATIONS, Normalisers, aggregate, count_normalisers
from unigrad.objective.corrections import BehaviourWeights, CorrectionSettings, behaviour_weights
from unigrad.objective.loss import METRICS, LossInputs, LossOutputs, batch_normalisers, compute_policy_loss, policy_loss
from unigrad.objective.presets import PRESETS, ObjectiveError, Preset, get_preset, resolve_objective
from unigrad.objective.regularisers import entropy_from_logits, kl_penalty
from unigrad.objective.spec import Objective

__all__ = [
    "AGGREGATIONS", "ESTIMATORS", "METRICS", "PRESETS",
    "BehaviourWeights", "CorrectionSettings", "LossInputs", "LossOutputs", "Normalisers", "Objective", "ObjectiveError",
    "Preset",
    "aggregate", "batch_normalisers", "behaviour_weights", "compute_advantages", "compute_policy_loss",
    "count_normalisers", "entropy_from_logits", "get_preset", "kl_penalty", "policy_loss", "resolve_objective",
]
