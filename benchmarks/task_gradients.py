"""Cost of per-task gradient accounting: full training steps with and without it, in one run.

The default tiny model (built and cached on first use), four built-in tasks (arithmetic, countdown,
word_problems, table_qa), the step settings of examples/default.yaml (16 prompts x 8 samples, 40 new
tokens, micro-batches of 32), GRPO. Two identical learners start from the same weights and take
steps in alternation (off, on, off, on, ...) with the same per-step seeds, so machine drift hits
both alike. Three variants: no accounting, the default accounting (tasks split in halves for the cross term
every `diagnostics.cross_every` steps) and halves on every step.

The default's step times are bimodal: the steps that split halves make about twice the backward calls. A median
then lands on either mode depending on noise, so the overhead is the ratio of *mean* step times over a whole number
of `cross_every` cycles, which is what a run pays. Medians are printed too.

    python benchmarks/task_gradients.py [--steps 32] [--threads N]

Prints, last, `task_gradient_overhead=<mean step with / mean step without>` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from unigrad.config import load_config
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.tasks import get_tasks
from unigrad.train.lifecycle.build import build_step_context
from unigrad.train.step import train_step

TASKS = ["arithmetic", "countdown", "word_problems", "table_qa"]
DEFAULT_YAML = Path(__file__).resolve().parents[1] / "examples" / "default.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="timed steps per variant (after 2 warm-up steps; "
                        "rounded up to a multiple of diagnostics.cross_every)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    contexts = {}
    variants = {"without": ["diagnostics.task_gradients=false"],
                "with": ["diagnostics.task_gradients=true"],  # the default: halves every cross_every steps
                "halves_every_step": ["diagnostics.task_gradients=true", "diagnostics.cross_every=1"]}
    for name, overrides in variants.items():
        # Uniform task sampling in all: the default's gradient-balanced update needs the accounting itself.
        cfg = load_config(DEFAULT_YAML, [f"tasks=[{','.join(TASKS)}]", "gradients.combine=sum", *overrides])
        model, tokenizer = load_model_and_tokenizer(cfg.model.name)
        tasks = [t for spec in cfg.tasks for t in get_tasks(spec)]
        contexts[name], _, _ = build_step_context(cfg, model, tokenizer, tasks)
    print(f"model: {cfg.model.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"tasks {TASKS}; {cfg.prompts_per_step} prompts x {cfg.rollout.num_generations} samples; "
          f"torch threads {torch.get_num_threads()}")

    cross_every = contexts["with"].task_gradients.cross_every
    steps = -(-args.steps // cross_every) * cross_every if cross_every > 1 else args.steps
    step_times = {k: [] for k in contexts}
    learner_times = {k: [] for k in contexts}
    for step in range(1, steps + 3):
        for name, ctx in contexts.items():
            t0 = time.perf_counter()
            metrics, _ = train_step(ctx, step)
            elapsed = time.perf_counter() - t0
            if step > 2:
                step_times[name].append(elapsed)
                learner_times[name].append(metrics["time/learner"] + metrics["time/optimizer"])
            if name != "without" and step == 3:
                assert any(k.startswith("grad/") and k.endswith("/sq_norm") for k in metrics), "accounting is off"
    for name in contexts:
        print(f"{name:17s}: step mean {statistics.mean(step_times[name]):.3f} s, median "
              f"{statistics.median(step_times[name]):.3f} s; learner+optimizer mean "
              f"{statistics.mean(learner_times[name]):.3f} s ({len(step_times[name])} steps)")

    def ratio(times: dict[str, list[float]], name: str, stat=statistics.mean) -> float:
        return stat(times[name]) / stat(times["without"])

    print(f"median_step_ratio={ratio(step_times, 'with', statistics.median):.3f} (default; bimodal, see above)")
    print(f"halves_every_step_overhead={ratio(step_times, 'halves_every_step'):.3f} (cross term on every step)")
    print(f"learner_phase_ratio={ratio(learner_times, 'with'):.3f}")
    print(f"task_gradient_overhead={ratio(step_times, 'with'):.3f} (default: cross term every {cross_every} steps; "
          f"ratio of mean step times)")


if __name__ == "__main__":
    main()
