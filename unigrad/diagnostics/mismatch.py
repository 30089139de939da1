"""Train-inference mismatch (the problem IcePop corrects: Ring-1T, arXiv 2510.18855).

The rollout engine samples y_t from pi_infer and reports log pi_infer(y_t); the trainer computes
log pi_train(y_t) for the same tokens. With rho_t = pi_train(y_t) / pi_infer(y_t) (the ratio the
behaviour corrections use, unigrad.objective.corrections), over the valid tokens:

- `mismatch/abs_logp_diff_mean`, `_max`   |log pi_infer - log pi_train|
- `mismatch/kl_k1`   mean(log pi_infer - log pi_train): KL(pi_infer || pi_train), k1 estimator
                     (Schulman 2020, "Approximating KL divergence"); unbiased, can be negative
- `mismatch/kl_k3`   mean(rho - 1 - log rho): the same KL, k3 estimator; unbiased and >= 0
- `mismatch/chi2`    mean((rho - 1)^2): chi^2(pi_train || pi_infer) estimated on pi_infer's samples
- `mismatch/rho_min`, `_mean`, `_max`   raw token rho, before any truncation
- `mismatch/masked_fraction`   fraction of tokens with rho outside [low, high] (IcePop's band)
- `mismatch/abs_logp_diff/pos_<a>_<b>`   mean |diff| of tokens at completion positions a..b (bins
                     0-3, 4-7, 8-15, 16-31, ...), since the gap grows along the sequence
- `mismatch/entropy_masked`, `mismatch/entropy_all`   mean trainer entropy of the out-of-band
                     tokens and of all tokens (IcePop's Figure 11: masked tokens are high-entropy)
All are computed in float64 from detached inputs and are 0 (or NaN where undefined) when the
two log-probs agree.
"""

from __future__ import annotations

import math

import torch


def position_bins(length: int) -> list[tuple[int, int]]:
    """[(0, 3), (4, 7), (8, 15), (16, 31), ...]: the fixed bins that cover positions 0..length-1 (the last
    may reach past length - 1, so that a bin's name never depends on a batch's width)."""
    bins, start, end = [], 0, 4
    while start < length:
        bins.append((start, end - 1))
        start, end = end, end * 2
    return bins


def mismatch_metrics(train_logp: torch.Tensor, infer_logp: torch.Tensor, mask: torch.Tensor, *,
                     low: float = 0.5, high: float = 5.0, entropy: torch.Tensor | None = None) -> dict[str, float]:
    """Mismatch metrics over the tokens where mask is True.  All inputs (B, T)."""
    mask = mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {}
    train = train_logp.detach().double()[mask]
    infer = infer_logp.detach().double()[mask]
    diff = infer - train  # log(pi_infer / pi_train)
    log_rho = -diff
    rho = torch.exp(log_rho)
    out = {
        "mismatch/abs_logp_diff_mean": diff.abs().mean().item(),
        "mismatch/abs_logp_diff_max": diff.abs().max().item(),
        "mismatch/kl_k1": diff.mean().item(),
        "mismatch/kl_k3": (torch.expm1(log_rho) - log_rho).mean().item(),
        "mismatch/chi2": ((rho - 1) ** 2).mean().item(),
        "mismatch/rho_min": rho.min().item(),
        "mismatch/rho_mean": rho.mean().item(),
        "mismatch/rho_max": rho.max().item(),
    }
    outside = (rho < low) | (rho > high)
    out["mismatch/masked_fraction"] = outside.double().mean().item()
    abs_diff = (infer_logp.detach().double() - train_logp.detach().double()).abs()
    for a, b in position_bins(mask.shape[1]):
        m = mask[:, a:b + 1]
        if m.any():
            out[f"mismatch/abs_logp_diff/pos_{a}_{b}"] = abs_diff[:, a:b + 1][m].mean().item()
    if entropy is not None:
        ent = entropy.detach().double()[mask]
        out["mismatch/entropy_all"] = ent.mean().item()
        out["mismatch/entropy_masked"] = ent[outside].mean().item() if outside.any() else math.nan
    return out
