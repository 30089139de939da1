"""Wall-clock to a held-out accuracy target on the arithmetic task: unigrad (synchronous and asynchronous) against
TRL's GRPOTrainer, over several seeds.

All start from the same checkpoint of the embedded `unigrad-tiny` model and train with GRPO on the arithmetic
task's train split: 8 prompts x 8 samples a step, at most 16 new tokens, temperature 1, beta 0, one optimizer step
per batch, AdamW lr 1e-4 (betas 0.9 / 0.99, no weight decay, constant schedule), grad clip 1.0, float32 on the
CPU. TRL keeps its own defaults otherwise (including gradient checkpointing). Three contenders: unigrad
synchronous (every core for each phase in turn), unigrad with `rollout.max_staleness=1` (the engine in a worker
process one step ahead; the cores split between engine and learner) and TRL. Every `--eval-every` steps the clock
pauses and the same evaluator (unigrad.eval, greedy, the first 200 held-out prompts) scores the model; the
asynchronous run first waits for the rollouts in flight with the clock running, so no generation is done off the
clock. A run stops when held-out pass@1 reaches the start plus `--gain` (absolute), or after `--max-minutes` of
training (then it counts as not reached: infinite time).

    python benchmarks/time_to_target.py [--seeds 0 1 2] [--gain 0.10] [--eval-every 25] [--max-minutes 4]

Runs go one after the other, each with the whole machine, seed by seed (each seed runs the three contenders in
turn). Prints each run's accuracy curve and seconds to the target, then each contender's median and range over
seeds, and last `time_to_target_ratio_vs_trl=<the better unigrad median / TRL's median>` (`<=` the better
unigrad median / the training cap, when TRL's median run does not reach the target).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS, G, NEW_TOKENS, LR = 8, 8, 16, 1e-4
CONTENDERS = ("unigrad", "unigrad k=1", "trl")


def held_out(model, tok, task, prompts: int) -> float:
    from unigrad.eval import evaluate

    return evaluate(model, tok, [task], prompts, max_new_tokens=NEW_TOKENS, seed=0)[task.name]["pass@1"]


class Clock:
    """Training seconds, with evaluation time taken out, and the accuracy curve."""

    def __init__(self, target: float, max_seconds: float):
        self.target, self.max_seconds = target, max_seconds
        self.train_seconds, self.curve, self.reached_at = 0.0, [], None
        self.t0 = time.perf_counter()

    def checkpoint(self, step: int, evaluate) -> bool:
        """Stop the clock, evaluate, restart it; True when the run should stop."""
        self.train_seconds += time.perf_counter() - self.t0
        acc = evaluate()
        self.curve.append((step, self.train_seconds, acc))
        if acc >= self.target and self.reached_at is None:
            self.reached_at = self.train_seconds
        self.t0 = time.perf_counter()
        return self.reached_at is not None or self.train_seconds >= self.max_seconds


def run_unigrad(model_dir: Path, task, target: float, args, seed: int, staleness: int = 0) -> Clock:
    from unigrad.config import load_config
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.train.lifecycle.build import build_step_context
    from unigrad.train.producing.pipeline import thread_split
    from unigrad.train.step import train_step

    cfg = load_config(None, [f"model.name={model_dir}", "tasks=[arithmetic]", "objective=grpo", f"seed={seed}",
                             f"prompts_per_step={PROMPTS}", f"rollout.num_generations={G}",
                             f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=1.0",
                             f"micro_batch_size={PROMPTS * G}", f"optim.lr={LR}", "optim.max_grad_norm=1.0",
                             "optim.schedule=constant", f"rollout.max_staleness={staleness}"])
    model, tok = load_model_and_tokenizer(str(model_dir))
    torch.manual_seed(seed)
    ctx, _, _ = build_step_context(cfg, model, tok, [task])
    threads = torch.get_num_threads()
    if staleness:
        torch.set_num_threads(thread_split(0, 0, os.cpu_count() or 1)[0])
        ctx.pipeline.start(0)
    clock = Clock(target, args.max_minutes * 60)
    step = 0

    def evaluate() -> float:
        return held_out(model, tok, task, args.prompts)

    try:
        while True:
            step += 1
            train_step(ctx, step)
            if step % args.eval_every == 0:
                if staleness:  # the rollouts in flight finish on the clock
                    ctx.pipeline.state_dict()
                if clock.checkpoint(step, evaluate):
                    return clock
    finally:
        if staleness:
            ctx.pipeline.close()
            torch.set_num_threads(threads)


def run_trl(model_dir: Path, task, target: float, args, out: Path, seed: int) -> Clock:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from unigrad.tasks.base import Example

    examples = task.examples("train", 4096, seed=seed)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer}
                              for e in examples])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return task.verify(texts, [Example(prompt="", answer=a, demonstration=a, task=task.name) for a in answer])

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    clock_box: dict[str, Clock] = {}

    class Evaluate(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock_box["clock"] = Clock(target, args.max_minutes * 60)

        def on_step_end(self, _args, state, control, **k):
            if state.global_step % args.eval_every == 0:
                trained = k["model"]
                if clock_box["clock"].checkpoint(state.global_step, lambda: held_out(trained, tok, task, args.prompts)):
                    control.should_training_stop = True

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS * G, num_generations=G,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, beta=0.0,
        loss_type="grpo", num_iterations=1, gradient_accumulation_steps=1, max_steps=100_000, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.99, logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=seed, disable_dropout=True,
        dataloader_num_workers=0,
    )
    GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
                callbacks=[Evaluate()]).train()
    return clock_box["clock"]


def main() -> None:
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.models.tiny import ensure_tiny
    from unigrad.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gain", type=float, default=0.10, help="target = start pass@1 + this (absolute)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts per evaluation")
    ap.add_argument("--max-minutes", type=float, default=4.0, help="training-time cap per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=CONTENDERS, nargs="+", help="run these contenders only")
    args = ap.parse_args()
    model_dir = ensure_tiny()
    task = get_task("arithmetic")
    model, tok = load_model_and_tokenizer(str(model_dir))
    start = held_out(model, tok, task, args.prompts)
    target = start + args.gain
    print(f"unigrad-tiny, arithmetic: start pass@1 {start:.3f}, target {target:.3f}; {PROMPTS} prompts x {G} "
          f"samples x {NEW_TOKENS} tokens, GRPO, lr {LR}; torch threads {torch.get_num_threads()}; seeds {args.seeds}")
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS if not args.only or name in args.only}
    for seed in args.seeds:
        for name in seconds:
            with tempfile.TemporaryDirectory(prefix="unigrad-ttt-") as tmp:
                if name == "trl":
                    clock = run_trl(model_dir, task, target, args, Path(tmp), seed)
                else:
                    clock = run_unigrad(model_dir, task, target, args, seed, staleness=int(name.endswith("k=1")))
            seconds[name].append(clock.reached_at if clock.reached_at is not None else math.inf)
            curve = ", ".join(f"{s}: {acc:.3f} @ {sec:.0f}s" for s, sec, acc in clock.curve)
            reached = f"{clock.reached_at:.0f} s" if clock.reached_at is not None else "not reached"
            print(f"seed {seed} {name:<12} to target: {reached}   curve (step: pass@1 @ training seconds): {curve}",
                  flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(f"{name:<12} median {medians[name]:.0f} s, range {min(values):.0f}-{max(values):.0f} s over "
              f"{len(values)} seeds")
    best = min((m for n, m in medians.items() if n != "trl"), default=math.nan)
    trl = medians.get("trl", math.nan)
    if math.isinf(trl) and math.isfinite(best):  # TRL's median run never got there: the ratio is at most this
        print(f"time_to_target_ratio_vs_trl<={best / (args.max_minutes * 60):.3f} (TRL's median run did not reach "
              f"the target within {args.max_minutes:g} min of training)")
    else:
        print(f"time_to_target_ratio_vs_trl={best / trl:.3f}")


if __name__ == "__main__":
    main()
