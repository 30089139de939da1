"""The typed hand-off between the two halves of a step: `produce` makes a `Batch`, `learn` trains on it.

A `Batch` holds every tensor the update needs and nothing else, as loss components: each is a set of sequences
with its own objective, coefficient and normalisers (`unigrad.train.routing` decides which components a training
mode makes). Nothing in it refers to the rollout engine, the tasks or the sampler, so a batch can be produced by
another process or at another policy version than the one that learns from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrad.objective import Objective
from unigrad.objective.aggregation import Normalisers
from unigrad.train.batching import SequenceBatch


@dataclass
class LossComponent:
    """One loss term of a step: its rows, their per-row inputs, and how they enter the loss."""

    name: str  # metric prefix: "rl" or "sft"
    sequences: SequenceBatch  # (n, ...) prompt and completion tokens of its rows
    advantages: torch.Tensor  # (n,) constants of the policy term (1 for SFT rows)
    row_prompt: torch.Tensor  # (n,) the step prompt each row answers: shared prompt passes, accounting groups
    objective: Objective
    coef: float  # weight of this component's loss in the step's total
    normalisers: Normalisers | None  # of the whole batch over every process (None: no rows anywhere)
    infer_logprobs: torch.Tensor | None = None  # (n, T) the rollout engine's log-probs of sampled rows
    off_policy: torch.Tensor | None = None  # (n,) bool: demonstration rows inside groups (LUFFY)
    sampled: bool = True  # rows the engine sampled: measured against its log-probs (mismatch) and with entropy

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass
class Batch:
    """What `learn` consumes: the step's loss components and how its prompts split into accounting groups."""

    components: list[LossComponent]
    prompt_task: torch.Tensor  # (P,) task index of each of this process's prompts
    prompt_half: torch.Tensor  # (P,) accounting half of each prompt (per-task gradients; 0 when not measured)
    max_length: int  # L_max, the generation budget (Dr. GRPO's normaliser)
    temperature: float  # the sampling temperature, under which the learner scores the tokens
    policy_version: int  # optimizer steps taken by the weights that sampled it
