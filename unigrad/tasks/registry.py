"""Task specs, as a user types them, to Task objects.

    arithmetic | countdown | word_problems | code | table_qa    built-in synthetic tasks
    countdown_calc | guess | code_retry                          built-in multi-turn tasks (unigrad.environments)
    env:PATH.py:NAME | env:module:NAME                           a multi-turn task of yours (docs/environments.md)
    arithmetic:difficulty=3                                      ... with constructor options
    math:PATH | math:PATH,key=value,...                          a math dataset (math_task.py)
    reasoning_gym:DATASET | reasoning_gym:DATASET,key=value,...  a Reasoning Gym dataset (reasoning_gym_task.py)
    jsonl:PATH | parquet:PATH | PATH.jsonl | PATH.parquet        user tasks (files.py), one per `task`
    ...#NAME                                                     one task of a multi-task file
    agent:PATH.py:FUNCTION@SPEC | agent:PATH.py:FUNCTION          an agent program playing a task (docs/agents.md)
    verifiers:PATH.py:FUNCTION[,key=value,...]                   an environment written for verifiers 0.4
    PATH.jsonl,validation_fraction=0.1                           file and math tasks take options after a comma

`reward=` ("module:function", "file.py:function" or a callable) replaces the verifier with a
TRL-style reward function (reward_fn.py). Keyword options go to the task's constructor.

This module knows the single-turn tasks only: the multi-turn ones are built on it (unigrad.environments, a layer
above), so they register themselves here: unigrad.environments.builtin calls `register_multi_turn_task` for each
built-in multi-turn task and `register_tool_offering` for the wrapper that offers tools to a single-turn task;
unigrad.agents registers the "agent:" and "verifiers:" forms with `register_spec_kind`.
The package root (unigrad/__init__.py) imports unigrad.environments, so whatever part of unigrad is imported first,
the catalogue is complete before `get_task` can be called.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unigrad.tasks.arithmetic import ArithmeticTask
from unigrad.tasks.base import Task, is_multi_turn
from unigrad.tasks.code_task import CodeTask
from unigrad.tasks.countdown import CountdownTask
from unigrad.tasks.files import load_file_tasks
from unigrad.tasks.math_task import MathTask
from unigrad.tasks.reasoning_gym_task import ReasoningGymTask  # imports reasoning_gym only when one is made
from unigrad.tasks.reward_fn import RewardFunc, RewardFunctionTask, load_reward_function
from unigrad.tasks.table_qa import TableQATask
from unigrad.tasks.word_problems import WordProblemsTask

BUILTIN_TASKS: dict[str, type] = {
    t.name: t for t in (ArithmeticTask, CountdownTask, WordProblemsTask, CodeTask, TableQATask)
}
# Multi-turn tasks by name, each made from keyword options (difficulty, max_turns); filled by unigrad.environments.
MULTI_TURN_TASKS: dict[str, Callable[..., Task]] = {}
# How a single-turn task is offered tools (a tool-use episode ending in an answer it scores); set by
# unigrad.environments: (task, tool specs) -> a multi-turn task.
_TOOL_OFFERING: list[Callable[[Task, tuple[str, ...]], Task]] = []
# Spec forms "KIND:REST" made by a layer above this one: KIND -> (spec, options) -> the task.
SPEC_KINDS: dict[str, Callable[..., Task]] = {}


def register_multi_turn_task(name: str, make: Callable[..., Task]) -> None:
    """Name a multi-turn task: `get_task(name)` calls `make(**options)`."""
    if name in BUILTIN_TASKS or MULTI_TURN_TASKS.get(name, make) is not make:
        raise ValueError(f"task name {name!r} is taken")
    MULTI_TURN_TASKS[name] = make


def register_spec_kind(kind: str, make: Callable[..., Task]) -> None:
    """Name a spec form "KIND:...": `get_task("KIND:...", **options)` calls `make(spec, **options)`."""
    if SPEC_KINDS.get(kind, make) is not make:
        raise ValueError(f"task spec kind {kind!r} is taken")
    SPEC_KINDS[kind] = make


def register_tool_offering(offer: Callable[[Task, tuple[str, ...]], Task]) -> None:
    """Set how `load_tasks(..., tools=...)` turns a single-turn task into one that offers tools."""
    _TOOL_OFFERING[:] = [offer]


DEFAULT_MIXTURE = ["arithmetic", "countdown", "word_problems", "code", "table_qa"]
SPEC_FORMS = ["math:PATH", "reasoning_gym:DATASET[,key=value,...]", "env:PATH.py:NAME", "jsonl:PATH", "parquet:PATH",
              "PATH.jsonl", "PATH.parquet", "<file spec>#TASK", "agent:PATH.py:FUNCTION[@TASK]",
              "verifiers:PATH.py:FUNCTION[,key=value,...]"]


def list_tasks() -> list[str]:
    """The built-in task names, single-turn then multi-turn (other tasks are named by the forms in `SPEC_FORMS`)."""
    return [*BUILTIN_TASKS, *MULTI_TURN_TASKS]


def builtin_task_calls_tools(spec: str) -> bool:
    """Whether `spec` names a built-in multi-turn task whose episodes offer tools (`countdown_calc`); False for
    every other spec (user tasks and files are not opened here)."""
    name = spec.partition(":")[0]
    return name in MULTI_TURN_TASKS and bool(getattr(MULTI_TURN_TASKS[name](), "tools", ()))


def task_listing() -> list[dict[str, str]]:
    """One row per built-in task: name, "single-turn" or "multi-turn", its tools and a one-line description."""
    rows = []
    for name in list_tasks():
        task = get_task(name)
        rows.append({"name": name, "turns": "multi-turn" if is_multi_turn(task) else "single-turn",
                     "tools": ", ".join(getattr(task, "tools", ())) or "-",
                     "description": getattr(task, "description", "")})
    return rows


def _user_environment(spec: str, **options: Any) -> Task:
    """A multi-turn task of the user's ("path/to/file.py:NAME" or "module:NAME"): an object with `environment`,
    `examples`, `name`, `max_turns` and `multi_turn = True`, or a class or function that makes one (called with
    `options`)."""
    import inspect

    from unigrad.user_code import load_object

    obj = load_object(spec, "multi-turn task", kind="task")
    task = obj(**options) if inspect.isclass(obj) or inspect.isfunction(obj) else obj
    missing = [a for a in ("name", "max_turns", "examples", "environment", "tool_schemas") if not hasattr(task, a)]
    if missing or not is_multi_turn(task):
        raise ValueError(f"multi-turn task {spec!r}: {type(task).__name__} lacks "
                         f"{', '.join(missing) or 'multi_turn = True'} (docs/environments.md: the protocol)")
    return task


def load_tasks(specs: list[str], reward: RewardFunc | str | None = None, tools: list[str] | None = None) -> list[Task]:
    """Every task of `specs`; with `tools`, each single-turn task becomes a tool-use task offering them (an
    episode of tool calls ending in an answer its verifier scores; named "<task>+tools"). Multi-turn tasks keep
    their own tools."""
    tasks = [task for spec in specs for task in get_tasks(spec, reward=reward)]
    if not tools:
        return tasks
    if not _TOOL_OFFERING:
        raise RuntimeError("no tool offering is registered (unigrad.environments registers it on import)")
    offer = _TOOL_OFFERING[0]
    return [task if is_multi_turn(task) else offer(task, tuple(tools)) for task in tasks]


def _options(text: str, spec: str) -> dict[str, Any]:
    """"difficulty=3,n_tests=4" -> {"difficulty": 3, "n_tests": 4} (Python literals, else strings)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"task spec {spec!r}: expected key=value options, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def _path_options(path: str, spec: str) -> tuple[str, dict[str, Any]]:
    """"data.jsonl,validation_fraction=0.1" -> ("data.jsonl", {"validation_fraction": 0.1}); a path that exists
    as written (even with a comma in it) has no options."""
    if "," not in path or Path(path).exists():
        return path, {}
    path, _, text = path.partition(",")
    return path, _options(text, spec)


def get_tasks(spec: str, *, reward: RewardFunc | str | None = None, **options: Any) -> list[Task]:
    """All tasks a spec names (several for a multi-task file)."""
    try:
        return _get_tasks(spec, reward, options)
    except TypeError as err:  # an option the task does not take: a mistake in the spec, said as one
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise
        raise ValueError(f"task spec {spec!r}: unknown option {unknown.group(1)!r}") from None


def _get_tasks(spec: str, reward: RewardFunc | str | None, options: dict[str, Any]) -> list[Task]:
    kind, sep, rest = spec.partition(":")
    if sep and kind in SPEC_KINDS:
        if reward is not None:
            raise ValueError(f"task {spec!r} scores its own episodes: a reward function cannot replace its verifier")
        return [SPEC_KINDS[kind](spec, **options)]
    file_kind = bool(sep) and kind in ("jsonl", "parquet", "json")
    path = rest if file_kind else spec
    is_file = file_kind or any(ext in path.lower() for ext in (".jsonl", ".parquet", ".json"))
    if sep and kind == "math":
        rest, spec_options = _path_options(rest, spec)
        options = {**spec_options, **options}
    elif is_file and kind not in BUILTIN_TASKS and kind not in ("env", "reasoning_gym"):
        path, spec_options = _path_options(path, spec)
        options = {**spec_options, **options}
    wanted = ""
    if "#" in path and not Path(path).exists():
        path, _, wanted = path.rpartition("#")
    if kind in BUILTIN_TASKS:
        tasks = [BUILTIN_TASKS[kind](**{**_options(rest, spec), **options})]
    elif sep and kind == "env":
        tasks = [_user_environment(rest, **options)]
    elif kind in MULTI_TURN_TASKS:
        if reward is not None:
            raise ValueError(f"task {kind!r} is multi-turn: its environment rewards the episodes, so a reward "
                             "function cannot replace its verifier")
        tasks = [MULTI_TURN_TASKS[kind](**{**_options(rest, spec), **options})]
    elif sep and kind == "math":
        tasks = [MathTask(rest, **options)]
    elif sep and kind == "reasoning_gym":
        dataset, _, dataset_options = rest.partition(",")
        tasks = [ReasoningGymTask(dataset.strip(), **{**_options(dataset_options, spec), **options})]
    elif file_kind or path.lower().endswith((".jsonl", ".parquet", ".json")):
        tasks = load_file_tasks(path, **options)
        if wanted:
            if wanted not in [t.name for t in tasks]:
                raise ValueError(f"{path} has no task {wanted!r}; it holds: {', '.join(t.name for t in tasks)}")
            tasks = [t for t in tasks if t.name == wanted]
    else:
        # A YAML list on the command line splits "reasoning_gym:x,k=v" at its comma: say so.
        hint = " (an option cut off a task spec? quote specs with commas in a list)" if "=" in kind else ""
        raise ValueError(f"unknown task {spec!r}{hint}; built-in tasks: {', '.join(list_tasks())}; "
                         f"or one of: {', '.join(SPEC_FORMS)}")
    if reward is None:
        return tasks
    label = reward if isinstance(reward, str) else None
    func = load_reward_function(reward) if isinstance(reward, str) else reward  # load a file once, not per task
    return [RewardFunctionTask(func, t, label=label) for t in tasks]


def get_task(spec: str, *, reward: RewardFunc | str | None = None, **options: Any) -> Task:
    """The one task a spec names; for a file holding several tasks, pick one with "#NAME"."""
    tasks = get_tasks(spec, reward=reward, **options)
    if len(tasks) != 1:
        raise ValueError(f"{spec!r} holds {len(tasks)} tasks ({', '.join(t.name for t in tasks)}); "
                         f"name one as '{spec}#NAME' or use get_tasks")
    return tasks[0]
