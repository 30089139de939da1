"""Wall-clock to a held-out accuracy target on the arithmetic task: unigrad against TRL's GRPOTrainer.

Both start from the same checkpoint of the embedded `unigrad-tiny` model and train with GRPO on the arithmetic
task's train split: 8 prompts x 8 samples a step, at most 16 new tokens, temperature 1, beta 0, one optimizer step
per batch, AdamW lr 1e-4 (betas 0.9 / 0.99, no weight decay, constant schedule), grad clip 1.0, float32 on the
CPU, seed 0. TRL keeps its own defaults otherwise (including gradient checkpointing). Every `--eval-every` steps
the clock pauses and the same evaluator (unigrad.eval, greedy, the first 200 held-out prompts) scores the model.
A run stops when held-out pass@1 reaches the start plus `--gain` (absolute), or after `--max-minutes` of training.

    python benchmarks/time_to_target.py [--gain 0.10] [--eval-every 25] [--max-minutes 6]

The two runs go one after the other, each with the whole machine. Prints each run's accuracy curve, the training
seconds to the target (or "not reached"), and last `time_to_target_ratio=<unigrad seconds / TRL seconds>` (nan if
either did not reach the target).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

PROMPTS, G, NEW_TOKENS, LR, SEED = 8, 8, 16, 1e-4, 0


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


def run_unigrad(model_dir: Path, task, target: float, args) -> Clock:
    from unigrad.config import load_config
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.train.run import build_step_context
    from unigrad.train.step import train_step

    cfg = load_config(None, [f"model.name={model_dir}", "tasks=[arithmetic]", "objective=grpo", f"seed={SEED}",
                             f"prompts_per_step={PROMPTS}", f"rollout.num_generations={G}",
                             f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=1.0",
                             f"micro_batch_size={PROMPTS * G}", f"optim.lr={LR}", "optim.max_grad_norm=1.0",
                             "optim.schedule=constant"])
    model, tok = load_model_and_tokenizer(str(model_dir))
    torch.manual_seed(SEED)
    ctx, _, _ = build_step_context(cfg, model, tok, [task])
    clock = Clock(target, args.max_minutes * 60)
    step = 0
    while True:
        step += 1
        train_step(ctx, step)
        if step % args.eval_every == 0 and clock.checkpoint(step, lambda: held_out(model, tok, task, args.prompts)):
            return clock


def run_trl(model_dir: Path, task, target: float, args, out: Path) -> Clock:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from unigrad.tasks.base import Example

    examples = task.examples("train", 4096, seed=SEED)
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
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=SEED, disable_dropout=True,
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
    ap.add_argument("--max-minutes", type=float, default=6.0, help="training-time cap per framework")
    ap.add_argument("--only", choices=["unigrad", "trl"], help="run one framework only")
    args = ap.parse_args()
    model_dir = ensure_tiny()
    task = get_task("arithmetic")
    model, tok = load_model_and_tokenizer(str(model_dir))
    start = held_out(model, tok, task, args.prompts)
    target = start + args.gain
    print(f"unigrad-tiny, arithmetic: start pass@1 {start:.3f}, target {target:.3f}; {PROMPTS} prompts x {G} "
          f"samples x {NEW_TOKENS} tokens, GRPO, lr {LR}; torch threads {torch.get_num_threads()}")
    results = {}
    for name in ("unigrad", "trl"):
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="unigrad-ttt-") as tmp:
            clock = run_unigrad(model_dir, task, target, args) if name == "unigrad" else \
                run_trl(model_dir, task, target, args, Path(tmp))
        results[name] = clock
        curve = ", ".join(f"{s}: {acc:.3f} @ {sec:.0f}s" for s, sec, acc in clock.curve)
        reached = f"{clock.reached_at:.0f} s" if clock.reached_at is not None else "not reached"
        print(f"{name:<8} to target: {reached}   curve (step: pass@1 @ training seconds): {curve}")
    seconds = [results[n].reached_at for n in ("unigrad", "trl") if n in results]
    ratio = seconds[0] / seconds[1] if len(seconds) == 2 and None not in seconds else math.nan
    print(f"time_to_target_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
