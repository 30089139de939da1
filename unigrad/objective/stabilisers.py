"""Stabilisation mask: how the ratio and the advantage become a per-token loss.

Each function maps the ratio r (B, T) and the advantage A (B, T) to a per-token loss to be
minimised, and returns indicator tensors for the metrics. Masked positions are handled by
the caller (`loss.py`): the inputs there are finite.

- none       l = -r*A                                                    (REINFORCE, on-policy)
- clip       l = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)             (PPO arXiv 1707.06347,
                                                                          DAPO clip-higher 2503.14476)
- dual_clip  clip, and for A < 0 also l <= c*|A|                         (arXiv 1912.09729; verl c=3)
- soft_gate  l = -sigma(tau*(r-1)) * (4/tau) * A, tau = tau_pos if A>0 else tau_neg
             gradient weight 4*sigma*(1-sigma) is 1 at r = 1             (SAPO, arXiv 2511.20347)
- cispo      l = -sg(min(r, eps_max)) * A * logp                         (MiniMax-M1, arXiv 2506.13585)
"""

from __future__ import annotations

import torch

from unigrad.objective.registry import STABILISER


def no_stabiliser(ratio: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return -ratio * adv, {}


def clipped(
    ratio: torch.Tensor, adv: torch.Tensor, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    # Tokens whose gradient the clip removes (same definition as TRL's clip_ratio metrics).
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, {"clip/low_fraction": low, "clip/high_fraction": high, "clip/region_fraction": low | high}


def dual_clipped(
    ratio: torch.Tensor, adv: torch.Tensor, epsilon: float, epsilon_high: float, c: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, flags = clipped(ratio, adv, epsilon, epsilon_high)
    cap = -c * adv  # positive where A < 0
    capped = (adv < 0) & (loss > cap)
    loss = torch.where(adv < 0, torch.min(loss, cap), loss)
    flags["clip/dual_fraction"] = capped
    flags["clip/region_fraction"] = flags["clip/region_fraction"] | capped
    return loss, flags


def soft_gated(
    ratio: torch.Tensor, adv: torch.Tensor, tau_pos: float, tau_neg: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tau = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1))
    loss = -gate * (4.0 / tau) * adv
    # d(loss)/d(logp) = -4*gate*(1-gate) * r * A: the weight on the usual r*A*grad(logp).
    weight = (4.0 * gate * (1 - gate)).detach()
    return loss, {"gate/weight_mean": weight}


def cispo(
    ratio: torch.Tensor, adv: torch.Tensor, logp: torch.Tensor, cispo_max: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    weight = ratio.clamp(max=cispo_max).detach()
    loss = -weight * adv * logp
    return loss, {"clip/truncated_fraction": ratio.detach() > cispo_max}


def _bounds(o) -> str:
    return f"{1 - o.epsilon:g}, {1 + o.epsilon_upper:g}"


STABILISER.register("none", formula=lambda o: "ℓ = −r·A")(
    lambda ratio, adv, logp, p: no_stabiliser(ratio, adv))
STABILISER.register(
    "clip", traits=("clips",), formula=lambda o: f"ℓ = −min(r·A, clip(r, {_bounds(o)})·A)",
    label=lambda o: f"clip [{_bounds(o)}]", metrics=("clip/low_fraction", "clip/high_fraction", "clip/region_fraction"),
)(lambda ratio, adv, logp, p: clipped(ratio, adv, p["epsilon"], p["epsilon_high"]))
STABILISER.register(
    "dual_clip", traits=("clips",),
    formula=lambda o: f"ℓ = −min(r·A, clip(r, {_bounds(o)})·A), ≤ {o.dual_clip_c:g}·|A| if A<0",
    label=lambda o: f"dual_clip [{_bounds(o)}], c={o.dual_clip_c:g}",
    metrics=("clip/low_fraction", "clip/high_fraction", "clip/region_fraction", "clip/dual_fraction"),
)(lambda ratio, adv, logp, p: dual_clipped(ratio, adv, p["epsilon"], p["epsilon_high"], p["dual_clip_c"]))
STABILISER.register(
    "soft_gate", formula=lambda o: f"ℓ = −σ(τ(r−1))·(4/τ)·A, τ = {o.tau_pos:g} if A>0 else {o.tau_neg:g}",
    label=lambda o: f"soft_gate tau+={o.tau_pos:g} tau-={o.tau_neg:g}", metrics=("gate/weight_mean",),
)(lambda ratio, adv, logp, p: soft_gated(ratio, adv, p["tau_pos"], p["tau_neg"]))
STABILISER.register(
    "cispo", formula=lambda o: f"ℓ = −sg(min(r, {o.cispo_max:g}))·A·log π",
    label=lambda o: f"cispo min(r, {o.cispo_max:g})", metrics=("clip/truncated_fraction",),
)(lambda ratio, adv, logp, p: cispo(ratio, adv, logp, p["cispo_max"]))


def stabilise(
    name: str,
    ratio: torch.Tensor,
    adv: torch.Tensor,
    logp: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: float,
    dual_clip_c: float,
    tau_pos: float,
    tau_neg: float,
    cispo_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The registered stabiliser's (per-token loss (B, T), metric indicators)."""
    params = {"epsilon": epsilon, "epsilon_high": epsilon_high, "dual_clip_c": dual_clip_c, "tau_pos": tau_pos,
              "tau_neg": tau_neg, "cispo_max": cispo_max}
    return STABILISER[name].function(ratio, adv, logp, params)
