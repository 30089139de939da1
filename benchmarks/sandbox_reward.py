"""The code task's reward with the jail against without it: `CodeTask.verify` on the same completions, in one run.

24 completions of the built-in code task (every third one wrong), about the code share of a default step
(16 prompts x 8 samples over five tasks, identical programs run once). Three ways, alternating round by round so
that machine drift hits all alike; all must give the same scores:
- jail: the default (`sandbox.jail=bwrap`): each program in a sub-jail forked from the jailed server;
- fork server: the unjailed fork server (`sandbox.jail=none`), the code task's path before the jail;
- interpreter per program: unjailed, a fresh `python -I -S -B` per program.

    python benchmarks/sandbox_reward.py [--rounds 15] [--completions 24]

Prints the median time of each and, last, `jail_ratio=<jail median / fork-server median>` (the bound is 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import time

from unigrad.sandbox import runner as sandbox  # its module: `run` is replaced there, where `run_many` looks it up
from unigrad.tasks import get_task

MODES = {"jail": {"jail": "bwrap"}, "fork server": {"jail": "none", "allow_root_without_jail": True},
         "interpreter per program": {"jail": "none", "allow_root_without_jail": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--completions", type=int, default=24)
    args = parser.parse_args()
    task = get_task("code")
    examples = task.examples("train", args.completions, seed=1)
    completions = [ex.answer if i % 3 else ex.answer + "+1" for i, ex in enumerate(examples)]
    expected = [0.0 if i % 3 == 0 else 1.0 for i in range(len(examples))]
    original_run = sandbox.run
    times: dict[str, list[float]] = {mode: [] for mode in MODES}

    def use(mode: str) -> None:
        sandbox.configure(**MODES[mode])
        fresh = mode == "interpreter per program"
        sandbox.run = (lambda code, limits=sandbox.DEFAULT_LIMITS, **kw: original_run(code, limits, fork_server=False,
                                                                                       **kw)) if fresh else original_run

    try:
        for mode in MODES:  # start each server outside the timing
            use(mode)
            task.verify(completions[:1], examples[:1])
        for _ in range(args.rounds):
            for mode in MODES:
                use(mode)
                start = time.perf_counter()
                scores = task.verify(completions, examples)
                times[mode].append(time.perf_counter() - start)
                if scores != expected:
                    raise SystemExit(f"scores differ from the expected ones ({mode}): {scores}")
    finally:
        sandbox.run = original_run
        sandbox.configure()
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    print(f"verify() on {len(examples)} code completions, medians of {args.rounds} alternating rounds")
    for mode, median in medians.items():
        print(f"{mode + ':':25}{median:.4f} s")
    print(f"jail_ratio={medians['jail'] / medians['fork server']:.3f}")


if __name__ == "__main__":
    main()
