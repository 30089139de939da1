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

from dataclasses import dataclass, field
from typing import Any

import torch

from unigrad.objective.aggregation import Normalisers, aggregate, count_normalisers, masked_mean
from unigrad.objective.corrections import behaviour_weights
from unigrad.objective.presets import ObjectiveError, resolve_objective
from unigrad.objective.ratios import compute_ratio, shaped_probability
from unigrad.objective.registry import RATIO
from unigrad.objective.regularisers import kl_penalty
from unigrad.objective.spec import Objective
from unigrad.objective.stabilisers import stabilise

# Metric names and meanings (all means are over the unmasked tokens of this call).
METRICS: dict[str, str] = {
    "loss": "total loss of this call (policy + beta*KL - entropy bonus)",
    "loss/policy": "aggregated policy term (with behaviour weights)",
    "loss/kl": "aggregated beta * KL term",
    "loss/entropy": "entropy bonus subtracted from the loss (entropy_coef * mean entropy)",
    "ratio/mean": "mean of the policy ratio used by the stabiliser (on-policy tokens)",
    "ratio/min": "min of that ratio",
    "ratio/max": "max of that ratio",
    "clip/low_fraction": "fraction of tokens with r < 1-eps and A < 0 (gradient clipped away)",
    "clip/high_fraction": "fraction of tokens with r > 1+eps_high and A > 0 (gradient clipped away)",
    "clip/region_fraction": "fraction of tokens whose gradient the clip (or dual clip) removes",
    "clip/dual_fraction": "dual_clip: fraction of A < 0 tokens capped at c*|A|",
    "clip/truncated_fraction": "cispo: fraction of tokens whose IS weight is truncated at cispo_max",
    "gate/weight_mean": "soft_gate: mean gradient weight 4*sigma*(1-sigma) (1 = on-policy)",
    "correction/rho_mean": "mean of the raw behaviour ratio rho = pi_old/pi_infer (before the rule)",
    "correction/rho_min": "min of raw rho",
    "correction/rho_max": "max of raw rho",
    "correction/weight_mean": "mean behaviour weight after truncation / masking",
    "correction/masked_fraction": "fraction of tokens the correction zeroed (icepop, seq_mask)",
    "correction/truncated_fraction": "fraction of tokens the correction truncated (tis, seq_tis)",
    "kl": "mean per-token KL estimate to the reference (when beta > 0)",
    "entropy": "mean per-token entropy (when given)",
    "off_policy_fraction": "fraction of tokens flagged off-policy (LUFFY demonstrations)",
    "token_weights_mean": "mean of the external per-token weights (token_weights), over valid tokens",
    "tokens": "number of unmasked tokens in this call",
}


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


def compute_policy_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    objective: str | Objective | dict[str, Any] = "grpo",
    old_logprobs: torch.Tensor | None = None,
    infer_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    max_length: int | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    *,
    entropy: torch.Tensor | None = None,
    off_policy_mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    **overrides: Any,
) -> LossOutputs:
    """The policy loss of one (micro-)batch under `objective`.

    Args:
        logprobs: (B, T) log pi_theta of the sampled tokens, with grad.
        mask: (B, T) bool (or 0/1), tokens that count.
        advantages: (B,) per sequence or (B, T) per token; treated as constants.
        objective: preset name (see `unigrad presets`), an `Objective`, or a dict of its fields.
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
        **overrides: any `Objective` field, e.g. epsilon=0.1, beta=0.001, tis_cap=3.

    Returns:
        LossOutputs with `.loss` (scalar) and `.metrics` (floats, names in `METRICS`).
    """
    obj = resolve_objective(objective, **overrides)
    return policy_loss(LossInputs(
        logprobs, mask, advantages, old_logprobs=old_logprobs, infer_logprobs=infer_logprobs,
        ref_logprobs=ref_logprobs, entropy=entropy, off_policy_mask=off_policy_mask, token_weights=token_weights,
        max_length=max_length, num_tokens=num_tokens, num_sequences=num_sequences), obj)


def policy_loss(inputs: LossInputs, obj: Objective) -> LossOutputs:
    """The policy loss of one (micro-)batch under `obj`: typed inputs (`LossInputs`) in, `LossOutputs` out.
    `compute_policy_loss` is the same with keyword arguments and a preset name or overrides."""
    logprobs, mask, advantages = inputs.logprobs, inputs.mask, inputs.advantages
    old_logprobs, infer_logprobs, ref_logprobs = inputs.old_logprobs, inputs.infer_logprobs, inputs.ref_logprobs
    entropy, off_policy_mask, token_weights = inputs.entropy, inputs.off_policy_mask, inputs.token_weights
    max_length, num_tokens, num_sequences = inputs.max_length, inputs.num_tokens, inputs.num_sequences
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    mask = _as_bool_mask(mask, shape)
    for name, x in (("old_logprobs", old_logprobs), ("infer_logprobs", infer_logprobs),
                    ("ref_logprobs", ref_logprobs), ("entropy", entropy), ("token_weights", token_weights)):
        _check_shape(name, x, shape)
    if obj.needs_infer_logprobs and infer_logprobs is None:
        raise ObjectiveError(f"correction={obj.correction!r} needs infer_logprobs from the rollout engine")
    if obj.needs_ref_logprobs and ref_logprobs is None:
        raise ObjectiveError(f"beta={obj.beta} needs ref_logprobs from the reference model")
    if obj.entropy_coef > 0 and entropy is None:
        raise ObjectiveError(f"entropy_coef={obj.entropy_coef} needs the per-token entropy")
    off = _off_policy_tokens(off_policy_mask, mask)
    if off is not None and obj.off_policy_ratio is None:
        raise ObjectiveError("off_policy_mask given, but the objective sets no off_policy_ratio (see 'luffy')")

    logp = _zero_masked(logprobs, mask)  # (B, T) float32, 0 at masked positions
    old = logp.detach() if old_logprobs is None else _zero_masked(old_logprobs.detach(), mask)
    adv = _token_advantages(advantages, shape, mask)  # (B, T)
    on = mask if off is None else mask & ~off  # tokens that take the on-policy route
    stats: dict[str, torch.Tensor] = {}

    # 1/pi_ref and the stabilisation mask.
    ratio = compute_ratio(obj.ratio, logp, old, on, shaping=obj.shaping, clamp=obj.log_ratio_clamp)
    policy, flags = stabilise(
        obj.stabiliser, ratio, adv, logp,
        epsilon=obj.epsilon, epsilon_high=obj.epsilon_upper, dual_clip_c=obj.dual_clip_c,
        tau_pos=obj.tau_pos, tau_neg=obj.tau_neg, cispo_max=obj.cispo_max,
    )  # (B, T)
    if "is_self" in RATIO[obj.ratio].traits:
        policy = -adv * logp  # same gradient as -A*pi/sg(pi); its value is the NLL, which is what users log
    if off is not None:
        off_term = shaped_probability(logp, obj.shaping) if obj.off_policy_ratio == "none" else logp
        policy = torch.where(off, -off_term * adv, policy)
        stats["off_policy_fraction"] = masked_mean(off.float(), mask)

    # Behaviour correction against the rollout engine (on-policy tokens only).
    agg_mask = mask
    if obj.correction != "none":
        bw = behaviour_weights(
            obj.correction, old, _zero_masked(infer_logprobs.detach(), mask), on,
            form=obj.correction_form, tis_cap=obj.tis_cap, tis_floor=obj.tis_floor,
            icepop_low=obj.icepop_low, icepop_high=obj.icepop_high,
        )
        weight = torch.where(on, bw.weight, torch.ones_like(bw.weight))
        policy = torch.where(weight == 0, torch.zeros_like(policy), policy * weight)
        if not obj.masked_tokens_in_denominator:
            agg_mask = mask & ~bw.zeroed
        stats.update({
            "correction/rho_mean": masked_mean(bw.rho, on),
            "correction/rho_min": _masked_extreme(bw.rho, on, torch.amin),
            "correction/rho_max": _masked_extreme(bw.rho, on, torch.amax),
            "correction/weight_mean": masked_mean(weight, mask),
            "correction/masked_fraction": masked_mean(bw.zeroed.float(), mask),
            "correction/truncated_fraction": masked_mean(bw.truncated.float(), mask),
        })

    if token_weights is not None:
        weights = _zero_masked(token_weights.detach(), mask)
        policy = policy * weights
        stats["token_weights_mean"] = masked_mean(weights, mask)

    per_token = policy
    kl = None
    if obj.beta > 0:
        kl = kl_penalty(logp, _zero_masked(ref_logprobs.detach(), mask), obj.kl_estimator, obj.kl_clamp)
        if obj.kl_ratio_weighted:
            kl = kl * ratio
        per_token = per_token + obj.beta * kl

    if num_tokens is None or obj.normaliser_scope == "local":
        num_tokens = float(agg_mask.sum().item())
    if num_sequences is None:
        num_sequences = float(shape[0])
    # No default for L_max: the padded width T of one batch is not the generation budget, and
    # silently using it would rescale Dr. GRPO's loss from batch to batch.
    norm = dict(num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length)
    loss = aggregate(per_token, agg_mask, obj.aggregation, **norm)

    entropy_term = None
    if obj.entropy_coef > 0:
        ent = _zero_masked(entropy, mask)
        entropy_term = obj.entropy_coef * ent.sum() / max(num_tokens, 1.0)
        loss = loss - entropy_term
        stats["entropy"] = masked_mean(ent.detach(), mask)
    elif entropy is not None:
        stats["entropy"] = masked_mean(_zero_masked(entropy.detach(), mask), mask)

    with torch.no_grad():
        stats["loss"] = loss.detach()
        if kl is not None:
            stats["loss/kl"] = aggregate(obj.beta * kl.detach(), agg_mask, obj.aggregation, **norm)
            stats["kl"] = masked_mean(kl.detach(), mask)
        stats["loss/policy"] = aggregate(policy.detach(), agg_mask, obj.aggregation, **norm)
        if entropy_term is not None:
            stats["loss/entropy"] = entropy_term.detach()
        if obj.uses_old_logprobs:
            r = ratio.detach()
            stats["ratio/mean"] = masked_mean(r, on)
            stats["ratio/min"] = _masked_extreme(r, on, torch.amin)
            stats["ratio/max"] = _masked_extreme(r, on, torch.amax)
        for name, value in flags.items():
            stats[name] = masked_mean(value.float(), on)
        stats["tokens"] = mask.sum()
        names = list(stats)
        values = torch.stack([torch.as_tensor(stats[n], dtype=torch.float32) for n in names]).tolist()
    return LossOutputs(loss=loss, metrics=dict(zip(names, values, strict=True)), objective=obj)


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
    bw = behaviour_weights(
        obj.correction, _zero_masked(old_logprobs.detach(), mask), _zero_masked(infer_logprobs.detach(), mask),
        mask, form=obj.correction_form, icepop_low=obj.icepop_low, icepop_high=obj.icepop_high,
    )
    return count_normalisers(mask & ~bw.zeroed)


def _masked_extreme(x: torch.Tensor, mask: torch.Tensor, reduce) -> torch.Tensor:
    if not bool(mask.any()):
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return reduce(x[mask])
