"""What a tool task's greedy held-out episodes do with their tools, per model: calls, failed calls, and calls on
target, for a built-in tool-use task (`countdown_calc`, or `TASK+tools` offered through `tools=`).

A call is *on target* when one of its arguments, submitted as the answer, scores full marks with the task's own
verifier, or its result does: for `countdown_calc`, the calculator checked an expression that reaches the target
with the given numbers; for `arithmetic` with a calculator, the call computed the right number. Episodes are played
by `unigrad.eval.evaluate` (the same held-out episodes, seed and pass@1 as `unigrad eval` and a run's
eval_after.json), with an environment that records every call it runs.

    python examples/environments/tool_call_outcomes.py unigrad-chat runs/countdown_calc/final \
        [--task countdown_calc] [--prompts 200] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from unigrad.environments.tool_use import ToolUseEnvironment, ToolUseTask
from unigrad.eval import evaluate
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.tasks import get_task
from unigrad.tools.calls import parse_tool_calls
from unigrad.tools.running import run_tool_call


@dataclass
class CallRecord:
    episode: int  # index of the environment that ran it, in creation order
    ok: bool  # the tool ran without error
    on_target: bool


class RecordingEnvironment(ToolUseEnvironment):
    """A tool-use episode that also records each call it runs (`CallRecord`) into `log`."""

    def __init__(self, base: ToolUseEnvironment, log: list[CallRecord], played: set[int], episode: int):
        super().__init__(base.task, base.tools, base.style, base.max_turns)
        self.log, self.played, self.episode = log, played, episode

    def step(self, turn: str):
        self.played.add(self.episode)
        result = super().step(turn)
        if result.tool_calls and not result.done:  # the calls were run (a last turn's calls are not)
            for call in parse_tool_calls(turn, self.style, self.tools):
                text, ok = run_tool_call(self.tools, call)
                answers = [str(v) for v in call.arguments.values()] + ([text] if ok else [])
                hit = any(self.task.verify([a], [self.example])[0] >= 1.0 for a in answers)
                self.log.append(CallRecord(self.episode, ok and call.error is None, hit))
        return result


class RecordingTask(ToolUseTask):
    """`task`, whose environments record their calls into `self.log`."""

    def __init__(self, task: ToolUseTask):
        super().__init__(task.task, task.tools, name=task.name, max_turns=task.max_turns,
                         description=getattr(task, "description", ""))
        self.log: list[CallRecord] = []
        self.played: set[int] = set()  # environments that were stepped (others only rendered an opening prompt)
        self.made = 0

    def environment(self, tool_style: str = "plain") -> RecordingEnvironment:
        self.made += 1
        return RecordingEnvironment(super().environment(tool_style), self.log, self.played, self.made - 1)


def outcomes(model_name: str, spec: str, prompts: int, max_new_tokens: int) -> dict[str, float]:
    model, tokenizer = load_model_and_tokenizer(model_name)
    task = get_task(spec)
    if not isinstance(task, ToolUseTask):
        raise SystemExit(f"{spec!r} is not a tool-use task (countdown_calc, or TASK+tools through tools=)")
    recording = RecordingTask(task)
    row = evaluate(model, tokenizer, [recording], prompts, max_new_tokens=max_new_tokens)[task.name]
    episodes = max(1, len(recording.played))
    calls = recording.log
    hits = {c.episode for c in calls if c.on_target}
    return {"pass@1": 100 * row["pass@1"], "episodes": len(recording.played), "calls": len(calls) / episodes,
            "failed calls": sum(not c.ok for c in calls) / episodes,
            "on-target calls": sum(c.on_target for c in calls) / episodes,
            "episodes with an on-target call": 100 * len(hits) / episodes,
            "calls (evaluate's count)": row.get("tool_calls", float("nan")),
            "hit": [float(e in hits) for e in sorted(recording.played)]}  # per held-out episode, in order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model names, model directories or run directories")
    parser.add_argument("--task", default="countdown_calc")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    rows = {m: outcomes(m, args.task, args.prompts, args.max_new_tokens) for m in args.models}
    hits = {m: row.pop("hit") for m, row in rows.items()}
    keys = list(next(iter(rows.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("| --- " * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    first = args.models[0]
    for name in args.models[1:]:  # the same held-out episodes in the same order: a paired difference
        diffs = [b - a for a, b in zip(hits[first], hits[name], strict=True)]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        print(f"episodes with an on-target call, {name} - {first}: {100 * mean:+.1f} points, 95% interval "
              f"{100 * (mean - 1.96 * se):+.1f} to {100 * (mean + 1.96 * se):+.1f} (paired over the held-out episodes)")


if __name__ == "__main__":
    main()
