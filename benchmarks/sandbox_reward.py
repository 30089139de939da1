"""The code task's reward: `CodeTask.verify` with each program forked from the sandbox's fork server against a new
interpreter per program, in one run.

24 completions of the built-in code task (every third one wrong), about the code share of a default step
(16 prompts x 8 samples over five tasks, identical programs run once). The two modes alternate round by round, so
machine drift hits both alike; both must give the same scores.

    python benchmarks/sandbox_reward.py [--rounds 15] [--completions 24]

Prints the median time of each and, last, `fork_server_ratio=<fork server median / interpreter median>`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

from unigrad.tasks import code_task, get_task, sandbox


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--completions", type=int, default=24)
    args = parser.parse_args()
    task = get_task("code")
    examples = task.examples("train", args.completions, seed=1)
    completions = [ex.answer if i % 3 else ex.answer + "+1" for i, ex in enumerate(examples)]
    expected = [0.0 if i % 3 == 0 else 1.0 for i in range(len(examples))]
    original = sandbox.run_many
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        task.verify(completions[:1], examples[:1])  # start the fork server outside the timing
        for _ in range(args.rounds):
            for forked in (True, False):
                code_task.run_many = functools.partial(original, fork_server=forked)
                start = time.perf_counter()
                scores = task.verify(completions, examples)
                times[forked].append(time.perf_counter() - start)
                if scores != expected:
                    raise SystemExit(f"scores differ from the expected ones (fork_server={forked}): {scores}")
    finally:
        code_task.run_many = original
    forked, fresh = statistics.median(times[True]), statistics.median(times[False])
    print(f"verify() on {len(examples)} code completions, medians of {args.rounds} alternating rounds")
    print(f"fork server:             {forked:.4f} s")
    print(f"interpreter per program: {fresh:.4f} s")
    print(f"fork_server_ratio={forked / fresh:.3f}")


if __name__ == "__main__":
    main()
