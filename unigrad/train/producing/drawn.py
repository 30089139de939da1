"""What one draw of a step makes (prompts, their rows, the verifiers' rewards), shared by the step's production
(unigrad.train.producing.produce) and DAPO's dynamic sampling (unigrad.train.producing.dynamic_sampling), which
merges several."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unigrad.rollout.base import Rollout
from unigrad.rollout.episodes import Episodes
from unigrad.tasks.base import Example


@dataclass
class Drawn:
    """Prompts of this process, their rows and the verifiers' rewards: what one draw (or several, merged) made."""

    picks: list[tuple[int, int]]  # (P,) (task index, example index)
    examples: list[Example]  # (P,)
    prompt_ids: list[list[int]]  # (P,) chat-templated token ids
    rollout: Rollout  # (N,) rows, demonstration rows included (LUFFY)
    off_policy: torch.Tensor  # (N,) bool: demonstration rows
    texts: list[str]  # (N,) decoded completions
    rewards: torch.Tensor  # (N,) the verifiers' (NaN = unscorable)
    errors: dict[str, str]  # {task: what made its rewards unscorable}
    time_rollout: float = 0.0
    time_reward: float = 0.0
    episodes: Episodes | None = None  # multi-turn runs (`unigrad.rollout.episodes`)
    failures: dict[str, float] = field(default_factory=dict)  # completions scored as failed, by reason (`score`)
