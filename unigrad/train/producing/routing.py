"""Routing as data: a step's rows and its training mode in, its loss components out.

How a step uses the tasks' demonstrations (reference solutions) is one setting, `TrainingMode.demonstrations`:

    none      GRPO and every other RL preset        -> [rl]
    all       objective=sft: nothing is sampled     -> [sft]
    failed    HPT (arXiv 2509.04419): prompts whose mean reward is <= gamma go to SFT on their
              demonstration, the rest to RL          -> [rl, sft]
    in_group  LUFFY (arXiv 2504.14945): each group's last row is the prompt's demonstration, scored with the
              group and trained through the objective's off-policy route -> [rl] with off-policy rows

`route` is a pure function of its inputs: the same rows, advantages and rewards give the same components. Each
component's normalisers are this process's counts; the caller sums them over processes
(`unigrad.train.producing.produce`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unigrad.objective import Objective, batch_normalisers, resolve_objective
from unigrad.objective.hybrid import hpt_switch
from unigrad.rollout.base import Rollout
from unigrad.tasks.base import Example
from unigrad.train.batch import LossComponent
from unigrad.train.learning.batching import SequenceBatch
from unigrad.train.producing.demonstrations import check_demonstrations, demonstration_batch

Demonstrations = Literal["none", "all", "failed", "in_group"]
SFT = resolve_objective("sft")


@dataclass(frozen=True)
class TrainingMode:
    """How demonstrations enter a step (see the module docstring), and the components' weights."""

    demonstrations: Demonstrations = "none"
    hpt_gamma: float = 0.0  # "failed": a prompt whose mean reward is <= this goes to SFT
    rl_coef: float = 1.0
    sft_coef: float = 1.0

    @property
    def samples(self) -> bool:
        """Whether the step samples completions at all (not with demonstrations only)."""
        return self.demonstrations != "all"

    def sampled_per_prompt(self, num_generations: int) -> int:
        """Completions the engine samples per prompt: G, or G - 1 when the demonstration is the G-th."""
        return num_generations - (self.demonstrations == "in_group") if self.samples else 0

    @classmethod
    def from_config(cls, cfg) -> TrainingMode:
        if cfg.objective == "sft":
            return cls("all", sft_coef=cfg.hybrid.sft_coef)
        if cfg.is_hybrid:
            return cls("failed", cfg.hybrid.gamma, cfg.hybrid.rl_coef, cfg.hybrid.sft_coef)
        return cls("in_group" if cfg.uses_guidance else "none", sft_coef=cfg.hybrid.sft_coef)


@dataclass
class Routed:
    """`route`'s result: the components, and which prompts went to SFT (for the hpt/ metrics)."""

    components: list[LossComponent]
    sft_prompt: torch.Tensor  # (P,) bool


@dataclass(frozen=True)
class ScoredRows:
    """This process's prompts of a step and their rows, scored: what `route` divides into loss components."""

    examples: list[Example]  # (P,)
    prompt_ids: list[list[int]]  # (P,) chat-templated
    rollout: Rollout  # (N,) every row of the prompts (demonstration rows included for "in_group")
    off_policy: torch.Tensor  # (N,) bool: the demonstration rows
    rewards: torch.Tensor  # (N,) the verifiers' (HPT's switch reads them)
    advantages: torch.Tensor  # (N,)


def route(mode: TrainingMode, objective: Objective, scored: ScoredRows, tokenizer) -> Routed:
    """The step's loss components from `scored` (this process's prompts and rows)."""
    ro, off_policy, advantages, rewards = scored.rollout, scored.off_policy, scored.advantages, scored.rewards
    examples, prompt_ids = scored.examples, scored.prompt_ids
    num_prompts = len(examples)
    if mode.demonstrations == "all":
        sft_prompt = torch.ones(num_prompts, dtype=torch.bool)
    elif mode.demonstrations == "failed":
        sft_prompt = hpt_switch(rewards, ro.group_ids, num_prompts, mode.hpt_gamma)  # (P,)
    else:
        sft_prompt = torch.zeros(num_prompts, dtype=torch.bool)
    components = []
    if mode.samples:
        rows = torch.nonzero(~sft_prompt[ro.group_ids]).flatten()  # rows trained by RL
        sequences = SequenceBatch(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                  ro.observation_mask, ro.routing).rows(rows)
        components.append(LossComponent(
            "rl", sequences, advantages[rows], ro.group_ids[rows], objective, mode.rl_coef,
            batch_normalisers(sequences.completion_mask, objective) if len(rows) else None,
            infer_logprobs=ro.infer_logprobs[rows],
            off_policy=off_policy[rows] if mode.demonstrations == "in_group" else None))
    sft_prompts = torch.nonzero(sft_prompt).flatten()
    if len(sft_prompts) or mode.demonstrations in ("all", "failed"):
        chosen = [examples[p] for p in sft_prompts.tolist()]
        if chosen:
            check_demonstrations(chosen, "objective=sft" if mode.demonstrations == "all" else "HPT")
        sequences = demonstration_batch(tokenizer, [prompt_ids[p] for p in sft_prompts.tolist()], chosen) \
            if chosen else None
        components.append(LossComponent(
            "sft", sequences if sequences is not None else _no_sequences(), torch.ones(len(chosen)), sft_prompts,
            SFT, mode.sft_coef, batch_normalisers(sequences.completion_mask, SFT) if sequences is not None else None,
            sampled=False))
    return Routed(components, sft_prompt)


def _no_sequences() -> SequenceBatch:
    empty = torch.zeros((0, 1), dtype=torch.long)
    return SequenceBatch(empty, empty.bool(), empty, empty.bool())
