"""Concurrent requests as few engine calls: requests arriving within `window_s` of each other whose sampling
settings agree (`SamplingKey`) are sampled by ONE `engine.generate` call.

A caller that knows how many requests are coming (a trainer whose agents all call at once) passes `expected`: the
batcher then waits past the window until that many are pending, so that requests sent by many agent threads over
tens of milliseconds still share one call; at most as long as the last engine call took (waiting longer costs more
than a second call would), and at least `max_wait_s`.

Each request's prompts keep their own random streams (`SamplingParams.prompt_seeds`), so a request's samples do not
depend on which others shared its call. The blocking engine call runs in one worker thread (one call at a time);
while it runs, new requests gather and form the next calls.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from unigrad.rollout.base import Rollout, RolloutEngine, SamplingParams, prompt_stream_seeds


@dataclass(frozen=True)
class SamplingKey:
    """The settings one engine call shares: requests agreeing on all of them may be sampled together."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int

    def sampling(self, prompt_seeds: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, prompt_seeds=prompt_seeds)


@dataclass(frozen=True)
class Sample:
    """One sampled completion: its ids (the end token included), the engine's log-prob of each, and whether
    max_new_tokens cut it."""

    token_ids: list[int]
    logprobs: list[float]
    truncated: bool


def request_seeds(seed: int | None, prompts: int) -> tuple[int, ...]:
    """The random streams of a request's prompts: from its seed (the same seed, the same samples), else random."""
    return prompt_stream_seeds(seed if seed is not None else secrets.randbits(62), prompts)


@dataclass
class _Job:
    prompts: list[list[int]]
    key: SamplingKey
    seeds: tuple[int, ...]
    future: asyncio.Future

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.key.n


def plan_calls(jobs: Sequence[_Job], max_rows: int) -> list[list[_Job]]:
    """The engine calls that sample `jobs`: jobs with the same key together, in arrival order, each call at most
    `max_rows` rows (a job bigger than that alone)."""
    by_key: dict[SamplingKey, list[list[_Job]]] = {}
    for job in jobs:
        calls = by_key.setdefault(job.key, [[]])
        if calls[-1] and sum(j.rows for j in calls[-1]) + job.rows > max_rows:
            calls.append([])
        calls[-1].append(job)
    return [call for calls in by_key.values() for call in calls]


def split_samples(rollout: Rollout, prompts: int, n: int) -> list[list[Sample]]:
    """A rollout's rows as `Sample`s, [prompt][sample]."""
    ids, mask = rollout.completion_ids.tolist(), rollout.completion_mask.tolist()
    logprobs, truncated = rollout.infer_logprobs.tolist(), rollout.truncated.tolist()
    rows = []
    for r in range(prompts * n):
        length = sum(mask[r])
        rows.append(Sample(ids[r][:length], logprobs[r][:length], bool(truncated[r])))
    return [rows[p * n:(p + 1) * n] for p in range(prompts)]


@dataclass
class Batcher:
    """Samples requests with `engine`, batching those that arrive together (module docstring). `engine_calls`
    counts the calls made, `call_rows` the rows of each. `expected`: how many requests to wait for (None: the
    window alone decides)."""

    engine: RolloutEngine
    window_s: float = 0.005
    expected: Callable[[], int] | None = None
    max_wait_s: float = 0.05
    last_call_s: float = 0.0  # how long the last engine call took
    max_rows: int = 512
    engine_calls: int = 0
    call_rows: list[int] = field(default_factory=list)
    _pending: list[_Job] = field(default_factory=list)
    _wake: asyncio.Event | None = None
    _task: asyncio.Task | None = None
    _worker: ThreadPoolExecutor | None = None

    async def sample(self, prompts: list[list[int]], key: SamplingKey, seeds: tuple[int, ...]) -> list[list[Sample]]:
        """`key.n` samples of each prompt, [prompt][sample]; raises what the engine raised."""
        self._start()
        job = _Job(prompts, key, seeds, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unigrad-serve-engine")
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop taking jobs; fail the waiting ones; wait for the engine call under way."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending = []
        self._worker.shutdown(wait=True)
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.window_s)  # let the requests sent together arrive
            await self._wait_for_expected()
            jobs, self._pending = self._pending, []
            self._wake.clear()
            for call in plan_calls(jobs, self.max_rows):
                await self._call(call)

    async def _wait_for_expected(self) -> None:
        """Past the window: until `expected()` requests are pending, polled each millisecond, for at most the last
        engine call's time (within [`max_wait_s`, 0.5 s])."""
        if self.expected is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(self.max_wait_s, self.last_call_s), 0.5) - self.window_s
        while len(self._pending) < self.expected() and loop.time() < deadline:
            await asyncio.sleep(0.001)

    async def _call(self, jobs: list[_Job]) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        seeds = tuple(s for job in jobs for s in job.seeds)
        key = jobs[0].key
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            rollout = await loop.run_in_executor(self._worker, self.engine.generate, prompts, key.n,
                                                 key.sampling(seeds))
            self.last_call_s = loop.time() - started
            samples = split_samples(rollout, len(prompts), key.n)
        except Exception as err:  # noqa: BLE001 - every waiting request gets the engine's error
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.engine_calls += 1
        self.call_rows.append(len(prompts) * key.n)
        start = 0
        for job in jobs:
            if not job.future.done():  # a client that went away
                job.future.set_result(samples[start:start + len(job.prompts)])
            start += len(job.prompts)
