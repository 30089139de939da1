"""HPT's per-prompt switch between SFT and RL (Hybrid Post-Training, arXiv 2509.04419, Alg. 1).

For prompt q with n rollouts and verifier scores v_i, P = mean_i v_i and

    (alpha, beta) = (0, 1) if P <= gamma   -> SFT on q's demonstration
                    (1, 0) otherwise       -> RL on q's rollouts

The official code uses n = 8 and gamma = 0 (SFT only when every rollout fails) for
Qwen2.5-Math, and gamma = 2/8 for Llama-3.1-8B. Edge cases, decided here once:
- unscorable rollouts (NaN reward) are left out of P; a prompt with no scorable rollout has
  no RL signal and goes to SFT;
- P is compared with a small tolerance (P <= gamma + 1e-9) so that gamma = 2/8 with 2 of 8
  successes switches to SFT despite float rounding.
The loss is then L = alpha * L_RL + beta * L_SFT with a separate normaliser per component, so
SFT tokens never dilute the RL tokens' normaliser (and vice versa).
"""

from __future__ import annotations

import torch


def prompt_success_rate(rewards: torch.Tensor, group_ids: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """P per prompt: mean of the scorable rewards of its rollouts (NaN if none).  (N,) -> (num_prompts,)"""
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    total = torch.zeros(num_prompts, device=r.device).index_add_(0, group_ids, r)
    count = torch.zeros(num_prompts, device=r.device).index_add_(0, group_ids, valid.float())
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def hpt_switch(rewards: torch.Tensor, group_ids: torch.Tensor, num_prompts: int, gamma: float = 0.0) -> torch.Tensor:
    """Bool (num_prompts,): True where the prompt takes the SFT branch (P <= gamma or unscorable)."""
    p = prompt_success_rate(rewards, group_ids, num_prompts)
    return torch.isnan(p) | (p <= gamma + 1e-9)
