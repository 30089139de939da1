"""The endpoint while agents play a batch of episodes: the server of `unigrad.serve` over the run's engine, its calls
recorded by an `EpisodeRecorder`, and sampled as the run trains: the run's temperature, top-p and top-k whatever the
agent asked (the learner's ratios are against that distribution), at most the run's `max_new_tokens` per call, one
choice per call, and each call's random stream from its episode's (the same agents, the same samples)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from unigrad.agents.recorder import EpisodeRecorder
from unigrad.rollout.base import RolloutEngine, SamplingParams
from unigrad.serve.batcher import SamplingKey
from unigrad.serve.errors import ApiError
from unigrad.serve.hooks import PromptCall, RefusedCall
from unigrad.serve.inprocess import serve_service
from unigrad.serve.requests import SamplingRequest
from unigrad.serve.service import ServeService, context_length_of


@dataclass
class TrainingService(ServeService):
    """A `ServeService` that samples as the run trains (module docstring)."""

    run_sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.batcher.expected = self.waiting_calls  # the agents call together: one engine call for all of them

    def waiting_calls(self) -> int:
        """The calls the running episodes may make next (0 between batches)."""
        waiting = getattr(self.hook, "waiting_calls", None)
        return waiting() if waiting is not None else 0

    def sampling(self, request: SamplingRequest, calls: list[PromptCall],
                 prompts: list[list[int]]) -> tuple[SamplingKey, tuple[int, ...]]:
        if request.n != 1:
            raise ApiError(400, f"an agent episode is one trajectory: ask for n=1, not {request.n}",
                           "invalid_request_error", "n")
        room = self.context_length - max(len(p) for p in prompts)
        asked = request.requested_tokens()
        budget = min(self.run_sampling.max_new_tokens, room, asked if asked is not None else room)
        run = self.run_sampling
        key = SamplingKey(1, run.temperature, run.top_p, max(run.top_k, 0), budget)
        seeds = tuple(self.hook.seed_for(call.api_key) or 0 for call in calls)
        return key, seeds


class _BetweenBatches:
    """The hook of a kept endpoint while no batch is played: every call is refused."""

    def prompt_ids(self, call: PromptCall) -> list[int]:
        raise RefusedCall("no agent episode is running (this endpoint serves a trainer's episodes only)")

    def completed(self, call) -> None:
        raise RefusedCall("no agent episode is running")

    def seed_for(self, key: str | None) -> int | None:
        return None


@dataclass
class _KeptEndpoint:
    """An endpoint left running between batches over the same engine (starting and stopping one costs ~0.2 s)."""

    engine: RolloutEngine
    tokenizer: object
    service: TrainingService
    url: str
    stack: contextlib.ExitStack


_KEPT: list[_KeptEndpoint] = []  # at most one: the endpoint over the engine of the last batch


def _endpoint_for(engine: RolloutEngine, tokenizer, context: int) -> _KeptEndpoint:
    """The kept endpoint over `engine`, started (and any other one stopped) when there is none."""
    kept = _KEPT[0] if _KEPT else None
    if kept is not None and kept.engine is engine and kept.tokenizer is tokenizer \
            and kept.service.context_length == context:
        return kept
    close_kept_endpoint()
    service = TrainingService(engine, tokenizer, "unset", _BetweenBatches(), context_length=context)
    stack = contextlib.ExitStack()
    url = stack.enter_context(serve_service(service))
    _KEPT.append(_KeptEndpoint(engine, tokenizer, service, url, stack))
    return _KEPT[0]


def close_kept_endpoint() -> None:
    """Stop the endpoint kept between batches, if any (at exit its daemon thread simply ends)."""
    while _KEPT:
        _KEPT.pop().stack.close()


@contextlib.contextmanager
def training_endpoint(engine: RolloutEngine, tokenizer, settings, recorder: EpisodeRecorder,
                      sampling: SamplingParams) -> Iterator[str]:
    """The endpoint over `engine` as `settings.model_name`, recording into `recorder`, while the block runs; yields
    its base URL. The server is kept running afterwards for the next batch over the same engine, refusing every call
    in between."""
    context = settings.context_length or context_length_of(tokenizer, getattr(engine, "model", None))
    kept = _endpoint_for(engine, tokenizer, context)
    service = kept.service
    service.model_name, service.hook, service.run_sampling = settings.model_name, recorder, sampling
    try:
        yield kept.url
    finally:
        service.hook = _BetweenBatches()
