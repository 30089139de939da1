"""What a run is made of, built from its config: the training pools (prompt ids per task), the rollout engine,
the per-task gradient accounting, and the `StepContext` every step reads (with the asynchronous pipeline's engine
worker where rollout.max_staleness > 0)."""

from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Any

import torch

from unigrad.config import TrainConfig
from unigrad.data.samplers import SamplerChoice, build_sampler
from unigrad.diagnostics.learning_gain import LearningGainTracker
from unigrad.diagnostics.task_gradients import ProcessReduction, TaskGradients
from unigrad.environments.base import is_multi_turn
from unigrad.rollout.engine_instruments import EngineInstruments
from unigrad.rollout.episodes import episode_prompt_ids
from unigrad.rollout.prompts import encode_prompt
from unigrad.tasks.base import Example, Task
from unigrad.tools.calls import tool_style
from unigrad.train.learning.learner import Learner
from unigrad.train.lifecycle.distributed import (
    SINGLE,
    Distributed,
)
from unigrad.train.lifecycle.feasibility import task_weights
from unigrad.train.producing.pipeline import RolloutPipeline, thread_split
from unigrad.train.step import StepContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_pools(tasks: list[Task], tokenizer, cfg: TrainConfig, context_length: int | None,
                tool_style: str = "plain"):
    """Training examples per task with their prompt ids; over-long prompts are dropped and counted. Each distinct
    prompt is tokenised once (a small file's examples repeat to fill the pool; a long prompt is costly to encode)."""
    pools, pool_ids, dropped = [], [], {}
    encoded: dict[str, list[int]] = {}
    for k, task in enumerate(tasks):
        examples = task.examples("train", cfg.train_pool_size, seed=cfg.seed + k)
        kept: list[Example] = []
        ids: list[list[int]] = []
        for ex in examples:
            if is_multi_turn(task):  # its environment's opening messages (a system message, tools)
                p = episode_prompt_ids(task, tokenizer, ex, tool_style)
            else:
                if ex.prompt not in encoded:
                    encoded[ex.prompt] = encode_prompt(tokenizer, ex.prompt)
                p = encoded[ex.prompt]
            if context_length is not None and len(p) + cfg.rollout.max_new_tokens > context_length:
                dropped[task.name] = dropped.get(task.name, 0) + 1
                continue
            kept.append(ex)
            ids.append(p)
        if not kept:
            raise ValueError(f"task {task.name!r}: every training prompt is longer than the context "
                             f"({context_length} tokens including max_new_tokens={cfg.rollout.max_new_tokens})")
        pools.append(kept)
        pool_ids.append(ids)
    for name, n in dropped.items():
        warnings.warn(f"task {name!r}: dropped {n} training prompts longer than the context window", stacklevel=2)
    return pools, pool_ids, dropped


def _context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def build_step_context(cfg: TrainConfig, model, tokenizer, tasks: list[Task], dist: Distributed = SINGLE):
    """(StepContext, learning-gain tracker, prompts dropped per task) for a model and its tasks."""
    style = tool_style(tokenizer)
    pools, pool_ids, dropped = build_pools(tasks, tokenizer, cfg, _context_length(model), style)
    objective = cfg.resolved_objective()
    learner = Learner(model, cfg.optim, keep_reference=objective.beta > 0,
                      shard=cfg.sharding == "fsdp" and dist.active, total_steps=cfg.optimizer_steps)
    longest = max(len(ids) for pool in pool_ids for ids in pool) + cfg.rollout.max_new_tokens
    if any(is_multi_turn(t) for t in tasks):  # an episode's context grows turn by turn, up to the model's
        longest = max(longest, _context_length(model) or longest)
    engine = build_engine(cfg, learner, tokenizer, longest)
    names = [t.name for t in tasks]
    choice = SamplerChoice(name=cfg.sampler.name, draw=cfg.sampler.draw, ema_decay=cfg.sampler.ema_decay,
                           exploration=cfg.sampler.exploration)
    sampler = build_sampler(choice, [len(p) for p in pools], names, seed=cfg.seed,
                            weights=task_weights(tasks, cfg.task_weights, cfg.sampler.name))
    gain = LearningGainTracker(names, cfg.diagnostics.gain_window)
    ctx = StepContext(tokenizer=tokenizer, learner=learner, engine=engine, tasks=tasks, pools=pools,
                      pool_prompt_ids=pool_ids, sampler=sampler, objective=objective, config=cfg,
                      task_gradients=task_gradient_accounting(cfg, learner, names, dist), dist=dist,
                      tool_style=style, context_length=_context_length(model))
    if cfg.rollout.max_staleness:  # the engine's copy in a worker process, sampling ahead of the learner
        ctx.pipeline = RolloutPipeline(ctx, cfg.rollout.max_staleness,
                                       make_worker=partial(_engine_worker, ctx, model, longest))
    return ctx, gain, dropped


def _rollout_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return DTYPES[cfg.rollout.dtype] if cfg.rollout.dtype else None


def _vllm_options(cfg: TrainConfig, longest: int) -> dict[str, Any]:
    return {"gpu_memory_utilization": cfg.rollout.gpu_memory_utilization, "max_model_len": longest, "seed": cfg.seed}


def build_engine(cfg: TrainConfig, learner: Learner, tokenizer, longest: int):
    """The rollout engine the config asks for, on the learner's whole model (`longest`: the longest prompt plus the
    completion budget, what vLLM reserves a sequence for)."""
    whole = learner.whole  # the model itself, or (sharded) a whole copy that the engine keeps in step
    if cfg.rollout.engine == "vllm" and not cfg.rollout.max_staleness:  # one vLLM instance in this process
        from unigrad.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(whole, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype=_rollout_dtype(cfg),
                          **_vllm_options(cfg, longest))
    if cfg.rollout.num_engines > 1:  # Ray actors, each with its own copy of the model, synced every step
        from unigrad.rollout.ray_pool import RayRolloutPool

        return RayRolloutPool(whole, tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.rollout.num_engines,
                              dtype=_rollout_dtype(cfg), decoder=cfg.rollout.decoder)
    from unigrad.rollout.transformers_engine import TransformersEngine

    engine = TransformersEngine(whole, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype=_rollout_dtype(cfg),
                                decoder=cfg.rollout.decoder, device=learner.device,
                                instruments=EngineInstruments(cfg.rollout.logit_noise, cfg.rollout.router_noise,
                                                              True if cfg.rollout.routing_replay else None))
    learner.replay_routing = cfg.rollout.routing_replay
    return engine


def task_gradient_accounting(cfg: TrainConfig, learner: Learner, names: list[str], dist: Distributed
                             ) -> TaskGradients | None:
    """Per-task gradient accounting, or None when it is off. diagnostics.task_gradients=None (auto): on for a
    multi-task run and for what feeds on it (with one task, balanced to the mean norm and pcgrad leave the gradient
    as it is; a fixed balance_target rescales it)."""
    account = cfg.diagnostics.task_gradients
    if account is None:
        account = len(names) > 1 or cfg.sampler.name == "gradient" or cfg.gradients.balance_target is not None
    if not account:
        return None
    processes = ProcessReduction(dist.sum_, names, learner.sharded) if dist.active else None
    return TaskGradients(learner.params, balance=cfg.gradients.combine == "balanced",
                         balance_target=cfg.gradients.balance_target, project=cfg.gradients.combine == "pcgrad",
                         cross_every=cfg.diagnostics.cross_every, processes=processes)


def _engine_worker(ctx: StepContext, model, longest: int):
    """The asynchronous rollouts' engine: a copy of the whole model in a worker process (rollout.max_staleness)."""
    from unigrad.rollout.async_worker import EngineWorker

    cfg, tokenizer = ctx.config, ctx.tokenizer
    episodes = {"tokenizer": tokenizer, "specs": cfg.tasks, "reward": cfg.reward, "tools": cfg.tools,
                "tool_style": ctx.tool_style, "max_turns": cfg.rollout.max_turns,
                "context_length": _context_length(model)} if ctx.multi_turn else None
    return EngineWorker(ctx.learner.whole, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype=_rollout_dtype(cfg),
                        decoder=cfg.rollout.decoder, timeout=cfg.rollout.worker_timeout,
                        threads=thread_split(cfg.threads, cfg.rollout.engine_threads, os.cpu_count() or 1)[1],
                        episodes=episodes, vllm=_vllm_options(cfg, longest) if cfg.rollout.engine == "vllm" else None)
