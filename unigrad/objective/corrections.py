"""Behaviour correction: weights for the gap between the rollout engine and the trainer.

rho_t = pi_old(y_t) / pi_infer(y_t) = exp(old_t - infer_t), where `old` is the trainer's
log-prob of the sampled token under the sampling policy and `infer` is what the rollout engine
reported. Weights are always detached: they re-weight the gradient, they are not optimised. Every correction is
`function(x: CorrectionInput, args) -> BehaviourWeights`, with its own typed arguments (`Truncation`, `Band`).

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
from typing import Any

import torch

from unigrad.objective.aggregation import masked_extreme, masked_mean
from unigrad.objective.ratios import masked_row_mean
from unigrad.objective.registry import CORRECTION, PartText

METRICS = {
    "correction/rho_mean": "mean of the raw behaviour ratio rho = pi_old/pi_infer (before the rule)",
    "correction/rho_min": "min of raw rho",
    "correction/rho_max": "max of raw rho",
    "correction/weight_mean": "mean behaviour weight after truncation / masking",
    "correction/masked_fraction": "fraction of tokens the correction zeroed (icepop, seq_mask)",
    "correction/truncated_fraction": "fraction of tokens the correction truncated (tis, seq_tis)",
}


@dataclass(frozen=True)
class CorrectionInput:
    """What every correction reads; (B, T), zero at masked positions."""

    old: torch.Tensor  # the trainer's log-probs of the sampled tokens (pi_old)
    infer: torch.Tensor  # the rollout engine's log-probs of the same tokens (pi_infer)
    mask: torch.Tensor  # bool, tokens that count


@dataclass(frozen=True)
class Truncation:
    cap: float  # C: w = min(rho, C)
    floor: float | None = None  # optional lower truncation
    form: str | None = None  # None: per token; "geometric" / "product": one rho per sequence

    def __post_init__(self) -> None:
        if self.cap <= 0 or (self.floor is not None and not 0 <= self.floor <= self.cap):
            raise ValueError(f"truncation needs cap > 0 and 0 <= floor <= cap, got cap={self.cap}, floor={self.floor}")


@dataclass(frozen=True)
class Band:
    low: float  # rho < low gets weight 0
    high: float  # rho > high gets weight 0
    form: str | None = None  # None: per token; "geometric" / "product": one rho per sequence

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"the band needs 0 <= low < high, got [{self.low}, {self.high}]")


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


@dataclass(frozen=True)
class CorrectionSettings:
    """The `Objective` fields a behaviour correction reads, under the same names, with the same defaults."""

    correction_form: str = "geometric"
    tis_cap: float = 2.0
    tis_floor: float | None = None
    icepop_low: float = 0.5
    icepop_high: float = 5.0


def behaviour_weights(name: str, old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor,
                      settings: CorrectionSettings = CorrectionSettings()) -> BehaviourWeights:
    """Detached behaviour-correction weights of the registered rule.  old, infer: (B, T), zero at masked positions."""
    return correct(name, settings, CorrectionInput(old, infer, mask))


def correct(name: str, objective: Any, x: CorrectionInput) -> BehaviourWeights:
    """The registered correction `name` applied to `x`, with the arguments its registration reads from `objective`
    (an `Objective`, or anything with the fields it reads)."""
    part = CORRECTION[name]
    return part.function(x, part.args(objective))


def correction_metrics(bw: BehaviourWeights, weight: torch.Tensor, on: torch.Tensor,
                       mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The values of `METRICS`: rho over the on-policy tokens `on`, the applied `weight` over all of `mask`."""
    return {
        "correction/rho_mean": masked_mean(bw.rho, on),
        "correction/rho_min": masked_extreme(bw.rho, on, torch.amin),
        "correction/rho_max": masked_extreme(bw.rho, on, torch.amax),
        "correction/weight_mean": masked_mean(weight, mask),
        "correction/masked_fraction": masked_mean(bw.zeroed.float(), mask),
        "correction/truncated_fraction": masked_mean(bw.truncated.float(), mask),
    }


def _rho(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, form: str | None) -> torch.Tensor:
    """rho = pi_old / pi_infer per token, or per sequence (broadcast over its tokens) when `form` is given."""
    log_rho = (old - infer).detach()  # (B, T)
    if form is not None:
        log_rho = _sequence_log_rho(log_rho, mask, form)
    return torch.exp(log_rho)


def _truncate(rho: torch.Tensor, mask: torch.Tensor, args: Truncation) -> BehaviourWeights:
    weight = rho.clamp(min=args.floor, max=args.cap)
    truncated = (rho > args.cap) if args.floor is None else (rho > args.cap) | (rho < args.floor)
    return BehaviourWeights(weight, rho, torch.zeros_like(mask), truncated & mask)


def _band(rho: torch.Tensor, mask: torch.Tensor, args: Band) -> BehaviourWeights:
    outside = (rho < args.low) | (rho > args.high)
    weight = torch.where(outside, torch.zeros_like(rho), rho)
    return BehaviourWeights(weight, rho, outside & mask, torch.zeros_like(mask))


def _seq(o) -> str:
    return "ρ_i = " + ("exp(mean_t log ρ_t)" if o.correction_form == "geometric" else "Π_t ρ_t")


def _band_text(o, rho: str) -> str:
    return f"{rho}·1[{o.icepop_low:g} ≤ {rho} ≤ {o.icepop_high:g}]"


@CORRECTION.register("none", text=PartText(lambda o: "", summary="no correction, weight 1", doc=("1", "")))
def _none(x: CorrectionInput, args: Any) -> BehaviourWeights:
    rho = _rho(x.old, x.infer, x.mask, None)
    return BehaviourWeights(torch.ones_like(rho), rho, torch.zeros_like(x.mask), torch.zeros_like(x.mask))


_CORRECTS = ("reads_infer_logprobs",)


@CORRECTION.register(
    "tis", traits=_CORRECTS, args=lambda o: Truncation(o.tis_cap, o.tis_floor), metrics=METRICS,
    text=PartText(
        lambda o: f"ℓ ← min(ρ, {o.tis_cap:g})·ℓ, ρ = π_old/π_infer",
        summary="truncated IS, w = min(rho, tis_cap) (and >= tis_floor if set)", label=lambda o: f"tis C={o.tis_cap:g}",
        doc=("clamp(ρ_t, `tis_floor`, C)", "C = `tis_cap` = 2 (verl; TRL uses 3)"),
    ),
)
def _tis(x: CorrectionInput, args: Truncation) -> BehaviourWeights:
    return _truncate(_rho(x.old, x.infer, x.mask, args.form), x.mask, args)


@CORRECTION.register(
    "icepop", traits=(*_CORRECTS, "zeroes_tokens"), args=lambda o: Band(o.icepop_low, o.icepop_high), metrics=METRICS,
    text=PartText(
        lambda o: f"ℓ ← {_band_text(o, 'ρ')}·ℓ, ρ = π_old/π_infer",
        summary="keep rho inside [icepop_low, icepop_high], zero outside",
        label=lambda o: f"icepop [{o.icepop_low:g}, {o.icepop_high:g}]",
        doc=("ρ_t if α ≤ ρ_t ≤ β else 0", "α = 0.5, β = 5 (slime uses [0, 2])"),
    ),
)
def _icepop(x: CorrectionInput, args: Band) -> BehaviourWeights:
    return _band(_rho(x.old, x.infer, x.mask, args.form), x.mask, args)


@CORRECTION.register(
    "seq_tis", traits=_CORRECTS, args=lambda o: Truncation(o.tis_cap, o.tis_floor, o.correction_form), metrics=METRICS,
    text=PartText(
        lambda o: f"ℓ ← min(ρ_i, {o.tis_cap:g})·ℓ, {_seq(o)}",
        summary="tis on a sequence-level rho (correction_form), shared by the sequence's tokens",
        label=lambda o: f"seq_tis ({o.correction_form}) C={o.tis_cap:g}",
        doc=("clamp(ρ_i, floor, C) for every token of i", ""),
    ),
)
def _seq_tis(x: CorrectionInput, args: Truncation) -> BehaviourWeights:
    return _truncate(_rho(x.old, x.infer, x.mask, args.form), x.mask, args)


@CORRECTION.register(
    "seq_mask", traits=(*_CORRECTS, "zeroes_tokens"),
    args=lambda o: Band(o.icepop_low, o.icepop_high, o.correction_form), metrics=METRICS,
    text=PartText(
        lambda o: f"ℓ ← {_band_text(o, 'ρ_i')}·ℓ, {_seq(o)}",
        summary="icepop's band on a sequence-level rho (correction_form), shared by the sequence's tokens",
        label=lambda o: f"seq_mask ({o.correction_form}) [{o.icepop_low:g}, {o.icepop_high:g}]",
        doc=("ρ_i if α ≤ ρ_i ≤ β else 0", ""),
    ),
)
def _seq_mask(x: CorrectionInput, args: Band) -> BehaviourWeights:
    return _band(_rho(x.old, x.infer, x.mask, args.form), x.mask, args)
