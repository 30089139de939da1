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

from unigrad.objective.registry import KL_ESTIMATOR, PartText


def kl_penalty(
    logp: torch.Tensor, ref: torch.Tensor, estimator: str = "k3", clamp: float | None = 10.0
) -> torch.Tensor:
    """Per-token KL estimate (B, T) by the registered estimator, with gradient through logp."""
    kl = KL_ESTIMATOR[estimator].function(ref - logp, clamp)
    return kl if clamp is None else kl.clamp(-clamp, clamp)


@KL_ESTIMATOR.register(
    "k1",
    text=PartText(lambda o: "KL_t = −d", summary="-d, unbiased, high variance, can be negative", doc=("−d",)),
)
def _k1(d, clamp):
    return -d


@KL_ESTIMATOR.register(
    "k2",
    text=PartText(lambda o: "KL_t = d²/2", summary="d^2/2, low variance, biased", doc=("d²/2",)),
)
def _k2(d, clamp):
    return 0.5 * d * d


@KL_ESTIMATOR.register(
    "k3",
    text=PartText(
        lambda o: "KL_t = e^d − d − 1", summary="exp(d) - d - 1, unbiased and >= 0 (GRPO)", doc=("e^d − d − 1",),
    ),
)
def _k3(d, clamp):
    if clamp is not None:
        d = d.clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1


KL_ESTIMATORS = KL_ESTIMATOR.names()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension.  (..., V) -> (...)"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
