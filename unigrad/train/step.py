"""One training step, as an outline of named phases.

    produce (unigrad.train.producing.produce): task sampler -> rollouts -> verifiers -> advantages -> routing -> Batch
    learn   (unigrad.train.learning.learn):   mini-batches -> micro-batch plan -> log-probs -> policy_loss -> backward
                                     -> grad clip -> optimizer step (num_iterations x mini_batches times)
    sync:    the rollout engine takes the new weights
    report:  metrics of the whole batch, and a few samples

Departures from the textbook loop, and why:
- The behaviour correction (TIS / IcePop) uses the rollout engine's log-probs, which differ from the learner's when
  the engine runs in another dtype.
- Normalisers (tokens, sequences, L_max) are computed once over the whole step's batch, per loss component, and
  passed to every micro-batch, so micro-batching never changes the gradient; HPT's SFT and RL parts each have their
  own (unigrad.train.producing.routing).
- Per-task gradient accounting (multi-task runs) only regroups the micro-batches, by task (and by half on the steps
  that measure the cross term), and takes each group's gradient out of param.grad
  (unigrad.diagnostics.task_gradients); `balanced` rescales those and `pcgrad` projects them before the clip.
- A prompt's G rows share one forward pass of the prompt in the learner (its keys and values are expanded to the
  rows; unigrad.rollout.logprobs): same gradient, about 1/G of the prompt's cost. Micro-batches keep a prompt's rows
  together for this.
- Over several processes (unigrad.train.lifecycle.distributed) each takes a block of the step's prompts; rewards are
gathered
  for the advantages, normalisers and gradients are summed, and metrics come from gathered data, so N processes
  compute what one process computes. With one process every `dist` call is a no-op.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from unigrad.agents.program import served_model_name
from unigrad.config import TrainConfig
from unigrad.diagnostics.compute import step_flops
from unigrad.diagnostics.task_gradients import TaskGradients
from unigrad.environments.base import is_multi_turn
from unigrad.objective import Objective
from unigrad.rollout.base import RolloutEngine, SamplingParams
from unigrad.tasks.base import Example, Task
from unigrad.train.batch import Batch
from unigrad.train.learning.learn import LearnSettings, learn
from unigrad.train.learning.learner import Learner
from unigrad.train.lifecycle.distributed import SINGLE, Distributed
from unigrad.train.producing.produce import Produced, decode_completions, produce, score  # noqa: F401 - re-exported
from unigrad.train.producing.routing import TrainingMode


@dataclass
class StepContext:
    """Everything a step needs; built once by `unigrad.train.lifecycle.build.build_step_context`.

    Every setting comes from the run's config (`config`: its sections rollout, optim, diagnostics, monitors and
    its top-level keys), read through the properties below; nothing here has a default of its own."""

    tokenizer: Any
    learner: Learner
    engine: RolloutEngine
    tasks: list[Task]
    pools: list[list[Example]]  # training examples per task
    pool_prompt_ids: list[list[list[int]]]  # their chat-templated token ids
    sampler: Any  # TaskSampler
    objective: Objective  # the resolved RL objective (the config's objective with its objective_args)
    config: TrainConfig
    task_gradients: TaskGradients | None = None  # per-task gradient accounting (None = off)
    dist: Distributed = SINGLE  # data-parallel processes (unigrad.train.lifecycle.distributed); one by default
    reward_errors: dict[str, str] = field(default_factory=dict)  # the last step's, by task: for the run's messages
    pipeline: Any = None  # asynchronous rollouts (unigrad.train.producing.pipeline.RolloutPipeline); None = synchronous
    tool_style: str = "plain"  # how tool calls are written: "hf" (chat templates with tools=) or "plain"
    context_length: int | None = None  # the model's: an episode ends when its next turn would not fit
    num_parameters: int | None = None  # the model's, for the compute estimate (counted at the first step)

    @property
    def multi_turn(self) -> bool:
        """Some task is multi-turn: rollouts run as episodes."""
        return any(is_multi_turn(t) for t in self.tasks)

    @property
    def mode(self) -> TrainingMode:
        """How demonstrations enter the step (SFT, HPT, LUFFY), and the components' weights."""
        return TrainingMode.from_config(self.config)

    @property
    def sampling(self) -> SamplingParams:
        rollout = self.config.rollout
        return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                              max_new_tokens=rollout.max_new_tokens)

    # The config's keys under the names the step's code reads them by.
    prompts_per_step = property(lambda self: self.config.prompts_per_step)
    micro_batch_size = property(lambda self: self.config.micro_batch_size)
    num_iterations = property(lambda self: self.config.num_iterations)  # epochs over each batch
    seed = property(lambda self: self.config.seed)
    samples_per_step = property(lambda self: self.config.samples_per_step)
    reward_timeout = property(lambda self: self.config.reward_timeout)  # seconds a task's verifier may take
    num_generations = property(lambda self: self.config.rollout.num_generations)
    dynamic_sampling = property(lambda self: bool(self.config.rollout.dynamic_sampling))
    max_resample = property(lambda self: self.config.rollout.max_resample)
    overlong_buffer = property(lambda self: self.config.rollout.overlong_buffer or 0)
    overlong_penalty = property(lambda self: self.config.rollout.overlong_penalty)
    max_turns = property(lambda self: self.config.rollout.max_turns)  # None: each task's own
    agent_timeout = property(lambda self: self.config.rollout.agent_timeout)  # seconds per agent episode
    model_name = property(lambda self: served_model_name(self.config.model.name))  # what agents are told to call
    mini_batches = property(lambda self: self.config.optim.mini_batches)  # optimizer steps per epoch
    sample_gradients = property(lambda self: self.config.diagnostics.sample_gradients)
    grad_norm_cap = property(lambda self: self.config.monitors.grad_norm_cap)  # skip a step above this norm


def train_step(ctx: StepContext, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run one step; returns (metrics for metrics.jsonl, sample records for samples.jsonl)."""
    t_start = time.perf_counter()
    names = [t.name for t in ctx.tasks]

    # 1. Produce: the step's batch, sampled by the weights of the previous step (policy version step - 1), or
    #    (asynchronous rollouts) the batch the engine's worker sampled ahead, at most k versions older.
    waited = None
    if ctx.pipeline is not None:
        ready, waited = ctx.pipeline.take(step)
        batch, produced = produce(ctx, step, policy_version=ready.version, ready=ready)
    else:
        batch, produced = produce(ctx, step, policy_version=step - 1)

    # 2. Learn: num_iterations epochs of mini_batches optimizer steps on it.
    settings = LearnSettings(ctx.micro_batch_size, ctx.num_iterations, ctx.grad_norm_cap, ctx.mini_batches,
                             shuffle_seed=ctx.seed * 1_000_003 + step,
                             sample_gradients=ctx.sample_gradients if ctx.task_gradients is not None
                             and ctx.task_gradients.splits_halves(step) else 0)
    learned = learn(batch, ctx.learner, settings, ctx.dist, ctx.task_gradients, names)

    # 3. The rollout engine takes the new weights (asynchronous: the worker too, then it is asked for step + 1 + k).
    t0 = time.perf_counter()
    ctx.engine.load_weights(ctx.learner.full_state_dict())
    if ctx.pipeline is not None:
        ctx.pipeline.after_update(step)
    t_sync = time.perf_counter() - t0

    # 4. Report: the batch's metrics (gathered from every process), the learner's, timings, a few samples.
    metrics = produced_metrics(names, produced, ctx.dist)
    metrics.update(produced.sampling_metrics)
    metrics.update(produced.score_failures)  # this process's completions scored as failed, by task and reason
    ctx.reward_errors = produced.reward_errors
    metrics.update(learned)
    metrics.update(_step_flops(ctx, produced, batch))
    metrics.update({"time/rollout": produced.time_rollout, "time/reward": produced.time_reward,
                    "time/weight_sync": t_sync, "time/step": time.perf_counter() - t_start})
    if waited is not None:  # every row of a batch shares its version
        staleness = float(step - 1 - batch.policy_version)
        metrics.update({"staleness/mean": staleness, "staleness/max": staleness, "time/learner_wait": waited,
                        "time/engine_wait": ready.job.idle, "staleness/regenerated": float(ctx.pipeline.regenerated)})
    samples = sample_records(ctx, step, produced)
    for record in samples:
        record["policy_version"] = batch.policy_version  # the weights that sampled it (rollout steps trained)
    return metrics, samples


def _step_flops(ctx: StepContext, p: Produced, batch: Batch) -> dict[str, float]:
    """The step's estimated compute (unigrad.diagnostics.compute), token counts summed over processes."""
    ro, sampled = p.rollout, ~p.off_policy
    rollout_tokens = float((ro.prompt_mask.sum(-1) + ro.context_mask.sum(-1))[sampled].sum()) \
        if ro.num_sequences else 0.0
    trained = sum(float(c.sequences.prompt_mask.sum() + c.sequences.context_mask.sum()) for c in batch.components)
    if ctx.num_parameters is None:
        ctx.num_parameters = sum(t.numel() for t in ctx.learner.model.parameters())
    return step_flops(ctx.num_parameters, ctx.dist.sum_float(rollout_tokens), ctx.dist.sum_float(trained),
                      ctx.num_iterations, ctx.mini_batches,
                      reference=any(c.objective.beta > 0 for c in batch.components))


def produced_metrics(names: list[str], p: Produced, dist: Distributed) -> dict[str, float]:
    """Rewards, lengths and advantages of the sampled rows only (a demonstration row is not the model's work), and
    the demonstration rows' own reward and advantage (LUFFY)."""
    ro = p.rollout
    sampled = ~dist.cat(p.off_policy)
    rows = SampledRows(p.all_rewards[sampled], p.all_row_task[sampled], dist.cat(ro.completion_mask.sum(-1))[sampled],
                       dist.cat(ro.prompt_mask.sum(-1))[sampled], dist.cat(ro.truncated)[sampled],
                       p.all_advantages[sampled])
    metrics = step_metrics(names, rows, dist.cat(p.sft_prompt), dist.cat(p.prompt_task))
    rewards, row_task = p.all_rewards[sampled], p.all_row_task[sampled]
    for k, name in enumerate(names):  # unscorable rewards per task, logged whenever the task had rows
        rows = row_task == k
        if rows.any():
            metrics[f"rewards/nan_count/{name}"] = float((~torch.isfinite(rewards[rows])).sum())
            metrics[f"rewards/unscorable/{name}"] = float(not torch.isfinite(rewards[rows]).any())
    if p.episodes is not None:
        metrics.update(episode_metrics(names, p, dist))
    if (~sampled).any():
        metrics["guidance/reward"] = p.all_rewards[~sampled].nanmean().item()
        metrics["guidance/advantage"] = p.all_advantages[~sampled].mean().item()
    return metrics


def episode_metrics(names: list[str], p: Produced, dist: Distributed) -> dict[str, float]:
    """Multi-turn runs: assistant turns, tool calls, tool calls that returned an error, and the episode's length in
    tokens (its turns and observations), per episode over every process; turns per task too. Agent episodes: turns are
    model calls, and the trajectory splits are counted (one process)."""
    e, ro = p.episodes, p.rollout
    turns, row_task = dist.cat(e.turns).float(), p.all_row_task
    m = {"episode/turns": turns.mean().item(), "episode/tool_calls": dist.cat(e.tool_calls).float().mean().item(),
         "episode/tool_errors": dist.cat(e.tool_errors).float().mean().item(),
         "episode/length": dist.cat(ro.context_mask.sum(-1)).float().mean().item(),
         "episode/observation_tokens": dist.cat(ro.observation_mask.sum(-1)).float().mean().item()}
    for k, name in enumerate(names):
        if (row_task == k).any():
            m[f"episode/turns/{name}"] = turns[row_task == k].mean().item()
    if e.first_row is not None:  # agent episodes: rows started where a request did not extend the episode's tokens
        m["agents/splits"] = float(e.splits)
        m["agents/rows_per_episode"] = len(e.first_row) / max(1, len(e.first_row.unique()))
    return m


def sample_records(ctx: StepContext, step: int, p: Produced) -> list[dict[str, Any]]:
    """The first completion of the first `samples_per_step` prompts, for samples.jsonl."""
    return [
        {"step": step, "task": p.examples[g].task, "prompt": p.examples[g].prompt, "completion": p.texts[r],
         "reward": None if math.isnan(p.rewards[r].item()) else p.rewards[r].item(), "answer": p.examples[g].answer}
        for r, g in list(enumerate(p.rollout.group_ids.tolist()))[:: max(1, ctx.num_generations)][
            : ctx.samples_per_step]
    ]


@dataclass(frozen=True)
class SampledRows:
    """The sampled rows a step's metrics describe, each (N,)."""

    rewards: torch.Tensor  # NaN = unscorable
    row_task: torch.Tensor  # task index of each row
    lengths: torch.Tensor  # completion tokens
    prompt_lengths: torch.Tensor
    truncated: torch.Tensor  # bool: cut by max_new_tokens
    advantages: torch.Tensor


def step_metrics(names, rows: SampledRows, sft_prompt: torch.Tensor, prompt_task: torch.Tensor) -> dict[str, float]:
    """Reward, accuracy, lengths, |advantage| and HPT fractions, overall and per task (`rows`: (N,) tensors;
    `sft_prompt`, `prompt_task`: (P,) tensors)."""
    rewards, row_task, lengths, prompt_lengths = rows.rewards, rows.row_task, rows.lengths, rows.prompt_lengths
    truncated, adv = rows.truncated, rows.advantages
    m: dict[str, float] = {"hpt/sft_fraction": sft_prompt.float().mean().item()}
    for k, name in enumerate(names):
        if (prompt_task == k).any():
            m[f"hpt/sft_fraction/{name}"] = sft_prompt[prompt_task == k].float().mean().item()
    if not len(rewards):  # objective=sft: nothing was sampled
        return m
    valid = torch.isfinite(rewards)
    lengths = lengths.float()
    m["reward/mean"] = rewards[valid].mean().item() if valid.any() else float("nan")
    m["accuracy/mean"] = (rewards[valid] >= 1.0).float().mean().item() if valid.any() else float("nan")
    m["rewards/nan_count"] = float((~valid).sum())
    m["response_length/mean"] = lengths.mean().item()
    m["completions/truncated_fraction"] = truncated.float().mean().item()
    m["completions/empty_fraction"] = (lengths <= 1).float().mean().item()  # nothing but EOS
    for k, name in enumerate(names):
        rows = (row_task == k) & valid
        if rows.any():
            m[f"reward/{name}"] = rewards[rows].mean().item()
            m[f"accuracy/{name}"] = (rewards[rows] >= 1.0).float().mean().item()
            m[f"response_length/{name}"] = lengths[row_task == k].mean().item()
            m[f"prompt_length/{name}"] = prompt_lengths[row_task == k].float().mean().item()
            m[f"advantage_abs/{name}"] = adv[rows].abs().mean().item()
    return m
