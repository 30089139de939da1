"""Advantage estimators for outcome rewards (one scalar reward per completion).

`rewards` (N,) are grouped by `group_ids` (N,): completions of the same prompt share an id
(ids need not be contiguous or sorted). NaN rewards mark unscorable completions: they are left
out of every baseline and statistic and get advantage 0. Groups of size 1 and groups whose
rewards are all equal get advantage 0 (never NaN) under the normalised estimators.

- grpo       (R - mean_g) / (std_g + eps), std unbiased      (DeepSeekMath arXiv 2402.03300)
- dr_grpo    R - mean_g                                        (Dr. GRPO arXiv 2503.20783)
- rloo       R - mean of the *other* members of the group      (Ahmadian et al. arXiv 2402.14740)
- batch_std  (R - mean_g) / (std over the batch + eps)          (Lite PPO arXiv 2508.08221; TRL's
                                                                  scale_rewards="batch")
- whiten     (R - mean over the batch) / (std over the batch + eps)  (PPO-style whitening, no critic)
- reinforce  R                                                  (no baseline; Williams 1992)
- sft        1                                                  (UPGE: SFT is A = 1)

With `task_ids` and `per_task=True`, the result is then standardised within each task
(subtract the task mean, divide by the task std + eps), so that tasks with different reward
scales contribute comparable advantages (ROLL's per-domain normalisation).

Note: TRL 1.16 adds 1e-4 to the std; unigrad follows DeepSeekMath and verl with 1e-6 (set
`eps` to match a peer exactly).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "batch_std", "whiten", "reinforce", "sft")


def _segment_stats(values: torch.Tensor, valid: torch.Tensor, segment: torch.Tensor):
    """Per-element count, mean and unbiased std of `values` within its segment, valid entries only."""
    num_segments = int(segment.max().item()) + 1 if segment.numel() else 0
    v = torch.where(valid, values, torch.zeros_like(values))
    w = valid.to(values.dtype)
    count = torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add_(0, segment, w)
    total = torch.zeros_like(count).index_add_(0, segment, v)
    mean = total / count.clamp(min=1)
    dev = torch.where(valid, values - mean[segment], torch.zeros_like(values))
    sq = torch.zeros_like(count).index_add_(0, segment, dev * dev)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(count))
    return count[segment], mean[segment], std[segment]


def _dense_ids(ids: torch.Tensor) -> torch.Tensor:
    return torch.unique(ids, return_inverse=True)[1]


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    method: str = "grpo",
    *,
    task_ids: torch.Tensor | None = None,
    per_task: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages (N,) from rewards (N,); see the module docstring for each estimator."""
    if method not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {method!r}; valid: {', '.join(ESTIMATORS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    n = rewards.shape[0]
    if group_ids is None:
        group_ids = torch.zeros(n, dtype=torch.long, device=rewards.device)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}")
    valid = torch.isfinite(rewards)
    zero = torch.zeros_like(rewards)
    groups = _dense_ids(group_ids)
    batch = torch.zeros_like(groups)

    if method == "sft":
        return torch.ones_like(rewards)  # demonstrations: A = 1 whatever the reward says
    if method == "reinforce":
        adv = rewards
    elif method == "whiten":
        _, mean_b, std_b = _segment_stats(rewards, valid, batch)
        adv = (rewards - mean_b) / (std_b + eps)
    else:
        count_g, mean_g, std_g = _segment_stats(rewards, valid, groups)
        centred = rewards - mean_g
        if method == "grpo":
            adv = centred / (std_g + eps)
        elif method == "dr_grpo":
            adv = centred
        elif method == "rloo":
            # R_i - (sum_g - R_i)/(n-1) = n/(n-1) * (R_i - mean_g); 0 for a group of one.
            adv = torch.where(count_g > 1, centred * count_g / (count_g - 1).clamp(min=1), zero)
        else:  # batch_std
            _, _, std_b = _segment_stats(rewards, valid, batch)
            adv = centred / (std_b + eps)
    adv = torch.where(valid, adv, zero)

    if per_task:
        if task_ids is None:
            raise ValueError("per_task=True needs task_ids")
        _, mean_t, std_t = _segment_stats(adv, valid, _dense_ids(task_ids))
        adv = torch.where(valid, (adv - mean_t) / (std_t + eps), zero)
    return adv
