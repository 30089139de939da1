"""Merging per-micro-batch loss metrics into one value per step."""

from __future__ import annotations


def merge_loss_metrics(records: list[dict[str, float]], num_iterations: int = 1,
                       optimizer_steps: int | None = None) -> dict[str, float]:
    """Combine `compute_policy_loss` metrics of all micro-batches (and optimizer steps) of a step.

    Loss terms already carry their optimizer step's normalisers, so they add up within an optimizer step (then
    average over the `optimizer_steps`, default `num_iterations`); token counts add up over one epoch (every row
    once per iteration); min / max reduce; every other metric is a token-weighted mean.
    """
    optimizer_steps = optimizer_steps or num_iterations
    out: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        prefix = next(iter(rec)).split("/", 1)[0] if rec else ""
        tokens = rec.get(f"{prefix}/tokens", 1.0)
        for key, value in rec.items():
            leaf = key.split("/", 1)[1] if "/" in key else key
            if leaf == "tokens":
                out[key] = out.get(key, 0.0) + value / num_iterations
            elif leaf.startswith("loss"):
                out[key] = out.get(key, 0.0) + value / optimizer_steps
            elif key.endswith("/min"):
                out[key] = min(out.get(key, value), value)
            elif key.endswith("/max"):
                out[key] = max(out.get(key, value), value)
            else:
                out[key] = out.get(key, 0.0) + value * tokens
                weights[key] = weights.get(key, 0.0) + tokens
    for key, w in weights.items():
        out[key] = out[key] / w if w > 0 else 0.0
    out["loss"] = out.get("rl/loss", 0.0) + out.get("sft/loss", 0.0)
    return out
