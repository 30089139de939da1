"""Behaviour correction: weights for the gap between the rollout engine and the trainer.

rho_t = pi_old(y_t) / pi_infer(y_t) = exp(old_t - infer_t), where `old` is the trainer's
log-prob of the sampled token under the sampling policy and `infer` is what the rollout engine
reported. Weights are always detached: they re-weight the gradient, they are not optimised.

- tis       w_t = clamp(rho_t, floor, C)              truncated IS (Yao et al. 2025, "Your efficient
                                                      RL framework secretly brings you off-policy RL")
- icepop    w_t = rho_t if alpha <= rho_t <= beta else 0   (IcePop, Ring-1T arXiv 2510.18855)
- seq_tis   the same truncation on a sequence-level rho_i, shared by the sequence's tokens
- seq_mask  the same band mask on a sequence-level rho_i
  with rho_i = exp(mean_t log rho_t) ("geometric", length-normalised, unigrad's default) or
  exp(sum_t log rho_t) ("product", TRL's sequence_* modes; explodes with length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrad.objective.ratios import masked_row_mean
from unigrad.objective.registry import CORRECTION

METRICS = ("correction/rho_mean", "correction/rho_min", "correction/rho_max", "correction/weight_mean",
           "correction/masked_fraction", "correction/truncated_fraction")


@dataclass(frozen=True)
class BehaviourWeights:
    weight: torch.Tensor  # (B, T) detached, multiplies the per-token policy loss
    rho: torch.Tensor  # (B, T) raw rho the rule was applied to (token- or sequence-level), detached
    zeroed: torch.Tensor  # (B, T) bool, tokens whose weight the rule set to 0
    truncated: torch.Tensor  # (B, T) bool, tokens whose weight the rule truncated


def _sequence_log_rho(log_rho: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """(B, T) token log-rho -> (B, T) sequence log-rho broadcast over the row."""
    if form == "geometric":
        seq = masked_row_mean(log_rho, mask)
    elif form == "product":
        seq = torch.where(mask, log_rho, torch.zeros_like(log_rho)).sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown sequence ratio form {form!r}")
    return seq.expand_as(log_rho)


def behaviour_weights(
    name: str,
    old: torch.Tensor,
    infer: torch.Tensor,
    mask: torch.Tensor,
    *,
    form: str = "geometric",
    tis_cap: float = 2.0,
    tis_floor: float | None = None,
    icepop_low: float = 0.5,
    icepop_high: float = 5.0,
) -> BehaviourWeights:
    """Detached behaviour-correction weights of the registered rule.  old, infer: (B, T), zero at masked positions."""
    return CORRECTION[name].function(old, infer, mask, form=form, tis_cap=tis_cap, tis_floor=tis_floor,
                                     icepop_low=icepop_low, icepop_high=icepop_high)


def _rho(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, form: str | None) -> torch.Tensor:
    """rho = pi_old / pi_infer per token, or per sequence (broadcast over its tokens) when `form` is given."""
    log_rho = (old - infer).detach()  # (B, T)
    if form is not None:
        log_rho = _sequence_log_rho(log_rho, mask, form)
    return torch.exp(log_rho)


def _truncate(rho, mask, tis_cap, tis_floor) -> BehaviourWeights:
    weight = rho.clamp(min=tis_floor, max=tis_cap)
    truncated = (rho > tis_cap) if tis_floor is None else (rho > tis_cap) | (rho < tis_floor)
    return BehaviourWeights(weight, rho, torch.zeros_like(mask), truncated & mask)


def _band(rho, mask, icepop_low, icepop_high) -> BehaviourWeights:
    outside = (rho < icepop_low) | (rho > icepop_high)
    weight = torch.where(outside, torch.zeros_like(rho), rho)
    return BehaviourWeights(weight, rho, outside & mask, torch.zeros_like(mask))


def _seq(o) -> str:
    return "ρ_i = " + ("exp(mean_t log ρ_t)" if o.correction_form == "geometric" else "Π_t ρ_t")


def _band_text(o, rho: str) -> str:
    return f"{rho}·1[{o.icepop_low:g} ≤ {rho} ≤ {o.icepop_high:g}]"


@CORRECTION.register("none", formula=lambda o: "")
def _none(old, infer, mask, **_) -> BehaviourWeights:
    rho = _rho(old, infer, mask, None)
    return BehaviourWeights(torch.ones_like(rho), rho, torch.zeros_like(mask), torch.zeros_like(mask))


@CORRECTION.register("tis", formula=lambda o: f"ℓ ← min(ρ, {o.tis_cap:g})·ℓ, ρ = π_old/π_infer",
                     label=lambda o: f"tis C={o.tis_cap:g}", metrics=METRICS)
def _tis(old, infer, mask, *, tis_cap, tis_floor, **_) -> BehaviourWeights:
    return _truncate(_rho(old, infer, mask, None), mask, tis_cap, tis_floor)


@CORRECTION.register("icepop", traits=("zeroes_tokens",),
                     formula=lambda o: f"ℓ ← {_band_text(o, 'ρ')}·ℓ, ρ = π_old/π_infer",
                     label=lambda o: f"icepop [{o.icepop_low:g}, {o.icepop_high:g}]", metrics=METRICS)
def _icepop(old, infer, mask, *, icepop_low, icepop_high, **_) -> BehaviourWeights:
    return _band(_rho(old, infer, mask, None), mask, icepop_low, icepop_high)


@CORRECTION.register("seq_tis", formula=lambda o: f"ℓ ← min(ρ_i, {o.tis_cap:g})·ℓ, {_seq(o)}",
                     label=lambda o: f"seq_tis ({o.correction_form}) C={o.tis_cap:g}", metrics=METRICS)
def _seq_tis(old, infer, mask, *, form, tis_cap, tis_floor, **_) -> BehaviourWeights:
    return _truncate(_rho(old, infer, mask, form), mask, tis_cap, tis_floor)


@CORRECTION.register("seq_mask", traits=("zeroes_tokens",),
                     formula=lambda o: f"ℓ ← {_band_text(o, 'ρ_i')}·ℓ, {_seq(o)}",
                     label=lambda o: f"seq_mask ({o.correction_form}) [{o.icepop_low:g}, {o.icepop_high:g}]",
                     metrics=METRICS)
def _seq_mask(old, infer, mask, *, form, icepop_low, icepop_high, **_) -> BehaviourWeights:
    return _band(_rho(old, infer, mask, form), mask, icepop_low, icepop_high)
