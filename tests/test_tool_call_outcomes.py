"""examples/environments/tool_call_outcomes.py: which calls of a tool episode count as on target (checked with the
task's own verifier), and that only the episodes actually played are counted."""

import importlib.util
import json
import sys
from pathlib import Path

from unigrad.tasks import get_task

PATH = Path(__file__).resolve().parents[1] / "examples" / "environments" / "tool_call_outcomes.py"


def load():
    spec = importlib.util.spec_from_file_location("tool_call_outcomes", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def call(expression: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + \
        "\n</tool_call>"


def test_a_call_is_on_target_when_its_expression_solves_the_example():
    outcomes = load()
    recording = outcomes.RecordingTask(get_task("countdown_calc"))
    (example,) = recording.examples("test", 1, 0)  # use 5 7 7 to make 49
    assert example.meta == {"numbers": [5, 7, 7], "target": 49}
    played = recording.environment("hf")
    recording.environment("hf")  # made for an opening prompt only, never stepped: not an episode
    played.reset(example)
    assert not played.step(call("5+7")).done  # runs, 12: not the target
    assert not played.step(call("7*7") + call("7*5*")).done  # 49 with the given numbers; the second fails
    assert played.step("7*7").reward == 1.0
    log = recording.log
    assert [(c.ok, c.on_target) for c in log] == [(True, False), (True, True), (False, False)]
    assert recording.played == {0} and recording.made == 2
