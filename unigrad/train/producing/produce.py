"""The producing half of a step: prompts -> rollouts -> rewards -> advantages -> routing, ending in a `Batch`.

- Prompts: the sampler picks (task, example) pairs, the same on every process; each process takes its block. For
  per-task gradient accounting, each task's prompts are dealt into two halves on the steps that measure the cross
  term (`unigrad.train.learning.plan.task_halves`).
- Rollouts: G completions per prompt with the engine's own log-probs; each prompt has its own random stream, the
  one it has in a single process. With demonstrations in the group (LUFFY) G - 1 are sampled and the prompt's
  demonstration is the G-th; with demonstrations only (SFT) nothing is sampled.
- Rewards from the verifiers (NaN = unscorable; counted, advantage 0); demonstration rows are scored too.
- DAPO's dynamic sampling (`rollout.dynamic_sampling`, `unigrad.train.producing.dynamic_sampling`): groups whose
rewards are
  all equal are dropped and more prompts drawn until the step has its prompts. DAPO's overlong shaping
  (`rollout.overlong_buffer`, `unigrad.objective.shaping`) adds its length penalty to the rewards the advantages
  see; the metrics report the verifiers' rewards.
- Advantages over the whole batch (the rewards of every process).
- Routing (`unigrad.train.producing.routing`) into loss components, whose normalisers are then summed over processes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from unigrad.agents.program import is_agent_task
from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes
from unigrad.environments.base import is_multi_turn
from unigrad.objective import compute_advantages
from unigrad.objective.shaping import overlong_penalty
from unigrad.rollout.base import Rollout, SamplingParams, eos_id_list, prompt_stream_seeds
from unigrad.rollout.episodes import EpisodeBatch, Episodes, episode_turns, run_episodes
from unigrad.tasks.base import Example, Task
from unigrad.train.batch import Batch, global_normalisers
from unigrad.train.learning.plan import task_halves
from unigrad.train.producing.demonstrations import (
    check_demonstrations,
    demonstration_batch,
    no_rollout,
    with_demonstrations,
)
from unigrad.train.producing.drawn import Drawn
from unigrad.train.producing.dynamic_sampling import refill
from unigrad.train.producing.routing import ScoredRows, route


@dataclass
class Produced:
    """What the step reports about the rows it produced (metrics and samples); `learn` never reads it."""

    examples: list[Example]  # (P,) this process's prompts
    texts: list[str]  # (N,) decoded completions (a multi-turn episode's whole transcript)
    rollout: Rollout  # (N,) rows, demonstration rows included (LUFFY)
    off_policy: torch.Tensor  # (N,) bool: demonstration rows
    rewards: torch.Tensor  # (N,)
    row_task: torch.Tensor  # (N,)
    all_rewards: torch.Tensor  # (N_all,) over every process
    all_row_task: torch.Tensor  # (N_all,)
    all_advantages: torch.Tensor  # (N_all,)
    prompt_task: torch.Tensor  # (P,)
    sft_prompt: torch.Tensor  # (P,) bool
    reward_errors: dict[str, str]  # {task: what made its rewards unscorable this step} (this process's)
    time_rollout: float
    time_reward: float
    sampling_metrics: dict[str, float]  # dynamic sampling's counts and the overlong penalty (when on)
    episodes: Episodes | None = None  # multi-turn runs: turns, tool calls and errors per row
    score_failures: dict[str, float] = field(default_factory=dict)  # "rewards/failed/TASK/REASON": this process's


def produce(ctx, step: int, policy_version: int, ready=None) -> tuple[Batch, Produced]:
    """One step's batch from `ctx` (a `unigrad.train.step.StepContext`), and what it reports. `ready`: a batch
    generated ahead (`unigrad.train.producing.pipeline.Pending`, one process) instead of drawing and sampling here."""
    dist, mode = ctx.dist, ctx.mode
    if ready is None:
        picks = ctx.sampler.sample(ctx.prompts_per_step)
        lo, hi = dist.block(len(picks))
        drawn = draw(ctx, step, picks[lo:hi], stream_offset=lo)
    else:
        picks, lo, hi = ready.picks, 0, len(ready.picks)
        drawn = draw(ctx, step, picks, stream_offset=0, generated=ready.job.rollout, episodes=ready.job.episodes)
        drawn.time_rollout = ready.job.busy
    sampling_metrics: dict[str, float] = {}
    if ctx.dynamic_sampling:  # one process (checked when the run starts): lo = 0, hi = len(picks)
        drawn, picks, sampling_metrics = refill(ctx, step, drawn, picks, draw)
        lo, hi = 0, len(picks)
    prompt_half = torch.zeros(len(picks), dtype=torch.long)
    if ctx.task_gradients is not None and ctx.task_gradients.splits_halves(step):
        prompt_half = task_halves(torch.tensor([t for t, _ in picks]))
    prompt_half = prompt_half[lo:hi]
    examples, prompt_ids, ro, off_policy = drawn.examples, drawn.prompt_ids, drawn.rollout, drawn.off_policy
    prompt_task = torch.tensor([t for t, _ in drawn.picks], dtype=torch.long)  # (P,) this process's prompts
    row_task = prompt_task[ro.group_ids]  # (N,)
    rewards = drawn.rewards
    trained_rewards = rewards
    if ctx.overlong_buffer:  # DAPO's soft overlong punishment, on sampled rows; the verifier's reward is reported
        trained_rewards = rewards + _overlong_penalty(ctx, ro, off_policy, row_task, sampling_metrics)

    obj = ctx.objective
    all_rewards, all_row_task = dist.cat(rewards), dist.cat(row_task)
    first_row = drawn.episodes.first_row if drawn.episodes is not None else None  # split agent episodes (1 process)
    if first_row is not None:  # an episode's later rows stay out of its group's statistics
        trained_rewards = trained_rewards.masked_fill(first_row != torch.arange(len(first_row)), float("nan"))
    all_adv = compute_advantages(dist.cat(trained_rewards), dist.cat(ro.group_ids + lo), obj.advantage,
                                 task_ids=all_row_task, per_task=obj.per_task_advantage,
                                 eps=obj.advantage_eps)  # (N_all,)
    if first_row is not None:  # ... and take its advantage
        all_adv = all_adv[first_row]
    first_row = lo * ctx.num_generations
    adv = all_adv[first_row:first_row + len(rewards)]  # (N,) this process's rows

    routed = route(mode, obj, ScoredRows(examples, prompt_ids, ro, off_policy, rewards, adv), ctx.tokenizer)
    for comp in routed.components:  # the whole batch's normalisers, before any loss is formed
        comp.normalisers = global_normalisers(dist, comp.normalisers)
    temperature = ctx.sampling.temperature if ctx.sampling.temperature > 0 else 1.0
    # L_max (Dr. GRPO's constant): the generation budget of a row, every turn of the longest episodes
    max_length = max(generation_budget(ctx, t) for t in ctx.tasks)
    batch = Batch(routed.components, prompt_task, prompt_half, max_length, temperature,
                  policy_version, first_prompt=lo, num_prompts=len(picks))
    return batch, Produced(examples, drawn.texts, ro, off_policy, rewards, row_task, all_rewards, all_row_task,
                           all_adv, prompt_task, routed.sft_prompt, drawn.errors, drawn.time_rollout,
                           drawn.time_reward, sampling_metrics, drawn.episodes, drawn.failures)


def generation_budget(ctx, task: Task) -> int:
    """L_max of a row of `task`: max_new_tokens for each assistant turn its episodes may write (one if single-turn)."""
    return ctx.sampling.max_new_tokens * episode_turns(task, ctx.max_turns)


def _overlong_penalty(ctx, ro: Rollout, off_policy: torch.Tensor, row_task: torch.Tensor,
                      metrics: dict[str, float]) -> torch.Tensor:
    """(N,) DAPO's length penalty of this process's sampled rows (0 on demonstration rows), each row's length (its
    turns' tokens) against its task's budget (`generation_budget`); its mean and the share of rows it hits, over
    every process, go into `metrics`."""
    lengths = ro.completion_mask.sum(-1)
    budgets = torch.tensor([generation_budget(ctx, ctx.tasks[t]) for t in row_task.tolist()], dtype=torch.long)
    penalty = torch.zeros(len(lengths))
    for budget in budgets.unique().tolist():
        rows = budgets == budget
        penalty[rows] = overlong_penalty(lengths[rows], budget, ctx.overlong_buffer, ctx.overlong_penalty)
    penalty = penalty * ~off_policy
    sampled = ctx.dist.cat(penalty)[~ctx.dist.cat(off_policy)]
    metrics["rewards/overlong_penalty"] = sampled.mean().item() if len(sampled) else 0.0
    metrics["rewards/overlong_fraction"] = (sampled < 0).float().mean().item() if len(sampled) else 0.0
    return penalty


def draw(ctx, step: int, picks: list[tuple[int, int]], stream_offset: int, generated: Rollout | None = None,
         episodes: Episodes | None = None) -> Drawn:
    """Roll out and score `picks` (this process's). Prompt i of them samples from the step's random stream
    `stream_offset + i`: the streams of a step are numbered in draw order over every process. `generated`: the
    engine's rows for them, sampled elsewhere with `generation_request`."""
    examples = [ctx.pools[t][i] for t, i in picks]
    prompt_ids = [ctx.pool_prompt_ids[t][i] for t, i in picks]
    t0 = time.perf_counter()
    if ctx.multi_turn:  # the environments reward their episodes as they go (part of the rollout's time)
        ro, episodes = (generated.to("cpu"), episodes) if generated is not None else \
            rollout_episodes(ctx, step, stream_offset, picks, examples)
        off_policy = torch.zeros(ro.num_sequences, dtype=torch.bool)
    else:
        ro, off_policy = _rollouts(ctx, step, stream_offset, picks, examples, generated)
    t_rollout = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = decode_completions(ctx.tokenizer, ro)
    row_task = torch.tensor([t for t, _ in picks], dtype=torch.long)[ro.group_ids]  # (N,)
    # single-turn tasks' rows go to their verifiers; a multi-turn task's rows have their episode's reward
    single = [task if not is_multi_turn(task) else None for task in ctx.tasks]
    failures: dict[str, float] = {}
    rewards, errors = score(single, texts, [examples[g] for g in ro.group_ids.tolist()], row_task,
                            ctx.reward_timeout, failures)
    if episodes is not None:
        from_episode = torch.tensor([is_multi_turn(ctx.tasks[t]) for t in row_task.tolist()], dtype=torch.bool)
        rewards = torch.where(from_episode, episodes.rewards, rewards)
        for row, failure in episodes.failures.items():
            errors.setdefault(ctx.tasks[int(row_task[row])].name, failure)
    return Drawn(list(picks), examples, prompt_ids, ro, off_policy, texts, rewards, errors, t_rollout,
                 time.perf_counter() - t0, episodes, failures)


def rollout_episodes(ctx, step: int, stream_offset: int, picks: list[tuple[int, int]],
                     examples: list[Example]) -> tuple[Rollout, Episodes]:
    """This process's rows as multi-turn episodes (`unigrad.rollout.episodes`): a fresh environment per row of a
    multi-turn task, reset on its example; rows of single-turn tasks are one-turn episodes."""
    prompt_ids, n, sampling = generation_request(ctx, step, picks, stream_offset)
    if all(is_agent_task(ctx.tasks[t]) for t, _ in picks):  # agent programs play them (no other task beside them)
        batch = AgentBatch([ctx.tasks[t] for t, _ in picks], examples, prompt_ids, n, sampling.prompt_seeds)
        settings = AgentSettings(ctx.model_name, ctx.agent_timeout, ctx.context_length, ctx.max_turns)
        return run_agent_episodes(ctx.engine, ctx.tokenizer, batch, sampling, settings)
    environments = []
    for (t, _), example in zip(picks, examples, strict=True):
        task = ctx.tasks[t]
        for _ in range(n):
            env = task.environment(ctx.tool_style) if is_multi_turn(task) else None
            if env is not None:
                env.reset(example)
            environments.append(env)
    budgets = [episode_turns(ctx.tasks[t], ctx.max_turns) for t, _ in picks]
    return run_episodes(ctx.engine, ctx.tokenizer, EpisodeBatch(prompt_ids, environments, n, budgets), sampling,
                        eos_id_list(ctx.tokenizer.eos_token_id), ctx.context_length)



def generation_request(ctx, step: int, picks: list[tuple[int, int]], stream_offset: int):
    """(prompt ids, completions per prompt, sampling parameters) the engine is asked for to roll out `picks`."""
    step_seed = ctx.seed * 1_000_003 + step
    sampling = SamplingParams(**{**ctx.sampling.__dict__, "seed": step_seed,
                                 "prompt_seeds": prompt_stream_seeds(step_seed, len(picks), offset=stream_offset)})
    prompt_ids = [ctx.pool_prompt_ids[t][i] for t, i in picks]
    return prompt_ids, ctx.mode.sampled_per_prompt(ctx.num_generations), sampling


def _rollouts(ctx, step: int, stream_offset: int, picks: list[tuple[int, int]], examples: list[Example],
              generated: Rollout | None = None) -> tuple[Rollout, torch.Tensor]:
    """This process's rows and (N,) bool marking the demonstration rows among them."""
    mode = ctx.mode
    prompt_ids = [ctx.pool_prompt_ids[t][i] for t, i in picks]
    if not mode.samples:
        ro = no_rollout()
    elif generated is not None:
        ro = generated.to("cpu")
    else:
        ro = ctx.engine.generate(*generation_request(ctx, step, picks, stream_offset)).to("cpu")
    off_policy = torch.zeros(ro.num_sequences, dtype=torch.bool)  # (N,)
    if mode.demonstrations == "in_group":
        check_demonstrations(examples, "LUFFY-style guidance")
        ro, off_policy = with_demonstrations(ro, demonstration_batch(ctx.tokenizer, prompt_ids, examples),
                                             ctx.tokenizer.pad_token_id)
    return ro, off_policy


def decode_completions(tokenizer, ro: Rollout) -> list[str]:
    """Each row's completion as text; a multi-turn episode's whole transcript (observations and the template's turn
    markers included) where the row has observations."""
    has_obs = ro.observation_mask.any(-1).tolist()
    return [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=not obs)
            for ids, mask, obs in zip(ro.completion_ids, ro.context_mask, has_obs, strict=True)]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def score(tasks: list[Task | None], texts: list[str], examples: list[Example], row_task: torch.Tensor,
          timeout: float | None = None,
          failures: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """(rewards (N,) float32, {task name: what went wrong}). A verifier that raises (SystemExit included), takes
    longer than `timeout` seconds or returns something that is not a number, or not a finite float32, leaves those
    rewards NaN (unscorable: counted, advantage 0) and says why; one that raises on some completions only is asked
    again one completion at a time, so that only those are NaN (`unigrad.tasks.guard`). `failures` collects the
    completions scored as failed, by task and reason, as metrics ("rewards/failed/TASK/REASON": count)."""
    rewards = torch.full((len(texts),), float("nan"))
    errors: dict[str, str] = {}
    for k, task in enumerate(tasks):
        rows = torch.nonzero(row_task == k).flatten().tolist()
        if not rows or task is None:  # None: rows scored elsewhere (a multi-turn task's episodes)
            continue
        values, error, reasons = _verify(task, [texts[r] for r in rows], [examples[r] for r in rows], timeout)
        if failures is not None:
            for reason, count in reasons.items():
                key = f"rewards/failed/{task.name}/{reason}"
                failures[key] = failures.get(key, 0.0) + count
        if error is None and getattr(task, "last_error", None):  # a reward function that raised, caught inside
            error = task.last_error
        if values is None:
            errors[task.name] = error
            warnings.warn(f"verifier of task {task.name!r}: {error}; its rewards this step are NaN", stacklevel=2)
            continue
        if len(values) != len(rows):
            raise ValueError(
                f"verifier of task {task.name!r} returned {len(values)} rewards for {len(rows)} completions"
            )
        converted = []
        for v in values:
            try:
                converted.append(float("nan") if v is None else float(v))
            except (TypeError, ValueError):
                converted.append(float("nan"))
                error = error or f"returned a {type(v).__name__} ({v!r:.40}) where a number was expected"
            if abs(converted[-1]) > FLOAT32_MAX:  # inf, or a finite reward that float32 cannot hold
                error = error or f"returned {converted[-1]:g}, beyond the float32 range of rewards (|r| <= 3.4e38)"
                converted[-1] = float("nan")
        rewards[rows] = torch.tensor(converted)
        if error is not None:
            errors[task.name] = error
    return rewards, errors


def _verify(task: Task, texts: list[str], examples: list[Example], timeout: float | None):
    """(values, None or what it raised on some completions, {reason: count}) or (None, the error, {}):
    `unigrad.tasks.guard.verify_guarded` in a thread, so that a verifier that hangs or calls sys.exit cannot take the
    step with it (a hung one is left running in the background; its result is ignored). A `VerifierError` (a reward
    function that returns a dict, say: its own bug, whatever the completions) is raised here, ending the run."""
    import threading

    from unigrad.tasks.guard import VerifierError, verify_guarded

    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["verified"] = verify_guarded(task, texts, examples)
        except VerifierError as err:
            result["fatal"] = err
        except BaseException as err:  # noqa: BLE001 - SystemExit too: a user verifier must not end the run
            result["error"] = f"raised {type(err).__name__}: {err}"

    worker = threading.Thread(target=call, name=f"verify-{task.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return None, f"took longer than reward_timeout={timeout:g} s", {}
    if "fatal" in result:
        raise result["fatal"]
    if "error" in result:
        return None, result["error"], {}
    verified = result["verified"]
    return verified.values, verified.error, verified.failures
