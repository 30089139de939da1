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

from unigrad.objective.registry import ADVANTAGE, PartText


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
    estimator = ADVANTAGE[method].function  # an unknown name is an error naming the valid ones
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    # Statistics in float64 (where the device has it): in float32 the squares of rewards beyond ~1e19 overflow and
    # a group's std becomes inf, which would silently zero its advantages. The result is float32.
    rewards = rewards.to(torch.float32 if rewards.device.type == "mps" else torch.float64)
    n = rewards.shape[0]
    if group_ids is None:
        group_ids = torch.zeros(n, dtype=torch.long, device=rewards.device)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}")
    if ADVANTAGE.has(method, "is_supervised"):  # demonstrations: every reward counts, never re-standardised
        return estimator(rewards, torch.ones_like(rewards, dtype=torch.bool), _dense_ids(group_ids), eps).float()
    valid = torch.isfinite(rewards)
    zero = torch.zeros_like(rewards)
    adv = torch.where(valid, estimator(rewards, valid, _dense_ids(group_ids), eps), zero)
    if per_task:
        if task_ids is None:
            raise ValueError("per_task=True needs task_ids")
        _, mean_t, std_t = _segment_stats(adv, valid, _dense_ids(task_ids))
        adv = torch.where(valid, (adv - mean_t) / (std_t + eps), zero)
    return adv.float()


def _centred(rewards, valid, groups):
    count_g, mean_g, std_g = _segment_stats(rewards, valid, groups)
    return count_g, rewards - mean_g, std_g


def _batch_std(rewards, valid) -> torch.Tensor:
    return _segment_stats(rewards, valid, torch.zeros(len(rewards), dtype=torch.long, device=rewards.device))[2]


@ADVANTAGE.register(
    "grpo", traits=("needs_groups",),
    text=PartText(
        lambda o: "A = (R − mean_g)/(std_g + ε)",
        summary="(R - mean_g) / (std_g + eps) within each group (DeepSeekMath)",
        doc=("(R − mean_g)/(std_g + ε), std unbiased, ε = 1e-6", "DeepSeekMath"),
    ),
)
def _grpo(rewards, valid, groups, eps):
    _, centred, std_g = _centred(rewards, valid, groups)
    return centred / (std_g + eps)


@ADVANTAGE.register(
    "dr_grpo", traits=("needs_groups",),
    text=PartText(lambda o: "A = R − mean_g", summary="R - mean_g, no std (Dr. GRPO)", doc=("R − mean_g", "Dr. GRPO")),
)
def _dr_grpo(rewards, valid, groups, eps):
    return _centred(rewards, valid, groups)[1]


@ADVANTAGE.register(
    "rloo", traits=("needs_groups",),
    text=PartText(
        lambda o: "A = R − mean of the others in g", summary="R - mean of the other members of the group (RLOO)",
        doc=("R − mean of the other members of the group = G/(G−1)·(R − mean_g)", "RLOO"),
    ),
)
def _rloo(rewards, valid, groups, eps):
    # R_i - (sum_g - R_i)/(n-1) = n/(n-1) * (R_i - mean_g); 0 for a group of one.
    count_g, centred, _ = _centred(rewards, valid, groups)
    return torch.where(count_g > 1, centred * count_g / (count_g - 1).clamp(min=1), torch.zeros_like(rewards))


@ADVANTAGE.register(
    "batch_std", traits=("needs_groups",),
    text=PartText(
        lambda o: "A = (R − mean_g)/(std_batch + ε)", summary="(R - mean_g) / (std over the batch + eps) (Lite PPO)",
        doc=("(R − mean_g)/(std_batch + ε)", "Lite PPO, TRL `scale_rewards=\"batch\"`"),
    ),
)
def _batch_std_advantage(rewards, valid, groups, eps):
    return _centred(rewards, valid, groups)[1] / (_batch_std(rewards, valid) + eps)


@ADVANTAGE.register(
    "whiten",
    text=PartText(
        lambda o: "A = (R − mean_batch)/(std_batch + ε)",
        summary="(R - mean over the batch) / (std over the batch + eps), no groups",
        doc=("(R − mean_batch)/(std_batch + ε)", "PPO without a critic"),
    ),
)
def _whiten(rewards, valid, groups, eps):
    batch = torch.zeros(len(rewards), dtype=torch.long, device=rewards.device)
    _, mean_b, std_b = _segment_stats(rewards, valid, batch)
    return (rewards - mean_b) / (std_b + eps)


@ADVANTAGE.register(
    "reinforce",
    text=PartText(lambda o: "A = R", summary="R, no baseline (REINFORCE)", doc=("R", "REINFORCE")),
)
def _reinforce(rewards, valid, groups, eps):
    return rewards


@ADVANTAGE.register(
    "sft", traits=("is_supervised",),
    text=PartText(lambda o: "A = 1", summary="1 on every demonstration token (SFT)", doc=("1", "UPGE")),
)
def _sft(rewards, valid, groups, eps):
    return torch.ones_like(rewards)


ESTIMATORS = ADVANTAGE.names()
