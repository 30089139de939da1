"""The rollout engine's research instruments: a controllable train-inference mismatch and the routing record.

- logit noise (`sigma`): the engine samples from softmax((z + sigma * eps) / T), eps ~ N(0, 1) per row, step and
  vocabulary entry, and reports those log-probs; the learner scores the clean logits. Any model.
- router noise (`sigma`): each MoE layer chooses its experts from softmax(z_r + sigma * eps) (z_r the router
  logits); the gating weights stay the softmax of the clean z_r over the chosen experts
  (`unigrad.models.moe_routing`). Mixtral-style MoE models only.
- routing record (on by default for MoE models): the experts each MoE layer chose for every prompt and completion
  token, as `Rollout.routing` (N, P_len + T, layers, top_k) int16, -1 where there is no token (padding) or none
  was computed (the last sampled token is never fed back). The learner replays it (rollout routing replay, arXiv
  2510.11370).

The noise comes from one random stream per prompt, seeded from the prompt's sampling seed, so it is deterministic
given the rollout seed and does not move the sampling streams. With both sigmas 0 the engine samples exactly as
without instruments: recording routes with Mixtral's own arithmetic, bit for bit.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from unigrad.models.moe_routing import (
    NOT_RECORDED,
    RoutingControl,
    controlled_routing,
    require_routers,
    routing_shape,
)

_NOISE_STREAM_SALT = 0x9E3779B97F4A7C15  # separates the noise streams from the sampling streams of the same seed


@dataclass(frozen=True)
class EngineInstruments:
    """The instruments' settings (all off by default)."""

    logit_noise: float = 0.0
    router_noise: float = 0.0
    record_routing: bool | None = None  # None: record on a model with Mixtral-style routers (`resolved`)

    def __post_init__(self) -> None:
        for name in ("logit_noise", "router_noise"):
            value = getattr(self, name)
            if not (value >= 0 and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def touches_routers(self) -> bool:
        return self.router_noise > 0 or bool(self.record_routing)

    def resolved(self, model: nn.Module) -> EngineInstruments:
        """These settings for `model`, `record_routing` decided (None: on iff it has Mixtral-style routers);
        a ValueError if `model` cannot take them (router noise or a record on a dense model)."""
        self.check_model(model)
        if self.record_routing is not None:
            return self
        return dataclasses.replace(self, record_routing=routing_shape(model) is not None)

    @property
    def active(self) -> bool:
        return self.touches_routers or self.logit_noise > 0

    def check_model(self, model: nn.Module) -> None:
        """A ValueError if `model` cannot take these settings (router noise or the record on a dense model)."""
        if self.router_noise > 0:
            require_routers(model, "rollout.router_noise")
        if self.record_routing:
            require_routers(model, "rollout.routing_replay")


@dataclass(frozen=True)
class CallRows:
    """The rows of one `generate` call as its instruments see them: `which[p]` is prompt p's distinct prompt, `mask`
    (D, Lp) the distinct prompts' mask, `row_src` (N,) each row's distinct prompt, rows p*n .. p*n+n-1 belong to
    prompt p, at most `max_new` tokens are generated per row."""

    which: list[int]
    mask: torch.Tensor
    row_src: torch.Tensor
    n: int
    max_new: int


class CallInstruments:
    """One `generate` call's instruments: noise streams (one per prompt, from `seeds`), the routers' control and the
    routing record."""

    def __init__(self, model: nn.Module, settings: EngineInstruments, seeds, rows: CallRows) -> None:
        self.settings, self.n, self.model = settings, rows.n, model
        self.mask, self.row_src, self.which = rows.mask, rows.row_src, rows.which
        mask, row_src, max_new = rows.mask, rows.row_src, rows.max_new
        dev = mask.device
        self.streams = [torch.Generator(device=dev).manual_seed((int(s) ^ _NOISE_STREAM_SALT) % 2**63) for s in seeds]
        self.control = RoutingControl(record=settings.record_routing)
        self.layers = self.experts = 0
        self.routing = None
        if settings.touches_routers:
            self.layers, self.experts, top_k = require_routers(model, "router noise / routing record")
            if settings.record_routing:
                self.routing = torch.full((row_src.shape[0], mask.shape[1] + max_new, self.layers, top_k),
                                          NOT_RECORDED, dtype=torch.int16, device=dev)
        self._stack = ExitStack()

    def __enter__(self) -> CallInstruments:
        if self.settings.touches_routers:
            self._stack.enter_context(controlled_routing(self.model, self.control))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _router_draws(self, stream: torch.Generator, count: int) -> torch.Tensor:
        shape = (count, self.layers, self.experts)
        return torch.randn(shape, generator=stream, device=self.mask.device) * self.settings.router_noise

    def before_prefill(self) -> None:
        """Router noise for the distinct prompts' tokens (drawn from the stream of each one's first prompt)."""
        if self.settings.router_noise <= 0:
            return
        d, prompt_len = self.mask.shape
        noise = torch.zeros(d, prompt_len, self.layers, self.experts, device=self.mask.device)
        done: set[int] = set()
        for p, distinct in enumerate(self.which):
            if distinct not in done:
                done.add(distinct)
                real = int(self.mask[distinct].sum())
                noise[distinct, prompt_len - real:] = self._router_draws(self.streams[p], real)
        self.control.noise = noise.flatten(0, 1)

    def after_prefill(self) -> None:
        if self.routing is not None:
            d, prompt_len = self.mask.shape
            chosen = self.control.take_recorded().view(d, prompt_len, self.layers, -1)
            chosen = chosen.masked_fill(~self.mask.bool()[:, :, None, None], NOT_RECORDED)
            self.routing[:, :prompt_len] = chosen[self.row_src]

    def before_step(self, live: torch.Tensor) -> None:
        """Router noise for generated tokens of every row (drawn for all rows: streams stay aligned), kept for
        the rows still in the decoder's batch (`live`)."""
        if self.settings.router_noise > 0:
            noise = torch.cat([self._router_draws(s, self.n) for s in self.streams])
            self.control.noise = noise[live]

    def after_step(self, live: torch.Tensor, t: int) -> None:
        """Record the choice for generated token t (position Lp + t) of the `live` rows."""
        if self.routing is not None:
            self.routing[live, self.mask.shape[1] + t] = self.control.take_recorded().to(self.routing.dtype)

    def noisy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, V) plus the logit noise of this step (every row draws every step), or `logits`."""
        sigma = self.settings.logit_noise
        if sigma <= 0:
            return logits
        eps = torch.cat([torch.randn(self.n, logits.shape[-1], generator=s, device=logits.device)
                         for s in self.streams])
        return logits.float() + sigma * eps

    def routing_record(self, steps: int) -> torch.Tensor | None:
        """(N, Lp + steps, layers, top_k) the experts chosen, or None without a record."""
        if self.routing is None:
            return None
        return self.routing[:, : self.mask.shape[1] + steps]
