"""Reward shaping and group filtering from DAPO (arXiv 2503.14476), as pure functions of a step's rows.

- Overlong reward shaping (DAPO eq. 13, "soft overlong punishment"): with L_max the generation budget and L_cache
  the buffer before it, a completion of |y| tokens gets

      R_length(y) = 0                                  |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                  = -1                                 |y| > L_max

  times a penalty factor (1 in the paper), added to the verifier's reward. A completion cannot exceed the
  engine's budget, so here the last case never happens and one that hits the budget gets -1. |y| counts the
  completion's tokens, end-of-sequence token included (what the engine generated).
- Dynamic sampling (DAPO §3.2): a group whose rewards are all equal (all right or all wrong) has advantage 0 under
  every group-normalised estimator and only dilutes the batch; it is dropped and more prompts are sampled.
  `uniform_groups` says which groups those are (a group no verifier could score is kept, to be counted).
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """(N,) DAPO's soft overlong punishment (<= 0) for completions of `lengths` tokens under the budget
    `max_length` (L_max) with a buffer of `buffer` tokens (L_cache); 0 everywhere when `buffer` is 0."""
    if buffer < 0 or buffer > max_length:
        raise ValueError(f"the overlong buffer must be between 0 and the budget {max_length}, got {buffer}")
    lengths = lengths.to(torch.float32)
    if buffer == 0:
        return torch.zeros_like(lengths)
    expected = max_length - buffer
    penalty = ((expected - lengths) / buffer).clamp(max=0.0)
    penalty = torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)
    return factor * penalty


def uniform_groups(rewards: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(num_groups,) bool: groups whose scorable rewards are all equal, or that have only one (no contrast to learn
    from). NaN rewards (unscorable) are left out; a group with none scorable is *not* uniform: it is kept, so that a
    verifier that fails shows in the unscorable counts and stops the run instead of being filtered away."""
    uniform = torch.zeros(num_groups, dtype=torch.bool)
    for g in range(num_groups):
        values = rewards[(group_ids == g) & torch.isfinite(rewards)]
        uniform[g] = len(values) > 0 and (len(values) < 2 or bool((values == values[0]).all()))
    return uniform
