"""Asynchronous rollouts with bounded staleness (`rollout.max_staleness = k >= 1`).

The rollout engine runs in a worker process (`unigrad.rollout.async_worker`) and works up to k rollout steps ahead
of the learner. Versions count rollout steps: the weights after step s are version s, and step s's batch is
on-policy (synchronous training) when it was sampled by version s - 1. Here:

    start:             submit steps 1 .. 1 + k, all sampled by version 0
    after step s:      send the weights of version s, then submit step s + 1 + k
    step s takes:      the batch submitted for it, sampled by version max(0, s - 1 - k)

so a step's rows are at most k versions stale (`staleness = s - 1 - version`), and exactly k once the pipeline is
full. The worker runs its jobs in order, so every generation samples with the weights sent before it: the run is
as deterministic as a synchronous one, whatever the timing. A batch older than k (possible only if the pipeline
were refilled out of order) is regenerated, never trained on, and counted (`staleness/regenerated`).

Rollouts in flight at a checkpoint are waited for and saved with it (prompts, rows, versions), and batches are
submitted whatever `max_steps` says (the k + 1 past the last step are generated and kept for a continuation), so
`--resume` (after a crash, a kill or raising max_steps) continues exactly as the uninterrupted run would have:
nothing trained is lost, and the rollouts generated after the last checkpoint are generated again, identically.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from unigrad.rollout.async_worker import EngineWorker, Generated
from unigrad.rollout.base import Rollout
from unigrad.rollout.episodes import Episodes


def thread_split(threads: int, engine_threads: int, cores: int) -> tuple[int, int]:
    """(learner threads, engine worker threads) on `cores` cores: the engine takes `engine_threads` (0 = half the
    cores, at least 1), the learner `threads` (0 = the rest, at least 1). On 2 cores: one each."""
    engine = engine_threads or max(1, cores // 2)
    return threads or max(1, cores - engine), engine


@dataclass
class Pending:
    """A batch the engine was asked for: the step it is for, the weights version that samples it, its prompts."""

    step: int
    version: int
    picks: list[tuple[int, int]]
    job: Any = None  # a Future while in flight, then the `Generated` result


@dataclass
class RolloutPipeline:
    """The learner's side of asynchronous rollouts; see the module docstring. `make_worker()` builds the engine
    worker from the learner's current weights when the pipeline starts."""

    ctx: Any  # the run's StepContext
    max_staleness: int
    make_worker: Any
    pending: dict[int, Pending] = field(default_factory=dict)
    worker: EngineWorker | None = None
    version: int = 0  # the newest weights sent to the worker
    regenerated: int = 0

    def start(self, step: int) -> None:
        """Start the worker with the learner's weights (version `step`) and submit what steps step + 1 .. step + 1
        + k still lack (a resumed run brings the rest from its checkpoint)."""
        self.worker = self.make_worker()
        self.version = step
        for s in range(step + 1, step + 2 + self.max_staleness):
            if s not in self.pending:
                self._submit(s)

    def take(self, step: int) -> tuple[Pending, float]:
        """Step `step`'s batch (waiting for it) and the seconds the learner waited."""
        t0 = time.perf_counter()
        job = self.pending.pop(step)
        if step - 1 - job.version > self.max_staleness:  # never trained on: sampled again by the newest weights
            self.regenerated += 1
            job = Pending(step, self.version, job.picks, self._generate(step, job.picks))
        if not isinstance(job.job, Generated):
            job.job = self.worker.result(job.job)
        return job, time.perf_counter() - t0

    def after_update(self, step: int) -> None:
        """The learner finished step `step`: the worker gets its weights, then the batch of step + 1 + k."""
        self.worker.submit_weights(self.ctx.learner.full_state_dict())
        self.version = step
        self._submit(step + 1 + self.max_staleness)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def state_dict(self) -> dict[str, Any]:
        """The batches in flight, waited for: they are part of the run's state at a checkpoint."""
        for job in self.pending.values():
            if not isinstance(job.job, Generated):
                job.job = self.worker.result(job.job)
        return {"pending": [{"step": j.step, "version": j.version, "picks": j.picks, "busy": j.job.busy,
                             "rollout": {k: getattr(j.job.rollout, k) for k in Rollout.__dataclass_fields__},
                             "episodes": dataclasses.asdict(j.job.episodes) if j.job.episodes is not None else None}
                            for j in self.pending.values()], "regenerated": self.regenerated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = {j["step"]: Pending(j["step"], j["version"], [tuple(p) for p in j["picks"]],
                                           Generated(Rollout(**j["rollout"]), j["busy"], 0.0,
                                                     Episodes(**j["episodes"]) if j.get("episodes") else None))
                        for j in state["pending"]}
        self.regenerated = state.get("regenerated", 0)

    def _submit(self, step: int) -> None:
        picks = self.ctx.sampler.sample(self.ctx.prompts_per_step)
        self.pending[step] = Pending(step, self.version, picks, self._generate(step, picks))

    def _generate(self, step: int, picks: list[tuple[int, int]]):
        from unigrad.train.producing.produce import generation_request

        prompts, n, sampling = generation_request(self.ctx, step, picks, stream_offset=0)
        if self.ctx.multi_turn:  # the worker plays the episodes, environments included
            return self.worker.submit_episodes(prompts, n, sampling, [t for t, _ in picks],
                                               [self.ctx.pools[t][i] for t, i in picks])
        return self.worker.submit_generate(prompts, n, sampling)
