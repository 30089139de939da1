"""Next-token selection shared by the rollout engines: temperature, top-k, top-p, greedy.

The log-prob recorded for a sampled token is its log-prob under the distribution it was actually drawn from:
``log_softmax`` of the temperature-scaled logits after top-k / top-p filtering, i.e. renormalised over the kept
tokens. Greedy decoding (temperature 0) draws from no distribution; by convention its recorded log-prob is the
log-prob under the *unfiltered* temperature-1 softmax. Everything here works in float32.
"""

from __future__ import annotations

import torch

from .base import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale (B, V) logits by 1 / temperature, then set tokens outside top-k and then outside top-p to -inf.

    top-k keeps the k largest logits (ties at the k-th value are all kept); top-p keeps the smallest set of most
    probable tokens (of the top-k renormalised distribution) whose mass reaches `top_p`, and always at least one.
    The result is in float32; `log_softmax` of it is the renormalised filtered distribution.
    """
    if temperature <= 0:
        raise ValueError("filter_logits needs temperature > 0 (temperature 0 is greedy decoding)")
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # the most probable token always survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class NonFiniteLogits(FloatingPointError):
    """The model produced NaN logits (or a row with no finite logit): its weights have diverged."""


def select_next_tokens(
    logits: torch.Tensor, sampling: SamplingParams, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of (B, V) logits; returns (tokens (B,) long, their log-probs (B,) float32).

    `noise` (B, V): standard exponential draws (required unless greedy). The token is argmax_v p_v / E_v, which
    is a draw from p (the exponential race; torch.multinomial draws one sample the same way), so the caller
    decides which random stream each row's draw comes from.
    """
    logits = logits.float()
    if torch.isnan(logits).any() or not torch.isfinite(logits).any(dim=-1).all():
        raise NonFiniteLogits("the policy produced non-finite logits while sampling: its weights have diverged")
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        if noise is None:
            raise ValueError("sampling at temperature > 0 needs exponential noise")
        logprobs = torch.log_softmax(filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p), -1)
        tokens = (logprobs.exp() / noise).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
