"""A rollout engine in its own process, working ahead of the learner: the engine side of asynchronous training.

`EngineWorker` runs one `TransformersEngine` (or, with `rollout.engine=vllm`, one `VLLMEngine`) in a process of its
own (a `concurrent.futures.ProcessPoolExecutor` of one worker, started with `spawn`), so generation runs while the
learner trains. Jobs run in the order they are submitted: weights sent after a generation was submitted reach the
engine after that generation, so each generation samples with exactly the weights submitted before it. A generation's
result carries what it cost (`busy`) and how long the engine sat idle since the previous generation
(`idle`: waiting for work or weights).

The worker ignores SIGINT (the training process decides what an interrupt does) and ends as soon as the training
process does, even one killed by SIGKILL (a thread waits on the parent's sentinel: nothing else would tell it, since
it holds both ends of its own job queue and would otherwise wait on it forever). A result that does not
arrive within `timeout` seconds, or a worker that died, raises `RolloutWorkerDied` naming what happened: the
training loop never waits forever.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from .base import Rollout, SamplingParams


class RolloutWorkerDied(RuntimeError):
    """The rollout worker process ended, or stopped answering."""


@dataclass
class Generated:
    """A generation's result: the rows, the seconds the engine spent on them, and the seconds it was idle first."""

    rollout: Rollout
    busy: float
    idle: float
    episodes: Any = None  # multi-turn runs: the episodes' rewards and counts (`unigrad.rollout.episodes.Episodes`)


_ENGINE = None  # the worker process's engine
_EPISODES: dict | None = None  # multi-turn runs: what the worker needs to play episodes (see EngineWorker)
_LAST_DONE = 0.0  # when the worker finished its previous job
_IDLE = 0.0  # seconds without a job since the last generation started


def _begin() -> float:
    """A job starts: the gap since the previous one counts as idle."""
    global _IDLE
    now = time.perf_counter()
    _IDLE += now - _LAST_DONE
    return now


def _exit_with_parent() -> None:
    """End this worker process when its parent ends, however it ended (see the module docstring)."""
    import multiprocessing
    import os
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - only ever called in a spawned worker
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass(frozen=True)
class WorkerSetup:
    """What the worker process builds its engine from (sent to it once, when it starts; see `EngineWorker`)."""

    payload: tuple[Any, dict[str, torch.Tensor]]  # (model config, state dict): the engine's copy of the model
    pad_token_id: int
    eos_token_id: Any  # an id, a list of ids, or None
    dtype: torch.dtype | None
    decoder: str  # the TransformersEngine's decoder ("vllm" with `vllm`)
    threads: int
    episodes: dict | None = None  # multi-turn runs: what the worker plays episodes with
    vllm: dict | None = None  # a VLLMEngine's options beyond the model, tokens and dtype: a vLLM engine instead


def _start(setup: WorkerSetup) -> None:
    global _ENGINE, _LAST_DONE, _EPISODES
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    built_from = (setup.payload, setup.pad_token_id, setup.eos_token_id, setup.dtype)
    if setup.vllm is not None:  # vLLM is built here, in the worker, and takes the weights sent here
        from .vllm_engine import VLLMHost

        _ENGINE = VLLMHost(*built_from, setup.threads, setup.vllm)
    else:
        from .ray_pool import EngineHost

        _ENGINE = EngineHost(*built_from, setup.decoder, setup.threads)
    episodes = setup.episodes
    if episodes is not None:  # the tasks are made here again from their specs (user code cannot be pickled over)
        from unigrad.tasks import load_tasks

        _EPISODES = {**episodes, "tasks": load_tasks(episodes["specs"], episodes["reward"], episodes["tools"])}
    _LAST_DONE = time.perf_counter()


def _load_weights(state) -> None:
    global _LAST_DONE
    _begin()
    _ENGINE.load_weights(state)
    _LAST_DONE = time.perf_counter()


def _generate(prompts, n, sampling) -> Generated:
    global _LAST_DONE, _IDLE
    start = _begin()
    idle, _IDLE = _IDLE, 0.0
    rollout = _ENGINE.generate(prompts, n, sampling)
    _LAST_DONE = time.perf_counter()
    return Generated(rollout, _LAST_DONE - start, idle)


def _episodes(prompts, n, sampling, prompt_tasks, examples) -> Generated:
    """Multi-turn episodes of `prompts` (task index and example of each), as the trainer would play them."""
    global _LAST_DONE, _IDLE
    from .base import eos_id_list
    from .episodes import EpisodeBatch, episode_turns, run_episodes

    start = _begin()
    idle, _IDLE = _IDLE, 0.0
    setup = _EPISODES
    tasks, tokenizer = setup["tasks"], setup["tokenizer"]
    environments = []
    for t, example in zip(prompt_tasks, examples, strict=True):
        for _ in range(n):
            env = tasks[t].environment(setup["tool_style"]) if getattr(tasks[t], "multi_turn", False) else None
            if env is not None:
                env.reset(example)
            environments.append(env)
    batch = EpisodeBatch(prompts, environments, n, [episode_turns(tasks[t], setup["max_turns"]) for t in prompt_tasks])
    rollout, episodes = run_episodes(_ENGINE, tokenizer, batch, sampling, eos_id_list(tokenizer.eos_token_id),
                                     setup["context_length"])
    _LAST_DONE = time.perf_counter()
    return Generated(rollout, _LAST_DONE - start, idle, episodes)


def _ping() -> str:
    return _ENGINE.decoder()


class EngineWorker:
    """One `TransformersEngine` (a copy of `model`) in a worker process; see the module docstring. With `vllm` (the
    keyword arguments of `VLLMEngine` beyond the model, tokens and dtype) a `VLLMEngine` instead, built in the
    worker; `decoder` is then "vllm"."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id, *, dtype: torch.dtype | None = None,
                 decoder: str = "auto", threads: int = 1, timeout: float = 600.0,
                 episodes: dict | None = None, vllm: dict | None = None) -> None:
        import multiprocessing

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.timeout = timeout
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start,
                                         initargs=(WorkerSetup((model.config, state), pad_token_id, eos_token_id,
                                                               dtype, decoder, threads, episodes, vllm),))
        try:
            self.decoder = self._wait(self._submit(_ping), "starting")
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        """The worker process's id (None before it started or after it ended)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    def submit_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The engine takes these weights after the jobs submitted before. They are copied first: the arguments
        are pickled later, by the executor's own thread, while the learner may already be changing them."""
        self._submit(_load_weights, {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()})

    def submit_generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Future:
        return self._submit(_generate, prompts, n, sampling)

    def submit_episodes(self, prompts: list[list[int]], n: int, sampling: SamplingParams, prompt_tasks: list[int],
                        examples: list) -> Future:
        """Multi-turn episodes (the worker was made with `episodes`: the tokenizer, task specs, reward, tools, tool
        style, max_turns and context length it plays them with)."""
        return self._submit(_episodes, prompts, n, sampling, prompt_tasks, examples)

    def result(self, future: Future) -> Generated:
        return self._wait(future, "generating")

    def close(self) -> None:
        """Stop the worker process now, even in the middle of a job (a pool's own shutdown would wait for the job,
        and a worker that stopped answering would keep the training process from exiting)."""
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):
            if process.is_alive():
                process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, fn, *args) -> Future:
        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool as err:
            raise RolloutWorkerDied(f"the rollout worker process has died ({err})") from err

    def _wait(self, future: Future, doing: str):
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise RolloutWorkerDied(f"the rollout worker gave no result within {self.timeout:g} s while {doing} "
                                    "(rollout.worker_timeout)") from None
        except BrokenProcessPool as err:
            raise RolloutWorkerDied(f"the rollout worker process died while {doing} ({err}); its last rollouts "
                                    "are lost") from err
