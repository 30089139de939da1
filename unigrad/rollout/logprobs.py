"""Teacher-forced per-token log-probs of completions: the one function the learner and the tests use.

Memory does not grow with vocabulary x sequence: logits are only formed for the (unmasked) completion positions,
a bounded chunk of rows at a time, and the log-prob of the target token is taken as
``logits.gather(target) - logsumexp(logits)`` without a full log_softmax copy. When gradients are enabled and there
is more than one chunk, each chunk's logits are recomputed in the backward pass (activation checkpointing) instead of
being kept alive until then.

Rows that share a prompt (a GRPO group's G samples) share its forward pass too: each distinct prompt runs once and
its keys and values are expanded to its rows, whose completions then run against that cache. The gradient flows
back through the expansion into the one prompt pass, so the result equals the flat forward over
``[prompt; completion]`` up to float rounding, at about 1/G of the prompt's cost. It is used when it skips at least
`SHARE_MIN_SAVED_TOKENS` prompt tokens and a quarter of the batch's tokens; short prompts are not worth a second call.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Config attributes that make a causal LM's forward transform the lm_head output (soft-capping, scaling). When any is
# set we cannot apply `lm_head` to sliced hidden states ourselves and let the model compute the logits instead.
_LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # float32 logits elements per chunk (64 MB)
SHARE_MIN_SAVED_TOKENS = 256  # share prompts only if that skips at least this many prompt tokens (and 25% of all)


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword a causal LM's forward takes its KV cache by: `cache` in transformers >= 5.2x, else
    `past_key_values` (deprecated there, removed in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned (attribute `cache` or, in older transformers, `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first: no warning
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only unmasked tokens (left padding gets position 0), as transformers' `generate` does."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _lm_head_split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) when logits are exactly `lm_head(decoder(...).last_hidden_state)`, else None.

    A peft model is unwrapped first: its adapters live inside the base model's layers, so they still apply."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        return None
    config = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORM_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return None
    return decoder, head


def _distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of one row per distinct prompt (P,), row -> distinct prompt (N,)); equal ids and mask = same prompt."""
    key = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), key.shape[0], dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(key.shape[0], device=key.device), reduce="amin")
    return first, inverse


def _shared_prompt_states(decoder: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          first: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor | None:
    """Hidden states (N, T, H) predicting each completion token, each distinct prompt run once; None if the
    decoder returned no cache (e.g. gradient checkpointing turns caching off)."""
    out = decoder(input_ids=prompt_ids[first], attention_mask=prompt_mask[first].long(),
                  position_ids=position_ids_from_mask(prompt_mask[first]), use_cache=True)
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(inverse)  # differentiable: an index into the prompt's keys and values
    mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    t_len = completion_ids.shape[1]
    hidden = decoder(input_ids=completion_ids, attention_mask=mask,
                     position_ids=position_ids_from_mask(mask)[:, -t_len:], use_cache=True,
                     **cache_kwargs(decoder, cache)).last_hidden_state
    # Token 0 is predicted from the prompt's last position (real: prompts are left-padded), token t from t - 1.
    return torch.cat([out.last_hidden_state[:, -1][inverse].unsqueeze(1), hidden[:, :-1]], dim=1)


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
    share_prompts: bool | None = None,
    observation_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(N, T) float32 log-probs of each completion token under `model` at `temperature`, 0 where masked.

    One teacher-forced forward pass over ``[prompt; completion]`` (prompt left-padded, completion right-padded, as in
    `Rollout`), with position ids that skip the left padding. The distribution is the full softmax of
    ``logits / temperature`` (no top-k / top-p). Differentiable when called with gradients enabled.
    `chunk_tokens` bounds how many completion tokens get their logits formed at once (default: ~16M logits).
    With `return_entropy`, also returns the (N, T) entropy of that same distribution per position (0 where masked).
    `share_prompts`: rows with identical prompts share one prompt pass (see the module docstring) always (True),
    never (False), or when it saves enough (None, the default).
    `observation_mask` (N, T) bool: completion tokens that are in the context but not scored (a multi-turn
    episode's observations); their log-probs are 0 like padding's, and the tokens after them attend to them.
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

    context = completion_mask.bool() if observation_mask is None else completion_mask.bool() | observation_mask.bool()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, context], dim=1).long()
    position_ids = position_ids_from_mask(attention_mask)
    # Logits at position i predict token i + 1: completion token t is predicted at position prompt_len - 1 + t.
    first, last = prompt_len - 1, prompt_len - 1 + t_len

    split = _lm_head_split(model)
    states = None
    if split is not None and share_prompts is not False and n > 1 and not _checkpointing(model):
        first_rows, inverse = _distinct_prompts(prompt_ids, prompt_mask)
        real_prompt_tokens = prompt_mask.sum(-1)
        saved = int(real_prompt_tokens.sum() - real_prompt_tokens[first_rows].sum())
        # Worth a second forward call only when it saves many prompt tokens (a call costs about as much as a
        # couple of hundred tokens of a small model on a CPU).
        if saved > 0 and (share_prompts or saved >= max(SHARE_MIN_SAVED_TOKENS, 0.25 * int(attention_mask.sum()))):
            states = _shared_prompt_states(split[0], prompt_ids, prompt_mask, completion_ids, context,
                                           first_rows, inverse)
    if states is not None:
        head = split[1]
    elif split is not None:
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
