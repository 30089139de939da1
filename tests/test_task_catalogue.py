"""The task catalogue (unigrad.tasks.registry) sits below the multi-turn tasks it names: unigrad.environments
registers them into it, and the package root imports unigrad.environments, so the catalogue is complete however
unigrad is first imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unigrad.environments.builtin import BUILTIN_MULTI_TURN_TASKS
from unigrad.environments.tool_use import ToolUseTask
from unigrad.tasks import registry


@pytest.mark.parametrize("first_import", ["from unigrad.tasks import get_task, list_tasks, load_tasks",
                                          "from unigrad.tasks.registry import get_task, list_tasks, load_tasks",
                                          "import unigrad.objective; from unigrad.tasks import get_task, list_tasks, "
                                          "load_tasks"])
def test_a_fresh_interpreter_finds_the_multi_turn_tasks_whatever_it_imports_first(first_import):
    script = (f"{first_import}\n"
              "print(list_tasks()[5:], type(get_task('guess', max_turns=2)).__name__, "
              "load_tasks(['arithmetic'], tools=['calculator'])[0].name)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "['countdown_calc', 'guess', 'code_retry'] GuessTask arithmetic+tools"


def test_the_builtin_multi_turn_tasks_are_registered_in_order_and_offer_tools():
    assert registry.list_tasks()[-3:] == ["countdown_calc", "guess", "code_retry"] == list(BUILTIN_MULTI_TURN_TASKS)
    assert all(registry.MULTI_TURN_TASKS[name] is make for name, make in BUILTIN_MULTI_TURN_TASKS.items())
    assert isinstance(registry.load_tasks(["countdown"], tools=["calculator"])[0], ToolUseTask)


def test_a_taken_name_is_refused_and_registering_the_same_maker_again_is_harmless():
    with pytest.raises(ValueError, match="'arithmetic' is taken"):
        registry.register_multi_turn_task("arithmetic", BUILTIN_MULTI_TURN_TASKS["guess"])
    with pytest.raises(ValueError, match="'guess' is taken"):
        registry.register_multi_turn_task("guess", BUILTIN_MULTI_TURN_TASKS["code_retry"])
    registry.register_multi_turn_task("guess", BUILTIN_MULTI_TURN_TASKS["guess"])
    assert registry.list_tasks().count("guess") == 1
