"""Ratio level: the reference denominator 1/pi_ref of the unified estimator.

Every function takes log-probabilities that are already zero at masked positions (see
`loss.py`), so sums over a row never touch a NaN, and returns a (B, T) tensor `r` whose value
multiplies the advantage and whose gradient is the likelihood-gradient part. Every level is
`function(x: RatioInput, args) -> r`, where `args` is what its registration reads from the objective:

- token           r_t = exp(logp_t - old_t)                       (PPO, GRPO)
- sequence        s_i = exp(sum_t m*(logp-old) / sum_t m)          (GSPO, arXiv 2507.18071, eq. 7)
- sequence_token  exp(logp_t - sg(logp_t) + sg(log s_i))           (GSPO-token, eq. 13): value s_i,
                  gradient s_i * grad(logp_t), so per-token advantages are allowed
- self            exp(logp_t - sg(logp_t)): value 1, gradient grad(logp_t)  (SFT, pi_ref = pi_theta)
- none            f(exp(logp_t)) with pi_ref = 1; f(p) = p/(p+gamma) is LUFFY's policy shaping
                  (arXiv 2504.14945, eq. 8); f(p) = p when no shaping is set
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unigrad.objective.registry import RATIO, PartText


def masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens of each row; rows with no token give 0.  (B, T) -> (B, 1)"""
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=-1, keepdim=True)
    count = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return total / count


def _clamped(log_ratio: torch.Tensor, clamp: float | None) -> torch.Tensor:
    return log_ratio if clamp is None else log_ratio.clamp(-clamp, clamp)


def token_ratio(logp: torch.Tensor, old: torch.Tensor, clamp: float | None = 20.0) -> torch.Tensor:
    """r_t = pi_theta / pi_old per token.  (B, T)"""
    return torch.exp(_clamped(logp - old, clamp))


def sequence_log_ratio(logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i, the length-normalised (geometric-mean) sequence log-ratio.  (B, 1)"""
    return masked_row_mean(logp - old, mask)


def sequence_ratio(
    logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, clamp: float | None = 20.0
) -> torch.Tensor:
    """GSPO's s_i broadcast over the sequence; its gradient is s_i * mean_t grad(logp_t).  (B, T)"""
    log_s = _clamped(sequence_log_ratio(logp, old, mask), clamp)  # (B, 1)
    return torch.exp(log_s).expand_as(logp)


def sequence_token_ratio(
    logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, clamp: float | None = 20.0
) -> torch.Tensor:
    """GSPO-token: value s_i at every token, gradient s_i * grad(logp_t) per token.  (B, T)"""
    log_s = _clamped(sequence_log_ratio(logp, old, mask), clamp).detach()  # (B, 1)
    return torch.exp(logp - logp.detach() + log_s)


def self_ratio(logp: torch.Tensor) -> torch.Tensor:
    """SFT's pi_theta / sg(pi_theta): value 1, gradient grad(logp).  (B, T)"""
    return torch.exp(logp - logp.detach())


def shaped_probability(logp: torch.Tensor, shaping: float | None) -> torch.Tensor:
    """pi_ref = 1 form: f(p) with p = exp(logp); f(p) = p / (p + gamma), or p.  (B, T)"""
    p = torch.exp(logp)
    return p if shaping is None else p / (p + shaping)


def _f(o) -> str:
    return "p" if o.shaping is None else f"p/(p+{o.shaping:g})"


@dataclass(frozen=True)
class RatioInput:
    """What every ratio level reads; (B, T) float32, zero at masked positions."""

    logp: torch.Tensor  # log pi_theta, with grad
    old: torch.Tensor  # log pi_old, detached
    mask: torch.Tensor  # bool, the tokens of the on-policy route


def _clamp(o) -> float | None:
    return o.log_ratio_clamp


def _shaping(o) -> float | None:
    return o.shaping


_OLD = ("uses_old_logprobs",)


@RATIO.register(
    "token", traits=_OLD, args=_clamp,
    text=PartText(
        lambda o: "r = π/π_old", summary="r_t = pi/pi_old per token",
        doc=("exp(logp_t − old_t)", "r_t ∇logp_t",
             "PPO, GRPO, DAPO, SAPO, CISPO"),
    ),
)
def _token(x: RatioInput, clamp: float | None) -> torch.Tensor:
    return token_ratio(x.logp, x.old, clamp)


@RATIO.register(
    "sequence", traits=_OLD, args=_clamp,
    text=PartText(
        lambda o: "r = s_i = exp(mean_t log(π/π_old))", summary="GSPO geometric-mean ratio shared by a sequence",
        doc=("s_i = exp(Σ_t m(logp−old) / Σ_t m), shared by the sequence", "s_i · mean_t ∇logp_t",
             "GSPO (geometric mean)"),
    ),
)
def _sequence(x: RatioInput, clamp: float | None) -> torch.Tensor:
    return sequence_ratio(x.logp, x.old, x.mask, clamp)


@RATIO.register(
    "sequence_token", traits=_OLD, args=_clamp,
    text=PartText(
        lambda o: "r = sg(s_i)·π/sg(π)", summary="GSPO-token form (value of the sequence ratio, gradient per token)",
        doc=("s_i (value)", "s_i ∇logp_t per token (allows per-token A)", "GSPO-token"),
    ),
)
def _sequence_token(x: RatioInput, clamp: float | None) -> torch.Tensor:
    return sequence_token_ratio(x.logp, x.old, x.mask, clamp)


@RATIO.register(
    "self", traits=("is_self",),
    text=PartText(
        lambda o: "r = π/sg(π)", summary="pi_ref = sg(pi_theta), the SFT form", doc=("1 (π/sg(π))", "∇logp_t", "SFT"),
    ),
)
def _self(x: RatioInput, args: None) -> torch.Tensor:
    return self_ratio(x.logp)


@RATIO.register(
    "none", args=_shaping,
    text=PartText(
        lambda o: f"r = f(π), f(p) = {_f(o)}", summary="pi_ref = 1, the term is f(pi_theta)",
        label=lambda o: "none" if o.shaping is None else f"none, f(p)=p/(p+{o.shaping:g})",
        doc=("f(π_θ), f(p) = p or p/(p+γ) (`shaping=γ`)", "f'(p)·p·∇logp_t", "LUFFY's off-policy tokens"),
    ),
)
def _none(x: RatioInput, shaping: float | None) -> torch.Tensor:
    return shaped_probability(x.logp, shaping)


def compute_ratio(objective: Any, x: RatioInput) -> torch.Tensor:
    """The objective's ratio level's r, with the arguments its registration reads from the objective.  (B, T)"""
    part = RATIO[objective.ratio]
    return part.function(x, part.args(objective))
