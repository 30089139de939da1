"""Token batches: prompts through the chat template, demonstrations as completions, micro-batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from unigrad.rollout.padding import pad_rows
from unigrad.rollout.prompts import encode_prompt  # noqa: F401 - its home is below the trainer


def encode_completion(tokenizer, text: str) -> list[int]:
    """A demonstration as completion tokens, ended by EOS like a sampled completion. Each text is encoded once per
    tokenizer (a demonstration is drawn again and again over a run)."""
    return list(_encoded(tokenizer, text))


@functools.lru_cache(maxsize=1 << 16)
def _encoded(tokenizer, text: str) -> tuple[int, ...]:
    return (*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)


@dataclass
class SequenceBatch:
    """Prompt/completion pairs laid out as the learner consumes them."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) bool
    completion_ids: torch.Tensor  # (N, T) right-padded
    completion_mask: torch.Tensor  # (N, T) bool: the tokens trained on (written by the policy or demonstrated)
    # (N, T) bool: observed tokens between a multi-turn episode's turns: in context, never trained or counted
    observation_mask: torch.Tensor | None = None
    # (N, P + T, layers, top_k): the engine's expert choices (`Rollout.routing`), replayed by the learner; or None
    routing: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.observation_mask is None:
            self.observation_mask = torch.zeros_like(self.completion_mask)

    @property
    def context_mask(self) -> torch.Tensor:
        """(N, T) bool: every real completion token (trained or observed)."""
        return self.completion_mask | self.observation_mask

    def rows(self, index: torch.Tensor) -> SequenceBatch:
        return SequenceBatch(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                             self.completion_mask[index], self.observation_mask[index],
                             self.routing[index] if self.routing is not None else None)

    def trimmed(self) -> SequenceBatch:
        """The same rows without the columns that are padding in every row (left of the prompts, right
        of the completions), so a micro-batch of short rows costs what its rows need. At least one
        prompt and one completion column stay."""
        p_keep = max(1, int(self.prompt_mask.sum(-1).max())) if len(self) else self.prompt_ids.shape[1]
        t_keep = max(1, int(self.context_mask.sum(-1).max())) if len(self) else self.completion_ids.shape[1]
        p_keep, t_keep = min(p_keep, self.prompt_ids.shape[1]), min(t_keep, self.completion_ids.shape[1])
        p_len = self.prompt_ids.shape[1]
        routing = self.routing[:, p_len - p_keep : p_len + t_keep] if self.routing is not None else None
        return SequenceBatch(self.prompt_ids[:, -p_keep:], self.prompt_mask[:, -p_keep:],
                             self.completion_ids[:, :t_keep], self.completion_mask[:, :t_keep],
                             self.observation_mask[:, :t_keep], routing)

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                             self.completion_mask.to(device), self.observation_mask.to(device),
                             self.routing.to(device) if self.routing is not None else None)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


def pad_pairs(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> SequenceBatch:
    """Left-pad prompts and right-pad completions into a `SequenceBatch` (at least one completion column)."""
    prompt_ids, prompt_mask = pad_rows(prompts, "left", pad_id)
    completion_ids, completion_mask = pad_rows(completions, "right", pad_id,
                                               width=max(1, max(len(c) for c in completions)))
    return SequenceBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)


def length_grouped_micro_batches(batch: SequenceBatch, size: int,
                                 groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of micro-batches of at most `size` rows, rows of similar length together (sorted by
    prompt + completion length, ties by row), so that `trimmed()` micro-batches carry little padding.

    With `groups` (N,) (e.g. the prompt of each row), rows of a group stay next to each other: groups are sorted
    by their longest row, so the learner can run each shared prompt once per micro-batch.
    The gradient is the same as with any other grouping: normalisers are global to the step."""
    lengths = (batch.prompt_mask.sum(-1) + batch.context_mask.sum(-1)).tolist()
    if groups is None:
        order = sorted(range(len(batch)), key=lambda r: (lengths[r], r))
    else:
        group = groups.tolist()
        longest: dict[int, int] = {}
        for r, g in enumerate(group):
            longest[g] = max(longest.get(g, 0), lengths[r])
        order = sorted(range(len(batch)), key=lambda r: (longest[group[r]], group[r], lengths[r], r))
    return [torch.tensor(order[i:i + size], dtype=torch.long) for i in range(0, len(order), size)]
