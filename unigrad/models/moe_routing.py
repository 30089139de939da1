"""Mixture-of-experts routing as an instrument: noise on the expert choice, the choice recorded, the choice replayed.

A Mixtral-style router scores the E experts of a layer for each token (logits z = W_r h), keeps the top k of
softmax(z) and weighs their outputs by the softmax of z over those k (the top-k probabilities renormalised). While
`controlled_routing(model, control)` is open, every such router of `model` does this instead:

- choice: the top k of softmax(z + noise) when `control.noise` holds Gaussian draws (already scaled), else of
  softmax(z); the noise moves which experts are chosen, never how they are weighed;
- replay: where `control.replay` holds expert indices (not -1), those experts are used instead of the choice;
- gating: softmax of the clean z over the experts used, so a replaying learner forms the gating weights from its
  own router (and its router gets a gradient through them), as in rollout routing replay (R3, "Stabilizing MoE
  Reinforcement Learning by Aligning Training and Inference Routers", arXiv 2510.11370);
- record: with `control.record`, each layer's own choice (before replay) is kept for the caller.

Tokens are counted as the router sees them: a forward over (B, L) tokens gives rows b * L + l. Outside the context
the routers are untouched (the patched `forward` is an instance attribute, removed on exit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

NOT_RECORDED = -1  # an expert index meaning "no recorded choice: route as the model would"


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The Mixtral-style top-k routers of `model`, one per MoE layer in layer order (empty for a dense model)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    return [m for m in model.modules() if isinstance(m, MixtralTopKRouter)]


def routing_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(layers, experts, top_k) of `model`'s routers, or None for a model without Mixtral-style routers."""
    routers = moe_routers(model)
    if not routers:
        return None
    return len(routers), int(routers[0].num_experts), int(routers[0].top_k)


def require_routers(model: nn.Module, what: str) -> tuple[int, int, int]:
    """`routing_shape(model)`, or a ValueError naming `what` needed it."""
    shape = routing_shape(model)
    if shape is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"{what} needs a mixture-of-experts model with Mixtral-style routers (e.g. "
                         f"unigrad-tiny-moe); this model ({model_type!r}) has none")
    return shape


def choose_experts(logits: torch.Tensor, top_k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """(tokens, top_k) experts of the top-k of softmax(logits + noise), in float32 as Mixtral's router ranks them."""
    scores = logits.float() if noise is None else logits.float() + noise
    return torch.topk(torch.softmax(scores, dim=-1), top_k, dim=-1).indices


def gating_weights(logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(tokens, k) float32 softmax(logits) at `experts`, renormalised to sum to 1 (= the softmax of `logits` over
    `experts`): Mixtral's own gating weights, bit for bit, when `experts` are its top k; the R3 gating weights when
    they are replayed. Differentiable in `logits`."""
    chosen = torch.softmax(logits.float(), dim=-1).gather(-1, experts)
    return chosen / chosen.sum(dim=-1, keepdim=True)


def replace_choice(own: torch.Tensor, replay: torch.Tensor | None) -> torch.Tensor:
    """`replay`'s experts for the tokens it records (no -1 in their row), `own` for the others."""
    if replay is None:
        return own
    recorded = (replay != NOT_RECORDED).all(-1, keepdim=True)
    return torch.where(recorded, replay.to(device=own.device, dtype=own.dtype), own)


@dataclass
class RoutingControl:
    """What the routers do during the next forward pass; set by the caller before each call."""

    noise: torch.Tensor | None = None  # (tokens, layers, experts) added to the logits that choose the experts
    replay: torch.Tensor | None = None  # (tokens, layers, top_k) experts to use; -1 rows: the router's own choice
    record: bool = False  # keep each layer's own choice (before replay) in `recorded`
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (tokens, top_k)

    def take_recorded(self) -> torch.Tensor:
        """(tokens, layers, top_k) own choices of the last forward pass, then forgotten."""
        out = torch.stack([self.recorded[i] for i in sorted(self.recorded)], dim=1)
        self.recorded = {}
        return out


def _controlled_forward(router: nn.Module, layer: int, control: RoutingControl, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, router.hidden_dim)
    logits = F.linear(hidden_states, router.weight)
    noise = control.noise[:, layer] if control.noise is not None else None
    own = choose_experts(logits, router.top_k, noise)
    if control.record:
        control.recorded[layer] = own.detach()
    replay = control.replay[:, layer] if control.replay is not None else None
    experts = replace_choice(own, replay)
    return logits, gating_weights(logits, experts), experts


@contextmanager
def controlled_routing(model: nn.Module, control: RoutingControl) -> Iterator[RoutingControl]:
    """Route every Mixtral-style router of `model` under `control` (see the module docstring) while open."""
    routers = require_routers(model, "controlled routing") and moe_routers(model)
    for layer, router in enumerate(routers):
        router.forward = partial(_controlled_forward, router, layer, control)
    try:
        yield control
    finally:
        for router in routers:
            router.__dict__.pop("forward", None)
