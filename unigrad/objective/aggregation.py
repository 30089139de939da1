"""Aggregation: per-token losses (B, T) to one scalar, with explicit normalisers.

The normalisers describe the *whole optimizer batch* (all micro-batches, all processes), so
summing the losses of micro-batches — each called with the same normalisers — gives exactly
the loss and gradient of the whole batch at once:

- token_mean               sum_{i,t} m*l / N_tok                   (DAPO, BNPO)
- seq_mean_token_mean      sum_i (sum_t m*l / sum_t m) / N_seq      (GRPO, DeepSeekMath)
- seq_mean_token_sum       sum_{i,t} m*l / N_seq                   (REINFORCE on whole sequences)
- seq_mean_token_sum_norm  sum_{i,t} m*l / (N_seq * L_max)         (Dr. GRPO, L_max = generation budget)

N_tok = total unmasked tokens, N_seq = total sequences (empty ones included, as in TRL and
verl), L_max = the maximum completion length the sampler allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrad.objective.registry import AGGREGATION, PartText


@dataclass(frozen=True)
class Normalisers:
    """Counts over the whole optimizer batch; sum them across micro-batches and processes."""

    num_tokens: float
    num_sequences: float

    def __add__(self, other: Normalisers) -> Normalisers:
        return Normalisers(self.num_tokens + other.num_tokens, self.num_sequences + other.num_sequences)


def count_normalisers(mask: torch.Tensor) -> Normalisers:
    """Normalisers of one (micro-)batch; add the results of all pieces of the optimizer batch."""
    return Normalisers(num_tokens=float(mask.sum().item()), num_sequences=float(mask.shape[0]))


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_sequences: float,
    max_length: float | None = None,
) -> torch.Tensor:
    """Scalar loss from per-token losses by the registered aggregation.  per_token, mask: (B, T); masked entries
    are ignored."""
    reduce = AGGREGATION[mode].function
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))  # (B, T), NaN-safe
    return reduce(masked, mask, num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length)


@AGGREGATION.register(
    "token_mean", traits=("per_token_normaliser",),
    text=PartText(
        lambda o: "Σ ℓ / N_tok" + (" (this micro-batch)" if o.normaliser_scope == "local" else ""),
        summary="sum over tokens / N_tok (DAPO, BNPO)",
        label=lambda o: "token_mean" + (" (local)" if o.normaliser_scope == "local" else ""),
        doc=("Σ m·ℓ / N_tok", "DAPO"),
    ),
)
def _token_mean(masked, mask, *, num_tokens, num_sequences, max_length):
    return masked.sum() / max(num_tokens, 1.0)


@AGGREGATION.register(
    "seq_mean_token_mean",
    text=PartText(
        lambda o: "Σ_i (Σ_t ℓ / |y_i|) / N_seq", summary="mean over each sequence's tokens, sum / N_seq (GRPO)",
        doc=("Σ_i (Σ_t m·ℓ / Σ_t m) / N_seq", "GRPO"),
    ),
)
def _seq_mean_token_mean(masked, mask, *, num_tokens, num_sequences, max_length):
    per_seq = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (B,)
    return per_seq.sum() / max(num_sequences, 1.0)


@AGGREGATION.register(
    "seq_mean_token_sum",
    text=PartText(
        lambda o: "Σ ℓ / N_seq", summary="sum over tokens / N_seq (REINFORCE on whole sequences)",
        doc=("Σ m·ℓ / N_seq", "REINFORCE"),
    ),
)
def _seq_mean_token_sum(masked, mask, *, num_tokens, num_sequences, max_length):
    return masked.sum() / max(num_sequences, 1.0)


@AGGREGATION.register(
    "seq_mean_token_sum_norm",
    text=PartText(
        lambda o: "Σ ℓ / (N_seq · L_max)", summary="sum over tokens / (N_seq * max_length) (Dr. GRPO)",
        doc=("Σ m·ℓ / (N_seq · L_max)", "Dr. GRPO"),
    ),
)
def _seq_mean_token_sum_norm(masked, mask, *, num_tokens, num_sequences, max_length):
    if max_length is None:
        raise ValueError(
            "seq_mean_token_sum_norm (Dr. GRPO) needs max_length: the generation budget L_max, not the padded width"
        )
    return masked.sum() / (max(num_sequences, 1.0) * max_length)


AGGREGATIONS = AGGREGATION.names()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over unmasked entries (0 if none).  Scalar."""
    count = mask.sum().clamp(min=1)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / count


def masked_extreme(x: torch.Tensor, mask: torch.Tensor, reduce) -> torch.Tensor:
    """`reduce` (torch.amin / torch.amax) of x over unmasked entries (0 if none).  Scalar."""
    if not bool(mask.any()):
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return reduce(x[mask])
