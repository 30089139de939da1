"""Throughput of asynchronous rollouts: examples/default.yaml at rollout.max_staleness k = 0, 1, 2.

Each setting is a real `unigrad train` run of `--steps` steps (no evaluation, no checkpoints), and the settings
take turns over `--rounds` rounds (k=0, k=1, k=2, k=0, ...) so that machine drift hits all of them alike. A
setting's speed is its mean step time over the steps after the first `--warmup` of each run (the pipeline is full
then), read from the run's own metrics (`time/step`: the step's wall time, waiting included). Synchronous steps
use every core for each phase in turn; asynchronous ones split the cores between the engine's worker and the
learner (`rollout.engine_threads`; one each on 2 cores). k=0 with one thread is run too, to show what the split
costs each side.

The ideal overlap bound comes from the synchronous steps of the same rounds: a step is a rollout (generation) and
the rest (rewards, learner, optimizer, weight sync), and perfect overlap would take the longer of the two, so
bound = (rollout + rest) / max(rollout, rest).

    python benchmarks/async_throughput.py [--steps 40] [--warmup 6] [--rounds 2]

Prints a row per setting (steps/s, completion tokens/s, waits) and last `async_speedup=<k=1 steps/s / k=0
steps/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"k=0": ["rollout.max_staleness=0"], "k=0 (1 thread)": ["rollout.max_staleness=0", "threads=1"],
            "k=1": ["rollout.max_staleness=1"], "k=2": ["rollout.max_staleness=2"],
            "k=1 (2+1)": ["rollout.max_staleness=1", "threads=2", "rollout.engine_threads=1"]}


def run(name: str, steps: int, out: Path) -> list[dict]:
    args = [sys.executable, "-m", "unigrad.cli", "train", str(ROOT / "examples" / "default.yaml"), f"max_steps={steps}",
            "eval.before_after=false", "save_every=0", "samples_per_step=0", "tensorboard=false", *SETTINGS[name],
            "--output-dir", str(out)]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=out.parent,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=6, help="steps left out at the start of each run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="unigrad-async-") as tmp:
        for r in range(args.rounds):
            for name in SETTINGS:
                out = Path(tmp) / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-{r}"
                rows[name] += run(name, args.steps, out)[args.warmup:]
    print(f"examples/default.yaml, {args.steps} steps x {args.rounds} rounds per setting (first {args.warmup} of "
          f"each run left out); {os.cpu_count()} cores")
    speed = {}
    for name, steps in rows.items():
        step_time = statistics.fmean(r["time/step"] for r in steps)
        tokens = statistics.fmean(r["response_length/mean"] for r in steps) * 16 * 8  # prompts x samples
        speed[name] = 1 / step_time
        waits = ""
        if "time/learner_wait" in steps[0]:
            waits = (f"  learner waits {statistics.fmean(r['time/learner_wait'] for r in steps):.3f} s, engine waits "
                     f"{statistics.fmean(r['time/engine_wait'] for r in steps):.3f} s, staleness "
                     f"{statistics.fmean(r['staleness/mean'] for r in steps):.1f}")
        print(f"{name:<15} {1 / step_time:6.3f} steps/s  {tokens / step_time:8.0f} tokens/s  step {step_time:.3f} s  "
              f"(rollout {statistics.fmean(r['time/rollout'] for r in steps):.3f} s){waits}")
    sync = rows["k=0"]
    rollout = statistics.fmean(r["time/rollout"] for r in sync)
    rest = statistics.fmean(r["time/step"] - r["time/rollout"] for r in sync)
    bound = (rollout + rest) / max(rollout, rest)
    speedup = speed["k=1"] / speed["k=0"]
    print(f"ideal overlap bound from the synchronous steps: ({rollout:.3f} + {rest:.3f}) / {max(rollout, rest):.3f} "
          f"= {bound:.3f}; k=1 reaches {speedup / bound:.0%} of it, k=2 {speed['k=2'] / speed['k=0'] / bound:.0%}")
    print(f"async_speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
