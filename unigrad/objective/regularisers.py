"""Regularisers: per-token KL to a reference model and the entropy bonus.

KL(pi_theta || pi_ref) estimated per sampled token (Schulman, "Approximating KL divergence",
2020), with d = ref - logp:

- k1 = -d                     unbiased value, high variance, can be negative
- k2 = d^2 / 2                low variance, biased value; its gradient is the reverse-KL gradient
- k3 = exp(d) - d - 1         unbiased value, always >= 0 (GRPO, DeepSeekMath eq. 4)

`clamp` bounds the log-ratio d to +-20 before exp and the result to +-clamp, as verl does for
k3, so one wild token cannot produce an inf loss. TRL does not clamp.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logp: torch.Tensor, ref: torch.Tensor, estimator: str = "k3", clamp: float | None = 10.0
) -> torch.Tensor:
    """Per-token KL estimate (B, T) with gradient through logp."""
    d = ref - logp
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        if clamp is not None:
            d = d.clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension.  (..., V) -> (...)"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
