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
    """Detached behaviour-correction weights.  old, infer: (B, T), zero at masked positions."""
    log_rho = (old - infer).detach()  # (B, T)
    if name in ("seq_tis", "seq_mask"):
        log_rho = _sequence_log_rho(log_rho, mask, form)
    rho = torch.exp(log_rho)
    false = torch.zeros_like(mask)
    if name in ("tis", "seq_tis"):
        weight = rho.clamp(min=tis_floor, max=tis_cap)
        truncated = (rho > tis_cap) if tis_floor is None else (rho > tis_cap) | (rho < tis_floor)
        return BehaviourWeights(weight, rho, false, truncated & mask)
    if name in ("icepop", "seq_mask"):
        outside = (rho < icepop_low) | (rho > icepop_high)
        weight = torch.where(outside, torch.zeros_like(rho), rho)
        return BehaviourWeights(weight, rho, outside & mask, false)
    raise ValueError(f"unknown behaviour correction {name!r}")
