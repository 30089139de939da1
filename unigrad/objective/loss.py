"""`compute_policy_loss`: the unified policy-gradient estimator, assembled from its parts.

Per token t of completion i the loss to minimise is

    l_t = w_t * stabiliser(ratio_t, A_t)  +  beta * KL_t        (then aggregated)
    loss = aggregate(l) - entropy_coef * token_mean(H)

with ratio_t from `ratios.py`, the stabiliser from `stabilisers.py`, the detached behaviour
weight w_t from `corrections.py`, KL_t from `regularisers.py` and the aggregation from
`aggregation.py`. The order (behaviour weight on the policy term only, KL added per token
before aggregation) is the one TRL 1.16 uses.

Where unigrad departs from a naive implementation, and why:
- Masked positions are replaced by zeros with `torch.where` before any arithmetic, so a NaN or
  inf in padding never reaches the loss or the gradient (NaN * 0 = NaN would).
- All arithmetic runs in float32 whatever the input dtype (bf16 exp/log-ratios lose the 1e-3
  differences clipping depends on); gradients flow back to the input dtype.
- Normalisers are arguments: pass the counts of the whole optimizer batch to every micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from unigrad.objective.aggregation import Normalisers, aggregate, count_normalisers, masked_extreme, masked_mean
from unigrad.objective.corrections import CorrectionInput, correct, correction_metrics
from unigrad.objective.presets import ObjectiveError, resolve_objective
from unigrad.objective.ratios import RatioInput, compute_ratio
from unigrad.objective.registry import CORRECTION, RATIO, STABILISER
from unigrad.objective.regularisers import kl_penalty
from unigrad.objective.spec import Objective
from unigrad.objective.stabilisers import StabiliserInput, stabilise

# The metrics of the loss itself (all means are over the unmasked tokens of this call); each part's own metrics
# are in its registration, and `METRICS` lists both.
LOSS_METRICS: dict[str, str] = {
    "loss": "total loss of this call (policy + beta*KL - entropy bonus)",
    "loss/policy": "aggregated policy term (with behaviour weights)",
    "loss/kl": "aggregated beta * KL term",
    "loss/entropy": "entropy bonus subtracted from the loss (entropy_coef * mean entropy)",
    "ratio/mean": "mean of the policy ratio used by the stabiliser (on-policy tokens)",
    "ratio/min": "min of that ratio",
    "ratio/max": "max of that ratio",
}
TOKEN_METRICS: dict[str, str] = {
    "kl": "mean per-token KL estimate to the reference (when beta > 0)",
    "entropy": "mean per-token entropy (when given)",
    "off_policy_fraction": "fraction of tokens flagged off-policy (LUFFY demonstrations)",
    "token_weights_mean": "mean of the external per-token weights (token_weights), over valid tokens",
    "tokens": "number of unmasked tokens in this call",
}


def metric_descriptions() -> dict[str, str]:
    """Every metric name `compute_policy_loss` can report, with its meaning: the loss's own, then the registered
    stabilisers' and corrections' (read now, so a part registered later is included)."""
    return {**LOSS_METRICS, **STABILISER.metric_descriptions(), **CORRECTION.metric_descriptions(), **TOKEN_METRICS}


class _MetricDescriptions(Mapping[str, str]):
    """`METRICS`: a read-only view of `metric_descriptions()`, current with the registries."""

    def __getitem__(self, name: str) -> str:
        return metric_descriptions()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(metric_descriptions())

    def __len__(self) -> int:
        return len(metric_descriptions())

    def __repr__(self) -> str:
        return repr(metric_descriptions())


METRICS: Mapping[str, str] = _MetricDescriptions()


@dataclass
class LossOutputs:
    loss: torch.Tensor  # scalar, float32, with grad
    metrics: dict[str, float] = field(default_factory=dict)
    objective: Objective | None = None


def _check_shape(name: str, x: torch.Tensor | None, shape: torch.Size) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like logprobs")


def _as_bool_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)} like logprobs")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be boolean or contain only 0 and 1")
    return mask.bool()


def _zero_masked(x: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """float32 copy with masked positions set to 0 (NaN-safe; gradient 0 there)."""
    if x is None:
        return None
    x = x.float()
    return torch.where(mask, x, torch.zeros_like(x))


def _token_advantages(advantages: torch.Tensor, shape: torch.Size, mask: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, logprobs has {shape[0]}")
        advantages = advantages[:, None].expand(shape)
    elif advantages.shape != shape:
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(shape)}, got {tuple(advantages.shape)}")
    return _zero_masked(advantages.detach(), mask)


def _off_policy_tokens(off_policy_mask: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    if off_policy_mask is None:
        return None
    if off_policy_mask.dim() == 1:
        off_policy_mask = off_policy_mask[:, None].expand(mask.shape)
    if off_policy_mask.shape != mask.shape:
        raise ValueError(f"off_policy_mask must be (B,) or (B, T), got {tuple(off_policy_mask.shape)}")
    return off_policy_mask.bool() & mask


@dataclass
class LossInputs:
    """The tensors of one (micro-)batch's policy loss; every one (B, T) like `logprobs` unless noted."""

    logprobs: torch.Tensor  # log pi_theta of the sampled tokens, with grad
    mask: torch.Tensor  # bool (or 0/1): tokens that count
    advantages: torch.Tensor  # (B,) per sequence or (B, T) per token; constants
    old_logprobs: torch.Tensor | None = None  # log pi_old, detached; None = on-policy (old = sg(logprobs))
    infer_logprobs: torch.Tensor | None = None  # the rollout engine's; needed by the behaviour corrections
    ref_logprobs: torch.Tensor | None = None  # the reference model's; needed when beta > 0
    entropy: torch.Tensor | None = None  # per-token entropy with grad; needed when entropy_coef > 0
    off_policy_mask: torch.Tensor | None = None  # (B,) or (B, T) bool: demonstration tokens (LUFFY's route)
    token_weights: torch.Tensor | None = None  # constant weights of each token's policy term
    max_length: int | None = None  # L_max, the generation budget (seq_mean_token_sum_norm needs it)
    num_tokens: float | None = None  # normalisers of the whole optimizer batch; default: this call's counts
    num_sequences: float | None = None


_INPUT_FIELDS = frozenset(f.name for f in fields(LossInputs)) - {"logprobs", "mask", "advantages"}


def compute_policy_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    objective: str | Objective | dict[str, Any] = "grpo",
    **inputs_and_overrides: Any,
) -> LossOutputs:
    """The policy loss of one (micro-)batch under `objective`.

    Args:
        logprobs: (B, T) log pi_theta of the sampled tokens, with grad.
        mask: (B, T) bool (or 0/1), tokens that count.
        advantages: (B,) per sequence or (B, T) per token; treated as constants.
        objective: preset name (see `unigrad presets`), an `Objective`, or a dict of its fields.
        **inputs_and_overrides: the other tensors and counts of `LossInputs`, by keyword:
            old_logprobs: (B, T) log pi_old, detached; None means on-policy (old = sg(logprobs)).
            infer_logprobs: (B, T) the rollout engine's log-probs; needed by tis / icepop / seq_*.
            ref_logprobs: (B, T) reference-model log-probs; needed when beta > 0.
            max_length: L_max for seq_mean_token_sum_norm (the generation budget); required there.
            num_tokens, num_sequences: normalisers of the whole optimizer batch (see
                `aggregation.count_normalisers`); default: this call's counts.
            entropy: (B, T) per-token entropy with grad; needed when entropy_coef > 0.
            off_policy_mask: (B,) or (B, T) bool marking off-policy tokens (demonstrations), which
                enter through `objective.off_policy_ratio` (LUFFY) instead of the on-policy ratio.
            token_weights: (B, T) constant weights multiplying each token's policy term, e.g. rollout
                correction weights computed by another framework (verl's `rollout_is_weights`).
        and any `Objective` field as an override, e.g. epsilon=0.1, beta=0.001, tis_cap=3.

    Returns:
        LossOutputs with `.loss` (scalar) and `.metrics` (floats, names in `METRICS`).
    """
    tensors = {k: v for k, v in inputs_and_overrides.items() if k in _INPUT_FIELDS}
    overrides = {k: v for k, v in inputs_and_overrides.items() if k not in _INPUT_FIELDS}
    obj = resolve_objective(objective, **overrides)
    return policy_loss(LossInputs(logprobs, mask, advantages, **tensors), obj)


@dataclass
class _Tokens:
    """One call's tensors, float32 with masked positions zeroed; (B, T)."""

    mask: torch.Tensor  # bool, tokens that count
    logp: torch.Tensor  # log pi_theta, with grad
    old: torch.Tensor  # log pi_old, detached
    adv: torch.Tensor  # advantages, constants
    on: torch.Tensor  # bool, tokens that take the on-policy route
    off: torch.Tensor | None  # bool, tokens that take the off-policy route (None: no off_policy_mask)


def policy_loss(inputs: LossInputs, obj: Objective) -> LossOutputs:
    """The policy loss of one (micro-)batch under `obj`: typed inputs (`LossInputs`) in, `LossOutputs` out.
    `compute_policy_loss` is the same with keyword arguments and a preset name or overrides."""
    t = _prepare(inputs, obj)
    stats: dict[str, torch.Tensor] = {}
    ratio, policy, indicators = _policy_term(obj, t, stats)  # 1/pi_ref and the stabilisation mask
    policy, agg_mask = _behaviour_correction(obj, t, inputs.infer_logprobs, policy, stats)
    policy = _external_weights(inputs.token_weights, t.mask, policy, stats)
    kl = _kl_term(obj, t, inputs.ref_logprobs, ratio)
    norm = _normalisers(obj, inputs, agg_mask)
    per_token = policy if kl is None else policy + obj.beta * kl
    loss = aggregate(per_token, agg_mask, obj.aggregation, **norm)
    loss, entropy_term = _entropy_bonus(obj, inputs.entropy, t.mask, loss, norm["num_tokens"], stats)
    with torch.no_grad():
        stats["loss"] = loss.detach()
        if kl is not None:
            stats["loss/kl"] = aggregate(obj.beta * kl.detach(), agg_mask, obj.aggregation, **norm)
            stats["kl"] = masked_mean(kl.detach(), t.mask)
        stats["loss/policy"] = aggregate(policy.detach(), agg_mask, obj.aggregation, **norm)
        if entropy_term is not None:
            stats["loss/entropy"] = entropy_term.detach()
        if obj.uses_old_logprobs:
            r = ratio.detach()
            stats.update({"ratio/mean": masked_mean(r, t.on), "ratio/min": masked_extreme(r, t.on, torch.amin),
                          "ratio/max": masked_extreme(r, t.on, torch.amax)})
        stats.update({name: masked_mean(value.float(), t.on) for name, value in indicators.items()})
        stats["tokens"] = t.mask.sum()
        names = list(stats)
        values = torch.stack([torch.as_tensor(stats[n], dtype=torch.float32) for n in names]).tolist()
    return LossOutputs(loss=loss, metrics=dict(zip(names, values, strict=True)), objective=obj)


def _check_inputs(inputs: LossInputs, obj: Objective) -> None:
    """Shapes, and every tensor the objective needs is there."""
    if inputs.logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(inputs.logprobs.shape)}")
    shape = inputs.logprobs.shape
    for name in ("old_logprobs", "infer_logprobs", "ref_logprobs", "entropy", "token_weights"):
        _check_shape(name, getattr(inputs, name), shape)
    if obj.needs_infer_logprobs and inputs.infer_logprobs is None:
        raise ObjectiveError(f"correction={obj.correction!r} needs infer_logprobs from the rollout engine")
    if obj.needs_ref_logprobs and inputs.ref_logprobs is None:
        raise ObjectiveError(f"beta={obj.beta} needs ref_logprobs from the reference model")
    if obj.entropy_coef > 0 and inputs.entropy is None:
        raise ObjectiveError(f"entropy_coef={obj.entropy_coef} needs the per-token entropy")


def _prepare(inputs: LossInputs, obj: Objective) -> _Tokens:
    """Checked inputs as float32 with masked positions zeroed (NaN-safe), and the two routes' tokens."""
    _check_inputs(inputs, obj)
    shape = inputs.logprobs.shape
    mask = _as_bool_mask(inputs.mask, shape)
    off = _off_policy_tokens(inputs.off_policy_mask, mask)
    if off is not None and obj.off_policy_ratio is None:
        raise ObjectiveError("off_policy_mask given, but the objective sets no off_policy_ratio (see 'luffy')")
    logp = _zero_masked(inputs.logprobs, mask)
    old = logp.detach() if inputs.old_logprobs is None else _zero_masked(inputs.old_logprobs.detach(), mask)
    adv = _token_advantages(inputs.advantages, shape, mask)
    return _Tokens(mask, logp, old, adv, mask if off is None else mask & ~off, off)


def _policy_term(obj: Objective, t: _Tokens, stats: dict[str, torch.Tensor]):
    """(ratio, per-token policy loss, stabiliser indicators): the on-policy route through the ratio level and the
    stabiliser, the off-policy tokens through `off_policy_ratio`."""
    ratio = compute_ratio(obj, RatioInput(t.logp, t.old, t.on))
    policy, indicators = stabilise(obj, StabiliserInput(ratio, t.adv, t.logp))
    if RATIO.has(obj.ratio, "is_self"):
        policy = -t.adv * t.logp  # same gradient as -A*pi/sg(pi); its value is the NLL, which is what users log
    if t.off is not None:
        policy = torch.where(t.off, -_off_policy_term(obj, t) * t.adv, policy)
        stats["off_policy_fraction"] = masked_mean(t.off.float(), t.mask)
    return ratio, policy, indicators


def _off_policy_term(obj: Objective, t: _Tokens) -> torch.Tensor:
    """The off-policy tokens' likelihood term: log pi in the SFT form (its value the NLL), else the level's r."""
    part = RATIO[obj.off_policy_ratio]
    if "is_self" in part.traits:
        return t.logp
    return part.function(RatioInput(t.logp, t.old, t.off), part.args(obj))


def _behaviour_correction(obj: Objective, t: _Tokens, infer_logprobs: torch.Tensor | None, policy: torch.Tensor,
                          stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy weighted by the correction on the on-policy tokens, the tokens the aggregation counts)."""
    if not obj.needs_infer_logprobs:
        return policy, t.mask
    bw = correct(obj.correction, obj, CorrectionInput(t.old, _zero_masked(infer_logprobs.detach(), t.mask), t.on))
    weight = torch.where(t.on, bw.weight, torch.ones_like(bw.weight))
    policy = torch.where(weight == 0, torch.zeros_like(policy), policy * weight)
    stats.update(correction_metrics(bw, weight, t.on, t.mask))
    return policy, (t.mask if obj.masked_tokens_in_denominator else t.mask & ~bw.zeroed)


def _external_weights(token_weights: torch.Tensor | None, mask: torch.Tensor, policy: torch.Tensor,
                      stats: dict[str, torch.Tensor]) -> torch.Tensor:
    if token_weights is None:
        return policy
    weights = _zero_masked(token_weights.detach(), mask)
    stats["token_weights_mean"] = masked_mean(weights, mask)
    return policy * weights


def _kl_term(obj: Objective, t: _Tokens, ref_logprobs: torch.Tensor | None,
             ratio: torch.Tensor) -> torch.Tensor | None:
    """Per-token KL to the reference (times the ratio if `kl_ratio_weighted`), or None when beta = 0."""
    if obj.beta <= 0:
        return None
    kl = kl_penalty(t.logp, _zero_masked(ref_logprobs.detach(), t.mask), obj.kl_estimator, obj.kl_clamp)
    return kl * ratio if obj.kl_ratio_weighted else kl


def _normalisers(obj: Objective, inputs: LossInputs, agg_mask: torch.Tensor) -> dict[str, Any]:
    """The aggregation's normalisers: the given ones, else (and always with the local scope) this call's counts."""
    num_tokens, num_sequences = inputs.num_tokens, inputs.num_sequences
    if num_tokens is None or obj.normaliser_scope == "local":
        num_tokens = float(agg_mask.sum().item())
    if num_sequences is None:
        num_sequences = float(agg_mask.shape[0])
    # No default for L_max: the padded width T of one batch is not the generation budget, and
    # silently using it would rescale Dr. GRPO's loss from batch to batch.
    return dict(num_tokens=num_tokens, num_sequences=num_sequences, max_length=inputs.max_length)


def _entropy_bonus(obj: Objective, entropy: torch.Tensor | None, mask: torch.Tensor, loss: torch.Tensor,
                   num_tokens: float, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss minus the entropy bonus, the bonus or None); the mean entropy goes to `stats` whenever it is given."""
    if obj.entropy_coef > 0:
        ent = _zero_masked(entropy, mask)
        entropy_term = obj.entropy_coef * ent.sum() / max(num_tokens, 1.0)
        stats["entropy"] = masked_mean(ent.detach(), mask)
        return loss - entropy_term, entropy_term
    if entropy is not None:
        stats["entropy"] = masked_mean(_zero_masked(entropy.detach(), mask), mask)
    return loss, None


def batch_normalisers(
    mask: torch.Tensor,
    objective: str | Objective | dict[str, Any] = "grpo",
    old_logprobs: torch.Tensor | None = None,
    infer_logprobs: torch.Tensor | None = None,
    **overrides: Any,
) -> Normalisers:
    """`count_normalisers` for one piece of the optimizer batch, as `objective` counts tokens.

    Only differs from `count_normalisers(mask)` when the objective drops tokens zeroed by its
    behaviour correction from the denominator (`masked_tokens_in_denominator=False`); then it
    needs `old_logprobs` (the trainer's log-probs of the sampled tokens; on-policy, the current
    ones) and `infer_logprobs`. Sum the results over micro-batches and processes.
    """
    obj = resolve_objective(objective, **overrides)
    mask = _as_bool_mask(mask, mask.shape)
    if obj.masked_tokens_in_denominator or not obj.correction_zeroes_tokens:
        return count_normalisers(mask)
    if old_logprobs is None or infer_logprobs is None:
        raise ObjectiveError("masked_tokens_in_denominator=False needs old_logprobs and infer_logprobs to count")
    bw = correct(obj.correction, obj, CorrectionInput(
        _zero_masked(old_logprobs.detach(), mask), _zero_masked(infer_logprobs.detach(), mask), mask))
    return count_normalisers(mask & ~bw.zeroed)
