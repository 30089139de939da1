"""The typed hand-off between the two halves of a step: `produce` makes a `Batch`, `learn` trains on it.

A `Batch` holds every tensor the update needs and nothing else, as loss components: each is a set of sequences
with its own objective, coefficient and normalisers (`unigrad.train.producing.routing` decides which components a
training
mode makes). Nothing in it refers to the rollout engine, the tasks or the sampler, so a batch can be produced by
another process or at another policy version than the one that learns from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrad.objective import Objective, batch_normalisers
from unigrad.objective.aggregation import Normalisers
from unigrad.train.learning.batching import SequenceBatch
from unigrad.train.lifecycle.distributed import Distributed


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
    policy_version: int  # the behaviour policy's version: rollout steps trained before its weights sampled it
    first_prompt: int = 0  # global index of this process's first prompt (its prompts are a contiguous block)
    num_prompts: int | None = None  # prompts of the whole step over every process (None = this process's)

    @property
    def total_prompts(self) -> int:
        return len(self.prompt_task) if self.num_prompts is None else self.num_prompts

    def local_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        """This process's indices of those of the step's global prompt indices `prompts` that it holds."""
        lo, hi = self.first_prompt, self.first_prompt + len(self.prompt_task)
        return prompts[(prompts >= lo) & (prompts < hi)] - lo


def global_normalisers(dist: Distributed, local: Normalisers | None) -> Normalisers | None:
    """The whole batch's normalisers: this process's (None = no rows) summed over processes; None if all empty."""
    if not dist.active:
        return local
    local = local or Normalisers(0.0, 0.0)
    total = dist.sum_(torch.tensor([local.num_tokens, local.num_sequences], dtype=torch.float64)).tolist()
    return Normalisers(*total) if total[1] > 0 else None


def rows_normalisers(comp: LossComponent, rows: torch.Tensor, dist: Distributed) -> Normalisers | None:
    """The normalisers of `rows` of `comp` (a mini-batch's share on this process), summed over processes: each
    optimizer step divides by the counts of its own mini-batch. Every process must call it."""
    local = batch_normalisers(comp.sequences.completion_mask[rows], comp.objective) if len(rows) else None
    return global_normalisers(dist, local)
