"""The rollout-engine protocol and the `Rollout` it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .padding import widen


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 32
    seed: int | None = None  # seeds the engine's sampler for this call
    # One seed per prompt of the call: prompt p's samples come from its own random stream, so they do not depend on
    # which other prompts share the call (batch size, engine shards, processes). None: derived from `seed` and the
    # prompt's position in the call.
    prompt_seeds: tuple[int, ...] | None = None


def resolve_prompt_seeds(sampling: SamplingParams, prompts: int) -> tuple[int, ...]:
    """The seeds of a call's per-prompt random streams: `sampling.prompt_seeds` (checked against the number of
    prompts), else derived from `sampling.seed` (a random seed when that is None too)."""
    if sampling.prompt_seeds is not None:
        if len(sampling.prompt_seeds) != prompts:
            raise ValueError(f"prompt_seeds has {len(sampling.prompt_seeds)} seeds for {prompts} prompts")
        return tuple(sampling.prompt_seeds)
    seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
    return prompt_stream_seeds(seed, prompts)


def prompt_stream_seeds(seed: int, prompts: int, offset: int = 0) -> tuple[int, ...]:
    """Seeds of the random streams of prompts offset .. offset + prompts - 1 of a call seeded with `seed`: what an
    engine uses when `SamplingParams.prompt_seeds` is None (offset 0), and how a caller splitting one call's prompts
    over several engines or processes keeps every prompt's samples."""
    return tuple((seed * 1_000_003 + offset + i) % 2**63 for i in range(prompts))


def check_generate_args(prompts: list[list[int]], n: int, sampling: SamplingParams) -> None:
    """The checks every engine's `generate` makes on its arguments."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if sampling.temperature < 0:
        raise ValueError("temperature must be >= 0")


def eos_id_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """A tokenizer's EOS id(s) as a list: one id, several, or none (never stop early)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(i) for i in eos_token_id]


@dataclass
class Rollout:
    """n completions for each of P prompts; rows p*n .. p*n+n-1 belong to prompt p."""

    prompt_ids: torch.Tensor  # (N, P_len) long, left-padded with the pad id
    prompt_mask: torch.Tensor  # (N, P_len) bool
    completion_ids: torch.Tensor  # (N, T) long, right-padded with the pad id
    completion_mask: torch.Tensor  # (N, T) bool, generated tokens including the EOS that ended them
    infer_logprobs: torch.Tensor  # (N, T) float32, log-prob of each sampled token under the sampling
    #                               distribution actually used (temperature, top-k, top-p); 0 where masked
    group_ids: torch.Tensor  # (N,) long, index of the prompt in the call
    truncated: torch.Tensor  # (N,) bool, stopped by max_new_tokens rather than EOS
    # (N, T) bool: tokens in the completion that the policy did not write (a multi-turn episode's observations: tool
    # results, the environment's feedback). They are in the context of the tokens after them and out of every loss
    # and token count; `completion_mask` is False there. None (single-turn rollouts): no such token.
    observation_mask: torch.Tensor | None = None
    # (N, P_len + T, layers, top_k) long: the experts each MoE layer of the engine chose for each prompt and
    # completion token, -1 where it chose none (padding, the last token); None unless the engine records routing
    # (rollout.routing_replay). The learner replays it (`unigrad.models.moe_routing`).
    routing: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.observation_mask is None:
            self.observation_mask = torch.zeros_like(self.completion_mask)

    @property
    def context_mask(self) -> torch.Tensor:
        """(N, T) bool: the completion's tokens in context (written by the policy or observed)."""
        return self.completion_mask | self.observation_mask

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]

    def to(self, device: torch.device | str) -> Rollout:
        """The same rollout with every tensor on `device` (itself when they are all there already)."""
        device = torch.device(device)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if all(t is None or t.device == device for t in fields.values()):
            return self
        return Rollout(**{k: t.to(device) if t is not None else None for k, t in fields.items()})


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """Sample `n` completions for each tokenised prompt (chat template already applied)."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take the learner's current weights (called after each optimizer step)."""
        ...


def merge_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rollouts of consecutive prompt blocks as one: prompts left-padded and completions right-padded to the widest,
    group ids renumbered in order."""
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    width = max(p.completion_ids.shape[1] for p in parts)

    def left(t: torch.Tensor, value) -> torch.Tensor:
        return widen(t, prompt_width, "left", value)

    def right(t: torch.Tensor, value) -> torch.Tensor:
        return widen(t, width, "right", value)

    offsets, groups = 0, []
    for p in parts:
        groups.append(p.group_ids + offsets)
        offsets += int(p.group_ids.max()) + 1 if p.num_sequences else 0
    return Rollout(
        prompt_ids=torch.cat([left(p.prompt_ids, pad_token_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, False) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids, pad_token_id) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask, False) for p in parts]),
        infer_logprobs=torch.cat([right(p.infer_logprobs, 0.0) for p in parts]),
        group_ids=torch.cat(groups),
        truncated=torch.cat([p.truncated for p in parts]),
        observation_mask=torch.cat([right(p.observation_mask, False) for p in parts]),
        routing=merge_routing(parts, prompt_width, width),
    )


def widen_routing(routing: torch.Tensor, prompt_len: int, prompt_width: int, width: int) -> torch.Tensor:
    """A routing record (N, prompt_len + T, layers, k) of prompts widened on the left to `prompt_width` and
    completions on the right to `width`, with -1 (no choice) in the new columns."""
    n, total, *rest = routing.shape
    left = routing.new_full((n, prompt_width - prompt_len, *rest), -1)
    right = routing.new_full((n, width - (total - prompt_len), *rest), -1)
    return torch.cat([left, routing, right], dim=1)


def merge_routing(parts: list[Rollout], prompt_width: int, width: int) -> torch.Tensor | None:
    """The parts' routing records as one (see `merge_rollouts`); None unless every part has one."""
    if any(p.routing is None for p in parts):
        return None
    return torch.cat([widen_routing(p.routing, p.prompt_ids.shape[1], prompt_width, width) for p in parts])
