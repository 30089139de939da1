"""Agent episodes: many agent programs at once, each with an `openai` client pointed at the trainer's endpoint, and
the rows the learner trains on built from what they sampled (`unigrad.agents.trajectory`).

The endpoint (`unigrad.serve`) runs in this process for the duration of the batch, over the run's engine; concurrent
calls from the agents are batched into engine calls. A plain agent function runs in a thread of its own, a coroutine
function on one event loop; every episode has `timeout` seconds. What an agent does wrong ends its episode
unscorable (reward NaN, the reason in `Episodes.failures`), never the run: it raised, it ran out of time, it made no
model call, it returned something that is not a reward. A timed-out plain function cannot be stopped; its episode is
closed, so its further calls are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from unigrad.agents.program import AgentTask
from unigrad.agents.recorder import EpisodeRecorder
from unigrad.rollout.base import Rollout, RolloutEngine, SamplingParams
from unigrad.rollout.episodes import Episodes
from unigrad.rollout.padding import pad_rows
from unigrad.tasks.base import Example


@dataclass(frozen=True)
class AgentBatch:
    """The episodes to play: `n` per example, episode p*n + j playing example p (with the agent of `tasks[p]`) from
    random stream `seeds[p]` (sample j)."""

    tasks: list[AgentTask]  # (P,)
    examples: list[Example]  # (P,)
    fallback_prompts: list[list[int]]  # (P,) a row's prompt where its episode made no call (the example's prompt)
    n: int
    seeds: tuple[int, ...]  # (P,)


@dataclass(frozen=True)
class AgentSettings:
    model_name: str  # what the endpoint serves, and the agents are told
    timeout: float  # seconds per episode
    context_length: int | None = None
    max_calls: int | None = None  # a cap on every task's model calls per episode (rollout.max_turns)


@dataclass
class Outcome:
    """What an agent's episode returned: a reward (NaN: none) or why it has none."""

    reward: float = math.nan
    failure: str | None = None


def run_agent_episodes(engine: RolloutEngine, tokenizer, batch: AgentBatch, sampling: SamplingParams,
                       settings: AgentSettings) -> tuple[Rollout, Episodes]:
    """Play `batch` through an endpoint over `engine` sampling with `sampling`; the rows and what they scored."""
    from unigrad.agents.training_service import training_endpoint

    recorder = EpisodeRecorder(tokenizer)
    budgets = [min(t.max_turns, settings.max_calls or t.max_turns) for t in batch.tasks]
    keys = [recorder.open_episode(e, batch.seeds[e // batch.n] + e % batch.n, budgets[e // batch.n])
            for e in range(len(batch.examples) * batch.n)]
    with training_endpoint(engine, tokenizer, settings, recorder, sampling) as url:
        outcomes = asyncio.run(_play_all(batch, keys, url, settings, recorder))
    return episode_rows(tokenizer, batch, [recorder.episodes[k] for k in keys], outcomes)


@dataclass(frozen=True)
class _Playground:
    """What every episode of a batch is played with."""

    batch: AgentBatch
    url: str  # the endpoint's base URL
    settings: AgentSettings
    recorder: EpisodeRecorder
    clients: dict[bool, Any]  # {is_async: a client every episode's own is copied from (sharing its connections)}

    def client(self, is_async: bool, key: str):
        """An `openai` client (async or not) on the endpoint with the episode's API key. Copies of one client share
        its connection pool and cost microseconds; a fresh client costs ~0.1 s, which spread a batch's first calls
        over seconds and kept them out of each other's engine calls."""
        if is_async not in self.clients:
            import openai

            make = openai.AsyncOpenAI if is_async else openai.OpenAI
            self.clients[is_async] = make(base_url=self.url, api_key="unset", max_retries=0,
                                          timeout=self.settings.timeout)
        return self.clients[is_async].with_options(api_key=key)


async def _play_all(batch: AgentBatch, keys: list[str], url: str, settings: AgentSettings,
                    recorder: EpisodeRecorder) -> list[Outcome]:
    ground = _Playground(batch, url, settings, recorder, {})
    for task in {id(t): t for t in batch.tasks}.values():  # every client made before the first episode starts
        ground.client(task.program.is_async, "unset")
    try:
        return list(await asyncio.gather(*(_play(ground, e, key) for e, key in enumerate(keys))))
    finally:
        for is_async, client in ground.clients.items():
            await client.close() if is_async else client.close()


def in_daemon_thread(function, *args) -> asyncio.Future:
    """`function(*args)` in a daemon thread of its own, as a future of the running loop: an agent that never returns
    cannot keep the process alive (a thread pool's workers are joined at exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value=None, error: BaseException | None = None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(value)

    def run() -> None:
        try:
            value, error = function(*args), None
        except BaseException as err:  # noqa: BLE001 - handed to the episode, which ends unscorable
            value, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop is closed: the episode ran out of time long ago
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="unigrad-agent", daemon=True).start()
    return future


async def _play(ground: _Playground, episode: int, key: str) -> Outcome:
    """Episode `episode` (its API key `key`) played by its agent, as an `Outcome`."""
    batch, settings = ground.batch, ground.settings
    task, example = batch.tasks[episode // batch.n], batch.examples[episode // batch.n]
    program, given = task.program, task.example_dict(example, settings.model_name)
    client = ground.client(program.is_async, key)
    try:
        if program.is_async:
            returned = await asyncio.wait_for(program.function(client, given), settings.timeout)
        else:
            returned = await asyncio.wait_for(in_daemon_thread(program.function, client, given), settings.timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return Outcome(failure=f"took longer than rollout.agent_timeout={settings.timeout:g} s")
    except Exception as err:  # noqa: BLE001 - an agent's bug ends its episode, never the run
        return Outcome(failure=f"agent {program.name} raised {type(err).__name__}: {str(err)[:300]}")
    finally:
        ground.recorder.close(key)
    if ground.recorder.episodes[key].trajectory.calls == 0:
        return Outcome(failure=f"agent {program.name} made no model call")
    return reward_of(returned, program.name)


def reward_of(returned: Any, agent: str) -> Outcome:
    """An agent's return value as an `Outcome`: a number, or (number, info dict)."""
    value = returned[0] if isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[1], dict) \
        else returned
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Outcome(failure=f"agent {agent} returned a {type(value).__name__} ({value!r:.40}), not a reward")
    if not math.isfinite(float(value)) or abs(float(value)) > float(torch.finfo(torch.float32).max):
        return Outcome(failure=f"agent {agent} returned {value!r}, not a finite float32 reward")
    return Outcome(float(value))


def episode_rows(tokenizer, batch: AgentBatch, states: list, outcomes: list[Outcome]) -> tuple[Rollout, Episodes]:
    """One row per trajectory segment (an episode that made no call: one empty row at its example's prompt); every
    row of an episode carries the episode's reward, and `Episodes.first_row` points each row at its episode's first."""
    prompts, ids, observed, logps, cut, groups, first_row, episode_of = [], [], [], [], [], [], [], []
    for e, state in enumerate(states):
        segments = state.trajectory.rows()
        start = len(prompts)
        if not segments:
            prompts.append(batch.fallback_prompts[e // batch.n])
            ids.append([]), observed.append([]), logps.append([]), cut.append(False)
        for s in segments:
            prompts.append(s.prompt), ids.append(s.ids), observed.append(s.observed), logps.append(s.logps)
            cut.append(s.truncated)
        rows = len(prompts) - start
        groups += [e // batch.n] * rows
        first_row += [start] * rows
        episode_of += [e] * rows
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = pad_rows(prompts, "left", pad)
    width = max(1, max(len(x) for x in ids))
    completion_ids, context = pad_rows(ids, "right", pad, width=width)
    obs_mask = pad_rows(observed, "right", False, width=width, dtype=torch.bool)[0]
    infer = pad_rows(logps, "right", 0.0, width=width, dtype=torch.float32)[0]
    truncated = torch.tensor(cut, dtype=torch.bool)
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, context & ~obs_mask, infer,
                      torch.tensor(groups, dtype=torch.long), truncated, observation_mask=obs_mask)
    return rollout, _episodes(states, outcomes, episode_of, first_row)


def _episodes(states: list, outcomes: list[Outcome], episode_of: list[int], first_row: list[int]) -> Episodes:
    def per_row(values: list) -> torch.Tensor:
        return torch.tensor([values[e] for e in episode_of])

    failures = {r: outcomes[e].failure for r, e in enumerate(episode_of)
                if outcomes[e].failure is not None and first_row[r] == r}
    return Episodes(rewards=per_row([o.reward for o in outcomes]).float(),
                    turns=per_row([s.trajectory.calls for s in states]).long(),
                    tool_calls=per_row([s.tool_calls for s in states]).long(),
                    tool_errors=torch.zeros(len(episode_of), dtype=torch.long), failures=failures,
                    first_row=torch.tensor(first_row, dtype=torch.long),
                    splits=sum(s.trajectory.splits for s in states))
