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
from unigrad.serve.hooks import PromptCall
from unigrad.serve.inprocess import serve_service
from unigrad.serve.requests import SamplingRequest
from unigrad.serve.service import ServeService, context_length_of


@dataclass
class TrainingService(ServeService):
    """A `ServeService` that samples as the run trains (module docstring)."""

    run_sampling: SamplingParams = field(default_factory=SamplingParams)

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


@contextlib.contextmanager
def training_endpoint(engine: RolloutEngine, tokenizer, settings, recorder: EpisodeRecorder,
                      sampling: SamplingParams) -> Iterator[str]:
    """The endpoint over `engine` as `settings.model_name` while the block runs; yields its base URL."""
    context = settings.context_length or context_length_of(tokenizer, getattr(engine, "model", None))
    service = TrainingService(engine, tokenizer, settings.model_name, recorder, context_length=context,
                              run_sampling=sampling)
    with serve_service(service) as url:
        yield url
