"""Teacher-forced per-token log-probs of completions: the one function the learner and the tests use.

Memory does not grow with vocabulary x sequence: logits are only formed for the (unmasked) completion positions,
a bounded chunk of rows at a time, and the log-prob of the target token is taken as
``logits.gather(target) - logsumexp(logits)`` without a full log_softmax copy. When gradients are enabled and there
is more than one chunk, each chunk's logits are recomputed in the backward pass (activation checkpointing) instead of
being kept alive until then.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Config attributes that make a causal LM's forward transform the lm_head output (soft-capping, scaling). When any is
# set we cannot apply `lm_head` to sliced hidden states ourselves and let the model compute the logits instead.
_LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # float32 logits elements per chunk (64 MB)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only unmasked tokens (left padding gets position 0), as transformers' `generate` does."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _lm_head_split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) when logits are exactly `lm_head(decoder(...).last_hidden_state)`, else None."""
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        return None
    config = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORM_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return None
    return decoder, head


def _token_logprobs(
    head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(rows).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    return logp, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def sequence_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_tokens: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(N, T) float32 log-probs of each completion token under `model` at `temperature`, 0 where masked.

    One teacher-forced forward pass over ``[prompt; completion]`` (prompt left-padded, completion right-padded, as in
    `Rollout`), with position ids that skip the left padding. The distribution is the full softmax of
    ``logits / temperature`` (no top-k / top-p). Differentiable when called with gradients enabled.
    `chunk_tokens` bounds how many completion tokens get their logits formed at once (default: ~16M logits).
    With `return_entropy`, also returns the (N, T) entropy of that same distribution per position (0 where masked).
    """
    n, prompt_len = prompt_ids.shape
    t_len = completion_ids.shape[1]
    if temperature <= 0:
        raise ValueError("sequence_logprobs needs temperature > 0")
    if prompt_len == 0:
        raise ValueError("sequence_logprobs needs at least one prompt token per row")
    device = prompt_ids.device
    if t_len == 0:
        empty = torch.zeros(n, 0, dtype=torch.float32, device=device)
        return (empty, empty.clone()) if return_entropy else empty

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = position_ids_from_mask(attention_mask)
    # Logits at position i predict token i + 1: completion token t is predicted at position prompt_len - 1 + t.
    first, last = prompt_len - 1, prompt_len - 1 + t_len

    split = _lm_head_split(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        states = hidden[:, first:last]
    else:  # let the model apply its own lm_head (and any logit transform) to the last T + 1 positions only
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=t_len + 1,
        )
        states, head = out.logits[:, :-1], nn.Identity()

    selected = completion_mask.bool()
    rows, targets = states[selected], completion_ids[selected]
    if chunk_tokens is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or states.shape[-1]
        chunk_tokens = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    recompute = torch.is_grad_enabled() and rows.shape[0] > chunk_tokens and split is not None

    logps, entropies = [], []
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk = (head, rows[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        args = (*chunk, temperature, return_entropy)
        logp, entropy = checkpoint(_token_logprobs, *args, use_reentrant=False) if recompute else _token_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)

    def scatter(pieces: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(n, t_len, dtype=torch.float32, device=device)
        if not pieces:  # nothing unmasked: keep the result attached to the graph so backward still works
            return out + 0.0 * states.sum()
        return out.masked_scatter(selected, torch.cat(pieces))

    return (scatter(logps), scatter(entropies)) if return_entropy else scatter(logps)
