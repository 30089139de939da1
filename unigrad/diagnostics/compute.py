"""Training compute of one step, estimated in FLOPs, so that methods can be compared at equal compute.

The estimate of "Scaling Laws for Neural Language Models" (Kaplan et al., arXiv 2001.08361): a forward pass costs
about 2 N FLOPs per token and a backward pass about 4 N, with N the model's parameter count (attention over the
context is left out; at these context lengths it is a small share). Per step:

- `flops/rollout`: 2 N per token the engine ran (prompt and completion tokens of every sampled row; with a KV cache
  each token passes through the model once). 0 for SFT, which samples nothing.
- `flops/learner`: 6 N per token trained, once per epoch over the batch, plus 2 N per token of each extra forward
  pass: the proximal pass over the rows the first of several mini-batches does not train (counted as the share
  (M - 1) / M of the tokens) and the reference model's pass when beta > 0 (once).

Prompt tokens are counted once per row; the learner runs a group's shared prompt once, so for the prompt part the
learner's figure is an upper bound. The point is a common unit across methods, not a hardware count.
"""

from __future__ import annotations


def step_flops(params: int, rollout_tokens: float, trained_tokens: float, epochs: int = 1, mini_batches: int = 1,
               reference: bool = False) -> dict[str, float]:
    """`flops/rollout` and `flops/learner` of one step (see the module docstring)."""
    if params < 0 or rollout_tokens < 0 or trained_tokens < 0 or epochs < 1 or mini_batches < 1:
        raise ValueError("step_flops: counts must be non-negative, epochs and mini_batches at least 1")
    extra_forward = trained_tokens * (mini_batches - 1) / mini_batches  # the proximal pass (none with one)
    extra_forward += trained_tokens if reference else 0.0
    return {"flops/rollout": 2.0 * params * rollout_tokens,
            "flops/learner": 6.0 * params * trained_tokens * epochs + 2.0 * params * extra_forward}
