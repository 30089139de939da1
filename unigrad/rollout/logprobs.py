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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unigrad.models.moe_routing import RoutingControl, controlled_routing

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


def _shared_prompt_states(decoder: nn.Module, seqs: TokenSequences, first: torch.Tensor, inverse: torch.Tensor,
                          routing: _PassRouting | None) -> torch.Tensor | None:
    """Hidden states (N, T, H) predicting each completion token, each distinct prompt run once; None if the
    decoder returned no cache (e.g. gradient checkpointing turns caching off). With `routing`, the prompt pass
    replays the first row's choices of each distinct prompt (the rows of a prompt share its prefill in the engine
    too) and the completion pass each row's own; recorded choices come back as one (N, P_len + T) piece."""
    prompt_ids, prompt_mask, completion_ids = seqs.prompt_ids, seqs.prompt_mask, seqs.completion_ids
    prompt_len = prompt_ids.shape[1]
    replay = seqs.routing
    with _routed(routing, decoder, replay[first, :prompt_len] if replay is not None else None, len(first)):
        out = decoder(input_ids=prompt_ids[first], attention_mask=prompt_mask[first].long(),
                      position_ids=position_ids_from_mask(prompt_mask[first]), use_cache=True)
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        if routing is not None:
            routing.pieces.clear()
        return None
    cache.batch_select_indices(inverse)  # differentiable: an index into the prompt's keys and values
    mask = torch.cat([prompt_mask, seqs.context], dim=1).long()
    t_len = completion_ids.shape[1]
    with _routed(routing, decoder, replay[:, prompt_len:] if replay is not None else None, len(inverse)):
        hidden = decoder(input_ids=completion_ids, attention_mask=mask,
                         position_ids=position_ids_from_mask(mask)[:, -t_len:], use_cache=True,
                         **cache_kwargs(decoder, cache)).last_hidden_state
    if routing is not None and routing.pieces:
        routing.pieces[0] = routing.pieces[0][inverse]
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


@dataclass(frozen=True)
class TokenSequences:
    """Rows of ``[prompt; completion]`` to score, laid out as in `Rollout`: prompts left-padded, completions
    right-padded. `observation_mask` (N, T) bool: completion tokens in the context but not scored (a multi-turn
    episode's observations). `routing` (N, P_len + T, layers, top_k): the experts an engine chose for each token,
    -1 where none; given, the model's MoE routers use them (rollout routing replay, `unigrad.models.moe_routing`)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    observation_mask: torch.Tensor | None = None
    routing: torch.Tensor | None = None

    @property
    def context(self) -> torch.Tensor:
        """(N, T) bool: completion tokens in the context (scored or observed)."""
        if self.observation_mask is None:
            return self.completion_mask.bool()
        return self.completion_mask.bool() | self.observation_mask.bool()


@dataclass(frozen=True)
class ScoringOptions:
    """How `score_sequences` scores: see `sequence_logprobs` for each."""

    temperature: float = 1.0
    chunk_tokens: int | None = None
    return_entropy: bool = False
    share_prompts: bool | None = None
    record_routing: bool = False  # also return the model's own expert choice (before any replay)


@dataclass
class Scores:
    logprobs: torch.Tensor  # (N, T) float32, 0 where masked
    entropy: torch.Tensor | None = None  # (N, T) with `return_entropy`
    routing: torch.Tensor | None = None  # (N, P_len + T, layers, top_k) the model's own choice, `record_routing`


def _check_request(seqs: TokenSequences, options: ScoringOptions, model: nn.Module) -> None:
    if options.temperature <= 0:
        raise ValueError("sequence_logprobs needs temperature > 0")
    if seqs.prompt_ids.shape[1] == 0:
        raise ValueError("sequence_logprobs needs at least one prompt token per row")
    if seqs.routing is None:
        return
    n, width = seqs.prompt_ids.shape[0], seqs.prompt_ids.shape[1] + seqs.completion_ids.shape[1]
    if seqs.routing.dim() != 4 or tuple(seqs.routing.shape[:2]) != (n, width):
        raise ValueError(f"routing must be (N, P_len + T, layers, top_k) = ({n}, {width}, ...), got "
                         f"{tuple(seqs.routing.shape)}")
    if _checkpointing(model):
        raise ValueError("routing replay with activation checkpointing is not supported (the recomputed forward "
                         "would route on its own)")


@dataclass
class _PassRouting:
    """The routing of one scoring pass: the routers' control, and each forward call's own choices (B, L, layers, k)
    when recording."""

    control: RoutingControl
    pieces: list[torch.Tensor] = field(default_factory=list)

    @contextmanager
    def call(self, model: nn.Module, replay: torch.Tensor | None, rows: int) -> Iterator[None]:
        """While open, `model`'s routers replay `replay` (rows, L, layers, k) (None: their own choice) for one
        forward over (rows, L) tokens; their own choice is kept on exit when recording."""
        self.control.replay = replay.flatten(0, 1) if replay is not None else None
        with controlled_routing(model, self.control):
            yield
        self.control.replay = None
        if self.control.record:
            self.pieces.append(self.control.take_recorded().unflatten(0, (rows, -1)))


def _pass_routing(seqs: TokenSequences, options: ScoringOptions) -> _PassRouting | None:
    """The routing of this pass (replay and/or record), or None when neither is asked."""
    if seqs.routing is None and not options.record_routing:
        return None
    return _PassRouting(RoutingControl(record=options.record_routing))


def _routed(routing: _PassRouting | None, model: nn.Module, replay: torch.Tensor | None, rows: int):
    return nullcontext() if routing is None else routing.call(model, replay, rows)


def _completion_states(model: nn.Module, seqs: TokenSequences, options: ScoringOptions,
                       routing: _PassRouting | None) -> tuple[torch.Tensor, nn.Module]:
    """(states (N, T, H) predicting each completion token, the head that maps them to logits (identity when the
    model applied its own head)); routing replayed and recorded through `routing`."""
    n, prompt_len = seqs.prompt_ids.shape
    t_len = seqs.completion_ids.shape[1]
    split = _lm_head_split(model)
    if split is not None and options.share_prompts is not False and n > 1 and not _checkpointing(model):
        first_rows, inverse = _distinct_prompts(seqs.prompt_ids, seqs.prompt_mask)
        real_prompt_tokens = seqs.prompt_mask.sum(-1)
        saved = int(real_prompt_tokens.sum() - real_prompt_tokens[first_rows].sum())
        total = int(real_prompt_tokens.sum() + seqs.context.sum())
        # Worth a second forward call only when it saves many prompt tokens (a call costs about as much as a
        # couple of hundred tokens of a small model on a CPU).
        if saved > 0 and (options.share_prompts or saved >= max(SHARE_MIN_SAVED_TOKENS, 0.25 * total)):
            states = _shared_prompt_states(split[0], seqs, first_rows, inverse, routing)
            if states is not None:
                return states, split[1]
    input_ids = torch.cat([seqs.prompt_ids, seqs.completion_ids], dim=1)
    attention_mask = torch.cat([seqs.prompt_mask, seqs.context], dim=1).long()
    position_ids = position_ids_from_mask(attention_mask)
    with _routed(routing, model, seqs.routing, n):
        if split is not None:
            hidden = split[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
            # Logits at position i predict token i + 1: completion token t is predicted at position P_len - 1 + t.
            return hidden[:, prompt_len - 1 : prompt_len - 1 + t_len], split[1]
        # let the model apply its own lm_head (and any logit transform) to the last T + 1 positions only
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=t_len + 1)
        return out.logits[:, :-1], nn.Identity()


def _token_scores(head: nn.Module, states: torch.Tensor, seqs: TokenSequences, options: ScoringOptions,
                  vocab: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the scored completion tokens, a bounded chunk of rows at a time; (N, T)."""
    n, t_len = seqs.completion_ids.shape
    selected = seqs.completion_mask.bool()
    rows, targets = states[selected], seqs.completion_ids[selected]
    chunk_tokens = options.chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // (vocab or states.shape[-1]))
    recompute = torch.is_grad_enabled() and rows.shape[0] > chunk_tokens and not isinstance(head, nn.Identity)
    logps, entropies = [], []
    for start in range(0, rows.shape[0], chunk_tokens):
        args = (head, rows[start : start + chunk_tokens], targets[start : start + chunk_tokens], options.temperature,
                options.return_entropy)
        logp, entropy = checkpoint(_token_logprobs, *args, use_reentrant=False) if recompute else _token_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)

    def scatter(pieces: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(n, t_len, dtype=torch.float32, device=states.device)
        if not pieces:  # nothing unmasked: keep the result attached to the graph so backward still works
            return out + 0.0 * states.sum()
        return out.masked_scatter(selected, torch.cat(pieces))

    return scatter(logps), scatter(entropies) if options.return_entropy else None


def score_sequences(model: nn.Module, seqs: TokenSequences, options: ScoringOptions | None = None) -> Scores:
    """`sequence_logprobs` on a typed input: the log-probs, the entropy (`return_entropy`) and the model's own expert
    choice (`record_routing`, MoE models), in named phases: check, completion states, chunked token scores."""
    options = options or ScoringOptions()
    _check_request(seqs, options, model)
    n, t_len = seqs.completion_ids.shape
    if t_len == 0:
        empty = torch.zeros(n, 0, dtype=torch.float32, device=seqs.prompt_ids.device)
        return Scores(empty, empty.clone() if options.return_entropy else None)
    routing = _pass_routing(seqs, options)
    states, head = _completion_states(model, seqs, options, routing)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    logprobs, entropy = _token_scores(head, states, seqs, options, vocab)
    own = None
    if routing is not None and options.record_routing:  # one piece (flat pass) or two (shared prompts)
        own = routing.pieces[0] if len(routing.pieces) == 1 else torch.cat(routing.pieces, dim=1)
    return Scores(logprobs, entropy, own)


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
    routing: torch.Tensor | None = None,
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
    `routing` (N, P_len + T, layers, top_k): expert choices the MoE routers replay (`Rollout.routing`).
    A typed form with more outputs: `score_sequences`.
    """
    seqs = TokenSequences(prompt_ids, prompt_mask, completion_ids, completion_mask, observation_mask, routing)
    scores = score_sequences(model, seqs, ScoringOptions(temperature, chunk_tokens, return_entropy, share_prompts))
    return (scores.logprobs, scores.entropy) if return_entropy else scores.logprobs
