"""Environments written for the `verifiers` library (its 0.4 stack, `verifiers.v1`) as agent tasks:
`verifiers:PATH.py:FUNCTION[,key=value,...]` (docs/environments.md, "verifiers").

`FUNCTION(**options)` returns a `verifiers.v1.Env` (what `vf.load_environment(config)` returns). Its taskset's tasks
are the examples; each episode is played by verifiers itself: `env.run_episode(task, ctx)` inside `env.serving()`,
its harness program talking to the trainer's endpoint through verifiers' interception server, then the task's
`@vf.reward` functions scoring the trace. The episode's reward is the sum of its traces' weighted rewards; an episode
verifiers marks failed (harness error, timeout) is unscorable.

verifiers 0.4 tasksets have no splits: a fixed share of the tasks (`test_fraction`, by task key) is held out as the
"test" split. The directory of PATH is importable while FUNCTION runs, so a taskset module beside it can be named by
its id. The endpoint knows an episode by its API key: each episode gets an `EvalClientConfig` whose key variable holds
that episode's key for as long as it runs. Importing this module does not import `verifiers` (building a task does).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unigrad.agents.program import DEFAULT_MAX_CALLS, AgentProgram, AgentTask
from unigrad.user_code import load_object

VERIFIERS_PREFIX = "verifiers:"
DEFAULT_TEST_FRACTION = 0.2


def _import_verifiers():
    try:
        import verifiers.v1 as vf
    except ImportError as err:
        raise ValueError("verifiers: tasks of the form 'verifiers:PATH.py:FUNCTION' need the `verifiers` package "
                         f"(pip install 'unigrad[verifiers]'): {err}") from None
    return vf


def parse_verifiers_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"verifiers:env.py:load_environment,n=3" -> ("env.py:load_environment", {"n": 3})."""
    from unigrad.tasks.registry import _options

    if not spec.startswith(VERIFIERS_PREFIX):
        raise ValueError(f"not a verifiers task spec: {spec!r}")
    program, _, text = spec[len(VERIFIERS_PREFIX):].partition(",")
    if program.count(":") < 1 or not program.rpartition(":")[2] or not program.rpartition(":")[0]:
        raise ValueError(f"verifiers task {spec!r}: expected 'verifiers:PATH.py:FUNCTION[,key=value,...]'")
    return program, _options(text, spec)


@contextlib.contextmanager
def _importable(where: str) -> Iterator[None]:
    """`where`'s directory on sys.path while the block runs (a file spec only)."""
    folder = str(Path(where).resolve().parent) if where.endswith(".py") or "/" in where else None
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            sys.path.remove(folder)


def load_verifiers_env(program: str, options: dict[str, Any]):
    """The `Env` that `program` ("PATH.py:FUNCTION") returns for `options`; a ValueError saying what is wrong."""
    vf = _import_verifiers()
    function = load_object(program, "verifiers environment loader", kind="function")
    with _importable(program.rpartition(":")[0]):
        env = function(**options)
    if not isinstance(env, vf.Env):
        raise ValueError(f"verifiers environment {program!r}: {function.__name__} returned a "
                         f"{type(env).__name__}, not a verifiers.v1.Env (build one with vf.load_environment)")
    return env


def held_out(key: str, fraction: float) -> bool:
    """Whether the task with `key` is in the test split (a fixed function of its key)."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def split_rows(tasks: list, fraction: float, name: str) -> dict[str, list[dict[str, Any]]]:
    """The taskset as unigrad example rows by split: "train" and "test" (`fraction` of the tasks, by key)."""
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for index, task in enumerate(tasks):
        split = "test" if held_out(task.key, fraction) else "train"
        rows[split].append({"prompt": task.data.prompt_text, "answer": "", "vf_index": index, "vf_key": task.key})
    for split, found in rows.items():
        if not found:
            raise ValueError(f"verifiers environment {name!r}: its {len(tasks)} task(s) leave the {split!r} split "
                             f"empty at test_fraction={fraction:g}")
    return rows


@contextlib.contextmanager
def key_variable(api_key: str) -> Iterator[str]:
    """A fresh environment variable holding `api_key` while the block runs (verifiers reads keys from variables)."""
    name = f"UNIGRAD_VERIFIERS_KEY_{uuid.uuid4().hex}"
    os.environ[name] = api_key
    try:
        yield name
    finally:
        os.environ.pop(name, None)


def episode_reward(episode) -> tuple[float, dict[str, Any]]:
    """A finished verifiers `Episode` as (reward, info); a RuntimeError where verifiers marked it failed."""
    if not episode.ok:
        errors = list(episode.errors) + [e for t in episode.traces for e in t.errors]
        reason = f"{errors[0].type}: {errors[0].message}" if errors else "not ok"
        raise RuntimeError(f"verifiers episode failed: {reason[:300]}")
    rewards = {name: (None if r is None else r.value) for t in episode.traces for name, r in t.rewards.items()}
    return float(sum(t.reward for t in episode.traces)), {"rewards": rewards, "traces": len(episode.traces)}


class VerifiersEpisodes:
    """The agent program of a verifiers environment: one episode of `env` per call (module docstring)."""

    def __init__(self, env, tasks: list):
        self.env, self.tasks = env, tasks

    async def __call__(self, client, example: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        vf = _import_verifiers()
        task = self.tasks[example["meta"]["vf_index"]]
        with key_variable(client.api_key) as variable:
            config = vf.EvalClientConfig(base_url=str(client.base_url), api_key_var=variable)
            async with self.env.serving():
                episode = await self.env.run_episode(task, vf.ModelContext(model=example["model"], client=config))
        return episode_reward(episode)


def make_verifiers_task(spec: str, max_calls: int = DEFAULT_MAX_CALLS) -> AgentTask:
    """The `AgentTask` a "verifiers:PATH.py:FUNCTION[,key=value,...]" spec names."""
    program, options = parse_verifiers_spec(spec)
    fraction = float(options.pop("test_fraction", DEFAULT_TEST_FRACTION))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"verifiers task {spec!r}: test_fraction must be between 0 and 1, got {fraction:g}")
    env = load_verifiers_env(program, options)
    tasks = list(env.taskset)
    name = env.config.env_id or program.rpartition(":")[2]
    rows = split_rows(tasks, fraction, name)
    episodes = VerifiersEpisodes(env, tasks)

    async def play(client, example: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        return await episodes(client, example)

    def examples(split: str) -> list[dict[str, Any]]:
        if split not in rows:
            raise ValueError(f"verifiers environment {name!r} has no {split!r} split (only train and test)")
        return rows[split]

    agent = AgentTask(AgentProgram(program, play), None, examples, max_calls=max_calls)
    agent.name, agent.description = name, f"verifiers environment {name} ({program})"
    agent.verifiers_env = env
    return agent
