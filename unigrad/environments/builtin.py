"""The built-in multi-turn tasks, registered into the task catalogue (unigrad.tasks.registry) by name.

The catalogue sits in the tasks layer, below these environments, so it cannot import them: they register
themselves when unigrad.environments is imported (the package root imports it, so `unigrad.tasks.get_task("guess")`
works whatever was imported first). Also registered: how a single-turn task is offered tools (`ToolUseTask`, for
`load_tasks(..., tools=...)`).
"""

from __future__ import annotations

from unigrad.environments.code_retry import CodeRetryTask
from unigrad.environments.guess import GuessTask
from unigrad.environments.tool_use import ToolUseTask, countdown_with_calculator
from unigrad.tasks.registry import register_multi_turn_task, register_tool_offering

# name -> what makes the task from keyword options (difficulty, max_turns); listed in this order by `unigrad tasks`
BUILTIN_MULTI_TURN_TASKS = {"countdown_calc": countdown_with_calculator, "guess": GuessTask,
                            "code_retry": CodeRetryTask}


def register_builtin_tasks() -> None:
    """Put the built-in multi-turn tasks and the tool offering into the task catalogue (idempotent)."""
    for name, make in BUILTIN_MULTI_TURN_TASKS.items():
        register_multi_turn_task(name, make)
    register_tool_offering(ToolUseTask)


register_builtin_tasks()
