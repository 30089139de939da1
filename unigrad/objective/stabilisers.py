"""Stabilisation mask: how the ratio and the advantage become a per-token loss.

Every stabiliser is `function(x: StabiliserInput, args) -> Stabilised`: it maps the ratio r (B, T) and the
advantage A (B, T) to a per-token loss to be minimised, plus indicator tensors whose means are its metrics. Masked
positions are handled by the caller (`loss.py`): the inputs there are finite.

- none       l = -r*A                                                    (REINFORCE, on-policy)
- clip       l = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)             (PPO arXiv 1707.06347,
                                                                          DAPO clip-higher 2503.14476)
- dual_clip  clip, and for A < 0 also l <= c*|A|                         (arXiv 1912.09729; verl c=3)
- soft_gate  l = -sigma(tau*(r-1)) * (4/tau) * A, tau = tau_pos if A>0 else tau_neg
             gradient weight 4*sigma*(1-sigma) is 1 at r = 1             (SAPO, arXiv 2511.20347)
- cispo      l = -sg(min(r, eps_max)) * A * logp                         (MiniMax-M1, arXiv 2506.13585)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from unigrad.objective.registry import STABILISER, PartText


@dataclass(frozen=True)
class StabiliserInput:
    """What every stabiliser reads; (B, T) float32 tensors, finite everywhere."""

    ratio: torch.Tensor  # r, with the ratio level's gradient
    adv: torch.Tensor  # A, constants
    logp: torch.Tensor  # log pi_theta, with grad (CISPO's likelihood term)


class Stabilised(NamedTuple):
    loss: torch.Tensor  # (B, T) per-token loss to minimise
    indicators: dict[str, torch.Tensor]  # metric name -> (B, T) values whose token mean is the metric


@dataclass(frozen=True)
class ClipRange:
    epsilon: float  # ratio floor 1 - epsilon
    epsilon_high: float  # ratio ceiling 1 + epsilon_high

    def __post_init__(self) -> None:
        if not 0 <= self.epsilon < 1 or self.epsilon_high < 0:
            raise ValueError(f"clip needs 0 <= epsilon < 1 and epsilon_high >= 0, got {self.epsilon}, "
                             f"{self.epsilon_high}")


@dataclass(frozen=True)
class DualClipRange(ClipRange):
    c: float = 3.0  # cap of the loss of A < 0 tokens at c*|A|

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.c <= 1:
            raise ValueError(f"dual_clip needs c > 1, got {self.c}")


@dataclass(frozen=True)
class GateTemperatures:
    tau_pos: float  # gate temperature for A > 0
    tau_neg: float  # gate temperature for A <= 0

    def __post_init__(self) -> None:
        if self.tau_pos <= 0 or self.tau_neg <= 0:
            raise ValueError(f"soft_gate needs positive temperatures, got {self.tau_pos}, {self.tau_neg}")


@dataclass(frozen=True)
class WeightCap:
    cap: float  # truncation of the detached ratio: min(r, cap)

    def __post_init__(self) -> None:
        if self.cap <= 0:
            raise ValueError(f"cispo needs cispo_max > 0, got {self.cap}")


def _bounds(o) -> str:
    return f"{1 - o.epsilon:g}, {1 + o.epsilon_upper:g}"


_CLIP_METRICS = {
    "clip/low_fraction": "fraction of tokens with r < 1-eps and A < 0 (gradient clipped away)",
    "clip/high_fraction": "fraction of tokens with r > 1+eps_high and A > 0 (gradient clipped away)",
    "clip/region_fraction": "fraction of tokens whose gradient the clip (or dual clip) removes",
}


@STABILISER.register(
    "none",
    text=PartText(lambda o: "ℓ = −r·A", summary="no stabilisation, l = -r*A (REINFORCE)", doc=("−r·A", "")),
)
def _none(x: StabiliserInput, args: Any) -> Stabilised:
    return Stabilised(-x.ratio * x.adv, {})


@STABILISER.register(
    "clip", traits=("clips", "needs_old_logprobs"), args=lambda o: ClipRange(o.epsilon, o.epsilon_upper),
    metrics=_CLIP_METRICS,
    text=PartText(
        lambda o: f"ℓ = −min(r·A, clip(r, {_bounds(o)})·A)",
        summary="PPO's clipped surrogate on [1 - epsilon, 1 + epsilon_high]", label=lambda o: f"clip [{_bounds(o)}]",
        doc=("−min(r·A, clip(r, 1−ε, 1+ε_high)·A)", "ε = 0.2, ε_high = ε (DAPO: 0.28)"),
    ),
)
def _clip(x: StabiliserInput, args: ClipRange) -> Stabilised:
    ratio, adv = x.ratio, x.adv
    clipped_ratio = ratio.clamp(1 - args.epsilon, 1 + args.epsilon_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    # Tokens whose gradient the clip removes (same definition as TRL's clip_ratio metrics).
    low = (ratio < 1 - args.epsilon) & (adv < 0)
    high = (ratio > 1 + args.epsilon_high) & (adv > 0)
    return Stabilised(loss, {"clip/low_fraction": low, "clip/high_fraction": high, "clip/region_fraction": low | high})


@STABILISER.register(
    "dual_clip", traits=("clips", "needs_old_logprobs"),
    args=lambda o: DualClipRange(o.epsilon, o.epsilon_upper, o.dual_clip_c),
    metrics={**_CLIP_METRICS, "clip/dual_fraction": "dual_clip: fraction of A < 0 tokens capped at c*|A|"},
    text=PartText(
        lambda o: f"ℓ = −min(r·A, clip(r, {_bounds(o)})·A), ≤ {o.dual_clip_c:g}·|A| if A<0",
        summary="clip, and the loss of A < 0 tokens capped at dual_clip_c*|A|",
        label=lambda o: f"dual_clip [{_bounds(o)}], c={o.dual_clip_c:g}",
        doc=("clip, and for A < 0 also ℓ ≤ c·|A|", "c = 3 (verl)"),
    ),
)
def _dual_clip(x: StabiliserInput, args: DualClipRange) -> Stabilised:
    loss, flags = _clip(x, args)
    cap = -args.c * x.adv  # positive where A < 0
    capped = (x.adv < 0) & (loss > cap)
    loss = torch.where(x.adv < 0, torch.min(loss, cap), loss)
    flags["clip/dual_fraction"] = capped
    flags["clip/region_fraction"] = flags["clip/region_fraction"] | capped
    return Stabilised(loss, flags)


@STABILISER.register(
    "soft_gate", traits=("needs_old_logprobs",), args=lambda o: GateTemperatures(o.tau_pos, o.tau_neg),
    metrics={"gate/weight_mean": "soft_gate: mean gradient weight 4*sigma*(1-sigma) (1 = on-policy)"},
    text=PartText(
        lambda o: f"ℓ = −σ(τ(r−1))·(4/τ)·A, τ = {o.tau_pos:g} if A>0 else {o.tau_neg:g}",
        summary="SAPO's sigmoid gate with temperatures tau_pos (A > 0) and tau_neg (A <= 0)",
        label=lambda o: f"soft_gate tau+={o.tau_pos:g} tau-={o.tau_neg:g}",
        doc=("−σ(τ(r−1))·(4/τ)·A, τ = τ_pos if A > 0 else τ_neg; gradient weight 4σ(1−σ), = 1 at r = 1",
             "τ_pos = 1.0, τ_neg = 1.05 (SAPO)"),
    ),
)
def _soft_gate(x: StabiliserInput, args: GateTemperatures) -> Stabilised:
    ratio, adv = x.ratio, x.adv
    tau = torch.where(adv > 0, torch.full_like(ratio, args.tau_pos), torch.full_like(ratio, args.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1))
    loss = -gate * (4.0 / tau) * adv
    # d(loss)/d(logp) = -4*gate*(1-gate) * r * A: the weight on the usual r*A*grad(logp).
    weight = (4.0 * gate * (1 - gate)).detach()
    return Stabilised(loss, {"gate/weight_mean": weight})


@STABILISER.register(
    "cispo", traits=("needs_old_logprobs",), args=lambda o: WeightCap(o.cispo_max),
    metrics={"clip/truncated_fraction": "cispo: fraction of tokens whose IS weight is truncated at cispo_max"},
    text=PartText(
        lambda o: f"ℓ = −sg(min(r, {o.cispo_max:g}))·A·log π",
        summary="CISPO's truncated detached IS weight times A * logp, min(r, cispo_max)",
        label=lambda o: f"cispo min(r, {o.cispo_max:g})",
        doc=("−sg(min(r, ε_max))·A·logp", "ε_max = 5 (ScaleRL / TRL)"),
    ),
)
def _cispo(x: StabiliserInput, args: WeightCap) -> Stabilised:
    weight = x.ratio.clamp(max=args.cap).detach()
    loss = -weight * x.adv * x.logp
    return Stabilised(loss, {"clip/truncated_fraction": x.ratio.detach() > args.cap})


def stabilise(objective: Any, x: StabiliserInput) -> Stabilised:
    """The objective's stabiliser applied to `x`, with the arguments its registration reads from the objective."""
    part = STABILISER[objective.stabiliser]
    return part.function(x, part.args(objective))
