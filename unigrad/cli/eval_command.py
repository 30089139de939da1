"""`unigrad eval`: held-out pass@1 and pass@k of a model or a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unigrad.cli.arguments import at_least


def add_eval(sub) -> None:
    """The `unigrad eval` command and its options."""
    e = sub.add_parser("eval", help="held-out pass@1 (greedy) and pass@k per task, on the test or validation split")
    e.add_argument("model", help="'unigrad-tiny', a model directory, or a run directory (uses its final/)")
    e.add_argument("--tasks", nargs="+", help="task specs (default: the run's tasks or the default mixture)")
    e.add_argument("--tools", nargs="+", default=None, help="with --tasks: tools offered to the single-turn tasks "
                   "(calculator, python, path.py:func), which then run as tool-use episodes")
    e.add_argument("--prompts", type=at_least(1, "the held-out prompts per task"), default=200,
                   help="held-out prompts per task")
    e.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test (what results are reported on) or validation (what choices are tuned on)")
    e.add_argument("--k", type=at_least(0, "k (0: no pass@k)"), default=0,
                   help="also report pass@k with k samples at temperature 1")
    e.add_argument("--max-new-tokens", type=at_least(1, "the tokens per completion"), default=None,
                   help="tokens per completion (default: the run's rollout.max_new_tokens, else 32)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--engine", choices=["transformers", "vllm"], default=None,
                   help="what samples: transformers or vllm (vLLM, as rollout.engine=vllm; default: the run's "
                        "rollout.engine, with auto resolved as training resolves it, else transformers)")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N "
                                                    "or mps")
    e.add_argument("--json", action="store_true", help='print one JSON object {task: {"pass@1": x}, "mean": ...}')
    e.add_argument("--per-prompt", action="store_true", help='with --json: also {task: {"correct": [0 or 1 per '
                   'prompt, greedy]}}, for paired comparisons of two models on the same prompts')
    e.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    # With --json, stdout holds the JSON alone: whatever the tasks' code (a user's reward function) prints while
    # the tasks load and the model is scored goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        res = _evaluate_model(args)
    if isinstance(res, int):  # refused: the reason is printed
        return res
    if args.json:
        print(json.dumps(res))
        return 0
    from rich.console import Console
    from rich.table import Table

    keys = list(res["mean"])
    table = Table(title=f"held-out evaluation of {args.model} ({args.split} split)")
    table.add_column("task")
    for k in keys:
        table.add_column(k, justify="right")
    for name, row in res.items():
        table.add_row(name, *[f"{100 * row[k]:.1f}" for k in keys])
    Console().print(table)
    return 0


def _evaluate_model(args: argparse.Namespace):
    """`unigrad eval`'s results, or its exit code when it refuses (the reason printed)."""
    from unigrad.config import load_run_config
    from unigrad.eval import evaluate
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import DEFAULT_MIXTURE, load_tasks

    target = Path(args.model)
    tasks, cfg = args.tasks, None
    model_path, max_new_tokens = args.model, args.max_new_tokens
    if (target / "config.yaml").is_file() and (target / "final").is_dir():  # a run directory
        cfg = load_run_config(target)
        model_path = str(target / "final")
        tasks = tasks or cfg.tasks
        max_new_tokens = cfg.rollout.max_new_tokens if max_new_tokens is None else max_new_tokens
    from unigrad.train.lifecycle.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"unigrad eval: {str(err).replace('model.device', '--device')}", file=sys.stderr)
        return 2
    reward = cfg.reward if cfg is not None and not args.tasks else None  # the run's own reward function
    task_objects = load_tasks(tasks or DEFAULT_MIXTURE, reward, cfg.tools if cfg is not None and not args.tasks
                              else args.tools)
    from unigrad.sandbox import JailUnavailable, SandboxError, prepare

    try:  # as the run was configured (a run directory), else the default jail
        prepare(task_objects, **(cfg.sandbox.model_dump() if cfg is not None else {}))
    except (JailUnavailable, SandboxError) as err:
        print(f"unigrad eval: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model_and_tokenizer(model_path, device=device)
    engine_name = args.engine or (cfg.rollout.engine if cfg is not None else "transformers")
    if engine_name == "auto":  # a run configured with rollout.engine=auto: the engine the rule picks for it here
        import torch

        from unigrad.train.lifecycle.engine_selection import resolve_engine

        engine_name = resolve_engine(cfg, model, torch.device(device).type)[0].rollout.engine
    engine = None  # evaluate's transformers engine
    if engine_name == "vllm":
        from unigrad.rollout.vllm_engine import VLLMEngine, VLLMUnavailable

        try:
            engine = VLLMEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=args.seed)
        except VLLMUnavailable as err:
            print(f"unigrad eval: --engine vllm: {err}", file=sys.stderr)
            return 2
        print("unigrad eval: sampling with vLLM", file=sys.stderr)
    return evaluate(model, tokenizer, task_objects, args.prompts, pass_k=args.k, per_prompt=args.per_prompt,
                    max_new_tokens=32 if max_new_tokens is None else max_new_tokens, seed=args.seed,
                    max_turns=cfg.rollout.max_turns if cfg is not None else None, split=args.split, engine=engine)
