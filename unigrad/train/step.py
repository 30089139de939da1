"""One training step, top to bottom.

    task sampler -> G rollouts per prompt -> verifiers -> advantages -> hybrid switch (HPT)
    -> learner log-probs -> reference log-probs (beta > 0 only) -> compute_policy_loss
    -> grad clip -> optimizer step -> weights to the rollout engine

Departures from the textbook loop, and why:
- On-policy (num_iterations = 1) the "old" log-probs are the learner's own, detached: no
  second forward pass. With num_iterations > 1 they are the detached log-probs of the first
  iteration, which ran before any update (still no extra pass).
- The behaviour correction (TIS / IcePop) uses the rollout engine's log-probs, which differ
  from the learner's when the engine runs in another dtype.
- Normalisers (tokens, sequences, L_max) are computed once over the whole step's batch and
  passed to every micro-batch, so micro-batching never changes the gradient; HPT's SFT and RL
  parts each have their own.
- Per-task gradient accounting (multi-task runs) only regroups the micro-batches, by task (and by half on
  the steps that measure the cross term), and takes each group's gradient out of param.grad
  (unigrad.diagnostics.task_gradients); the
  `balanced` sampler rescales those before the clip.
- A prompt's G rows share one forward pass of the prompt in the learner (its keys and values are
  expanded to the rows; unigrad.rollout.logprobs): same gradient, about 1/G of the prompt's cost.
  Micro-batches keep a prompt's rows together for this.
- Over several processes (unigrad.train.distributed) each takes a block of the step's prompts;
  rewards are gathered for the advantages, normalisers and gradients are summed, and metrics come
  from gathered data, so N processes compute what one process computes. With one process every
  `dist` call is a no-op.
- The mismatch metrics compare the engine's log-probs with the learner's first-iteration ones,
  which the loss computes anyway.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from unigrad.diagnostics.mismatch import mismatch_metrics
from unigrad.diagnostics.task_gradients import TaskGradients
from unigrad.objective import Objective, batch_normalisers, compute_advantages, compute_policy_loss
from unigrad.objective.aggregation import Normalisers
from unigrad.objective.hybrid import hpt_switch
from unigrad.rollout.base import Rollout, RolloutEngine, SamplingParams, prompt_stream_seeds
from unigrad.tasks.base import Example, Task
from unigrad.train.batching import SequenceBatch, length_grouped_micro_batches
from unigrad.train.demonstrations import check_demonstrations, demonstration_batch, no_rollout, with_demonstrations
from unigrad.train.distributed import SINGLE, Distributed
from unigrad.train.learner import Learner
from unigrad.train.metrics import merge_loss_metrics


@dataclass
class StepContext:
    """Everything a step needs; built once by `unigrad.train.run`."""

    tokenizer: Any
    learner: Learner
    engine: RolloutEngine
    tasks: list[Task]
    pools: list[list[Example]]  # training examples per task
    pool_prompt_ids: list[list[list[int]]]  # their chat-templated token ids
    sampler: Any  # TaskSampler
    objective: Objective
    sampling: SamplingParams
    prompts_per_step: int
    num_generations: int
    micro_batch_size: int
    num_iterations: int = 1
    hybrid_gamma: float | None = None  # None: no HPT switch
    demonstrations_only: bool = False  # objective=sft: train on every prompt's demonstration, generate nothing
    guidance: bool = False  # LUFFY: each group's last row is the prompt's demonstration (off-policy tokens)
    rl_coef: float = 1.0
    sft_coef: float = 1.0
    seed: int = 0
    samples_per_step: int = 0
    task_gradients: TaskGradients | None = None  # per-task gradient accounting (None = off)
    measure_mismatch: bool = True  # mismatch/ metrics from the engine's log-probs
    grad_norm_cap: float | None = None  # skip a step whose pre-clip grad norm exceeds this
    dist: Distributed = SINGLE  # data-parallel processes (unigrad.train.distributed); one by default
    timers: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def train_step(ctx: StepContext, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run one step; returns (metrics for metrics.jsonl, sample records for samples.jsonl)."""
    t_start = time.perf_counter()
    names = [t.name for t in ctx.tasks]
    dist = ctx.dist

    # 1. Prompts: the sampler picks (task, example) pairs, the same on every process; each process takes its block.
    picks = ctx.sampler.sample(ctx.prompts_per_step)
    lo, hi = dist.block(len(picks))
    # For per-task gradient accounting: each task's prompts in two halves on the steps that measure the cross term.
    prompt_half = torch.zeros(len(picks), dtype=torch.long)
    if ctx.task_gradients is not None and ctx.task_gradients.splits_halves(step):
        prompt_half = task_halves(torch.tensor([t for t, _ in picks]))
    prompt_half = prompt_half[lo:hi]
    picks = picks[lo:hi]
    examples = [ctx.pools[t][i] for t, i in picks]
    prompt_task = torch.tensor([t for t, _ in picks])  # (P,) this process's prompts

    # 2. Rollouts: G completions per prompt, with the engine's own log-probs. Each prompt has its own random
    # stream, the one it has in a single process. With guidance (LUFFY) G - 1 are sampled and the prompt's
    # demonstration is the G-th; objective=sft samples nothing.
    t0 = time.perf_counter()
    step_seed = ctx.seed * 1_000_003 + step
    sampling = SamplingParams(**{**ctx.sampling.__dict__, "seed": step_seed,
                                 "prompt_seeds": prompt_stream_seeds(step_seed, hi - lo, offset=lo)})
    prompt_ids = [ctx.pool_prompt_ids[t][i] for t, i in picks]
    if ctx.demonstrations_only:
        ro: Rollout = no_rollout()
    else:
        ro = ctx.engine.generate(prompt_ids, ctx.num_generations - ctx.guidance, sampling).to("cpu")
    row_off_policy = torch.zeros(ro.num_sequences, dtype=torch.bool)  # (N,) demonstration rows (LUFFY)
    if ctx.guidance:
        check_demonstrations(examples, "LUFFY-style guidance")
        ro, row_off_policy = with_demonstrations(ro, demonstration_batch(ctx.tokenizer, prompt_ids, examples),
                                                 ctx.tokenizer.pad_token_id)
    t_rollout = time.perf_counter() - t0

    # 3. Rewards from the verifiers (NaN = unscorable; counted, advantage 0). Demonstration rows are scored too.
    t0 = time.perf_counter()
    texts = decode_completions(ctx.tokenizer, ro)
    row_task = prompt_task[ro.group_ids]  # (N,)
    rewards = score(ctx.tasks, texts, [examples[g] for g in ro.group_ids.tolist()], row_task)
    t_reward = time.perf_counter() - t0

    # 4. Advantages, over the whole batch (rewards of all processes).
    obj = ctx.objective
    all_rewards, all_row_task = dist.cat(rewards), dist.cat(row_task)
    all_adv = compute_advantages(all_rewards, dist.cat(ro.group_ids + lo), obj.advantage, task_ids=all_row_task,
                                 per_task=obj.per_task_advantage, eps=obj.advantage_eps)  # (N_all,)
    first_row = lo * ctx.num_generations
    adv = all_adv[first_row:first_row + len(rewards)]  # (N,) this process's rows

    # 5. Hybrid switch (HPT): prompts the model fails go to SFT on their demonstration (objective=sft: all).
    num_prompts = len(examples)
    if ctx.demonstrations_only:
        sft_prompt = torch.ones(num_prompts, dtype=torch.bool)
    elif ctx.hybrid_gamma is not None:
        sft_prompt = hpt_switch(rewards, ro.group_ids, num_prompts, ctx.hybrid_gamma)  # (P,)
    else:
        sft_prompt = torch.zeros(num_prompts, dtype=torch.bool)
    rl_rows = torch.nonzero(~sft_prompt[ro.group_ids]).flatten()  # rows trained by RL
    rl = SequenceBatch(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask).rows(rl_rows)
    rl_adv, rl_infer, rl_off = adv[rl_rows], ro.infer_logprobs[rl_rows], row_off_policy[rl_rows]
    sft_prompts = torch.nonzero(sft_prompt).flatten().tolist()
    sft = None
    if sft_prompts:
        check_demonstrations([examples[p] for p in sft_prompts], "objective=sft" if ctx.demonstrations_only else "HPT")
        sft = demonstration_batch(ctx.tokenizer, [prompt_ids[p] for p in sft_prompts],
                                  [examples[p] for p in sft_prompts])

    # 6-9. Learner passes, loss, backward, clip, optimizer step (num_iterations times). Micro-batches
    # never mix accounting groups: one group per task (per task and half on the steps that measure the
    # cross term) when per-task gradients are measured, else one group. Normalisers are global to the
    # step, so the grouping does not change the gradient.
    t0 = time.perf_counter()
    temperature = ctx.sampling.temperature if ctx.sampling.temperature > 0 else 1.0
    device = ctx.learner.device  # bookkeeping stays on the CPU; each micro-batch's loss is formed here
    # Normalisers of the whole batch: summed over processes before any loss is formed.
    rl_norm = global_normalisers(dist, batch_normalisers(rl.completion_mask, obj) if len(rl) else None)
    sft_norm = global_normalisers(dist, batch_normalisers(sft.completion_mask, "sft") if sft is not None else None)
    chunks = micro_batch_plan(ctx, rl, sft, ro.group_ids[rl_rows], torch.tensor(sft_prompts, dtype=torch.long),
                              prompt_task, prompt_half)
    if ctx.learner.sharded:  # every learner pass is a collective: all processes run the same sequence
        chunks = aligned_plan(chunks, dist)
    train_logp = torch.zeros(rl.completion_ids.shape)  # (N_rl, T) learner log-probs, for the mismatch metrics
    train_entropy = torch.zeros(rl.completion_ids.shape)
    old = [None] * len(chunks)  # filled from the first iteration when num_iterations > 1
    ref = [None] * len(chunks)
    loss_metrics, grad_norms, grad_metrics, statuses, t_optim = [], [], {}, [], 0.0
    nonfinite_loss, idle_passes = False, 0
    for iteration in range(ctx.num_iterations):
        for c, (group, kind, rows) in enumerate(chunks):
            if rows is None:  # sharded: another process has a micro-batch here
                ctx.learner.idle_pass()
                idle_passes += 1
            elif kind == "rl":
                mb = rl.rows(rows).trimmed().to(device)  # (b, T'), T' <= T: this micro-batch's own padding only
                width = mb.completion_ids.shape[1]
                logp, entropy = ctx.learner.logprobs(mb, temperature)  # (b, T') each
                if obj.beta > 0 and ref[c] is None:
                    ref[c] = ctx.learner.reference_logprobs(mb, temperature)
                out = compute_policy_loss(
                    logp, mb.completion_mask, rl_adv[rows].to(device), obj, old_logprobs=old[c],
                    infer_logprobs=rl_infer[rows, :width].to(device) if obj.needs_infer_logprobs else None,
                    ref_logprobs=ref[c], max_length=ctx.sampling.max_new_tokens, num_tokens=rl_norm.num_tokens,
                    num_sequences=rl_norm.num_sequences, entropy=entropy,
                    off_policy_mask=rl_off[rows, None].to(device) & mb.completion_mask if ctx.guidance else None,
                )
                (ctx.rl_coef * out.loss).backward()
                nonfinite_loss |= not torch.isfinite(out.loss).item()
                if iteration == 0:
                    train_logp[rows, :width], train_entropy[rows, :width] = logp.detach().cpu(), entropy.detach().cpu()
                    if ctx.num_iterations > 1:
                        old[c] = logp.detach()
                loss_metrics.append({f"rl/{k}": v for k, v in out.metrics.items()})
            else:
                mb = sft.rows(rows).trimmed().to(device)
                logp, entropy = ctx.learner.logprobs(mb, temperature)
                out = compute_policy_loss(logp, mb.completion_mask, torch.ones(len(rows), device=device), "sft",
                                          num_tokens=sft_norm.num_tokens, num_sequences=sft_norm.num_sequences)
                (ctx.sft_coef * out.loss).backward()
                nonfinite_loss |= not torch.isfinite(out.loss).item()
                loss_metrics.append({f"sft/{k}": v for k, v in out.metrics.items()})
            if ctx.task_gradients is not None and (c + 1 == len(chunks) or chunks[c + 1][0] != group):
                n_rows = sum(len(r) for g, _, r in chunks if g == group and r is not None)
                ctx.task_gradients.collect(names[group[0]], group[1], n_rows)
        if ctx.task_gradients is not None:
            measured = ctx.task_gradients.finish()  # param.grad = sum_k g_k (or the balanced sum), over processes
            grad_metrics = grad_metrics or measured  # the first iteration's: the fresh batch
        elif not ctx.learner.sharded:  # sharded: FSDP has summed them in the backward passes
            dist.sum_gradients(ctx.learner.params)
        t1 = time.perf_counter()
        norm, status = ctx.learner.clip_and_step(ctx.grad_norm_cap)
        grad_norms.append(norm)
        statuses.append(status)
        t_optim += time.perf_counter() - t1
    t_learner = time.perf_counter() - t0 - t_optim

    # 10. The rollout engine takes the new weights.
    t0 = time.perf_counter()
    ctx.engine.load_weights(ctx.learner.full_state_dict())
    t_sync = time.perf_counter() - t0

    # Metrics of the whole batch (gathered from every process); rewards, lengths and advantages of the sampled
    # rows only (a demonstration row is not the model's work).
    sampled = ~dist.cat(row_off_policy)
    metrics = step_metrics(names, all_rewards[sampled], all_row_task[sampled],
                           dist.cat(ro.completion_mask.sum(-1))[sampled], dist.cat(ro.prompt_mask.sum(-1))[sampled],
                           dist.cat(ro.truncated)[sampled], dist.cat(sft_prompt), dist.cat(prompt_task),
                           all_adv[sampled])
    if ctx.guidance:
        metrics["guidance/reward"] = all_rewards[~sampled].nanmean().item()
        metrics["guidance/advantage"] = all_adv[~sampled].mean().item()
    metrics.update(merge_loss_metrics(sum(dist.gather(loss_metrics), []), ctx.num_iterations))
    metrics.update(grad_metrics)
    rl_mask = dist.cat(rl.completion_mask & ~rl_off[:, None])  # the engine's own samples
    if rl_mask.any() and ctx.measure_mismatch:  # the engine's log-probs against the learner's, same tokens
        metrics.update(mismatch_metrics(dist.cat(train_logp), dist.cat(rl_infer), rl_mask,
                                        entropy=dist.cat(train_entropy), low=obj.icepop_low, high=obj.icepop_high))
    if ctx.learner.sharded:  # padding passes, summed over processes (what unequal micro-batch counts cost)
        metrics["sharding/idle_passes"] = dist.sum_float(float(idle_passes))
    metrics["loss"] = ctx.rl_coef * metrics.get("rl/loss", 0.0) + ctx.sft_coef * metrics.get("sft/loss", 0.0)
    metrics.update({
        "grad_norm": grad_norms[-1], "grad_norm/max": max(grad_norms),
        "skipped/nonfinite": float(statuses.count("nonfinite")),
        "skipped/nonfinite_loss": float(dist.sum_float(float(nonfinite_loss)) > 0),
        "skipped/grad_cap": float(statuses.count("grad_cap")),
        "lr": ctx.learner.lr, "time/rollout": t_rollout, "time/reward": t_reward, "time/learner": t_learner,
        "time/optimizer": t_optim, "time/weight_sync": t_sync, "time/step": time.perf_counter() - t_start,
    })
    samples = [
        {"step": step, "task": examples[g].task, "prompt": examples[g].prompt, "completion": texts[r],
         "reward": None if math.isnan(rewards[r].item()) else rewards[r].item(), "answer": examples[g].answer}
        for r, g in list(enumerate(ro.group_ids.tolist()))[:: max(1, ctx.num_generations)][: ctx.samples_per_step]
    ]
    return metrics, samples


def task_halves(prompt_task: torch.Tensor) -> torch.Tensor:
    """(P,) half (0 or 1) of each prompt of the step: each task's prompts dealt alternately, in order; -1 for
    the prompt of a task that has only one (its rows are dealt instead)."""
    half = torch.zeros(len(prompt_task), dtype=torch.long)
    for k in prompt_task.unique().tolist():
        prompts = torch.nonzero(prompt_task == k).flatten()
        half[prompts[1::2]] = 1
        if len(prompts) == 1:
            half[prompts] = -1
    return half


def micro_batch_plan(ctx: StepContext, rl: SequenceBatch, sft: SequenceBatch | None, rl_prompt: torch.Tensor,
                     sft_prompt: torch.Tensor, prompt_task: torch.Tensor,
                     prompt_half: torch.Tensor) -> list[tuple[Any, str, torch.Tensor]]:
    """Micro-batches as (group, "rl" | "sft", row indices), consecutive per group.

    Without per-task gradients there is one group (None). With them a group is (task index, half), the
    halves from `task_halves` over the whole step's prompts (so processes agree), so the two halves are
    disjoint samples of the task for the cross estimate; on steps without the cross term every half is 0.
    """
    rl_half = torch.zeros(len(rl_prompt), dtype=torch.long)
    sft_half = torch.zeros(len(sft_prompt), dtype=torch.long)
    if ctx.task_gradients is None:
        groups = [(None, torch.arange(len(rl_prompt)), torch.arange(len(sft_prompt)))]
    else:
        row_prompt = torch.cat([rl_prompt, sft_prompt])
        half = prompt_half[row_prompt].clone()
        row_task = prompt_task[row_prompt]
        for k in row_task[half < 0].unique().tolist():  # rows of a task's only prompt: dealt alternately
            rows = torch.nonzero(row_task == k).flatten()
            half[rows] = 0
            half[rows[1::2]] = 1
        rl_half, sft_half = half[: len(rl_prompt)], half[len(rl_prompt):]
        rl_task, sft_task = prompt_task[rl_prompt], prompt_task[sft_prompt]
        groups = [((k, h), torch.nonzero((rl_task == k) & (rl_half == h)).flatten(),
                   torch.nonzero((sft_task == k) & (sft_half == h)).flatten())
                  for k in row_task.unique().tolist() for h in (0, 1)]
    plan = []
    for group, rl_idx, sft_idx in groups:
        if len(rl_idx):  # a prompt's G rows stay together: the learner runs their shared prompt once
            plan += [(group, "rl", rl_idx[r]) for r in length_grouped_micro_batches(
                rl.rows(rl_idx), ctx.micro_batch_size, groups=rl_prompt[rl_idx])]
        if sft is not None and len(sft_idx):
            plan += [(group, "sft", sft_idx[r]) for r in length_grouped_micro_batches(sft.rows(sft_idx),
                                                                                      ctx.micro_batch_size)]
    return plan


def aligned_plan(plan: list[tuple[Any, str, torch.Tensor]], dist: Distributed) -> list[tuple[Any, str, Any]]:
    """`plan` padded so that every process runs the same sequence of (group, kind) passes: each (group, kind) gets
    as many micro-batches as the process with most of them has, the missing ones as None (an idle pass). Groups in
    task order, RL before SFT, as `micro_batch_plan` orders them."""
    def order(key):
        group, kind = key
        return (-1, -1) if group is None else group, kind != "rl"

    counts: dict[Any, int] = {}
    for keys in dist.gather([(g, k) for g, k, _ in plan]):
        for key in set(keys):
            counts[key] = max(counts.get(key, 0), keys.count(key))
    mine: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for group, kind, rows in plan:
        mine[(group, kind)].append(rows)
    out: list[tuple[Any, str, Any]] = []
    for key in sorted(counts, key=order):
        out += [(*key, rows) for rows in mine[key]] + [(*key, None)] * (counts[key] - len(mine[key]))
    return out


def decode_completions(tokenizer, ro: Rollout) -> list[str]:
    return [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(ro.completion_ids, ro.completion_mask, strict=True)]


def score(tasks: list[Task], texts: list[str], examples: list[Example], row_task: torch.Tensor) -> torch.Tensor:
    """Rewards (N,) float32; a verifier that raises makes its task's rewards NaN (counted, skipped)."""
    rewards = torch.full((len(texts),), float("nan"))
    for k, task in enumerate(tasks):
        rows = torch.nonzero(row_task == k).flatten().tolist()
        if not rows:
            continue
        try:
            values = task.verify([texts[r] for r in rows], [examples[r] for r in rows])
        except Exception as err:  # noqa: BLE001 - a user verifier must not kill the run
            import warnings

            warnings.warn(f"verifier of task {task.name!r} raised {err!r}; its rewards this step are NaN",
                          stacklevel=2)
            continue
        if len(values) != len(rows):
            raise ValueError(
                f"verifier of task {task.name!r} returned {len(values)} rewards for {len(rows)} completions"
            )
        rewards[rows] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return rewards


def global_normalisers(dist: Distributed, local: Normalisers | None) -> Normalisers | None:
    """The whole batch's normalisers: this process's (None = no rows) summed over processes; None if all empty."""
    if not dist.active:
        return local
    local = local or Normalisers(0.0, 0.0)
    total = dist.sum_(torch.tensor([local.num_tokens, local.num_sequences], dtype=torch.float64)).tolist()
    return Normalisers(*total) if total[1] > 0 else None


def step_metrics(names, rewards, row_task, lengths, prompt_lengths, truncated, sft_prompt, prompt_task,
                 adv) -> dict[str, float]:
    """Reward, accuracy, lengths, |advantage| and HPT fractions, overall and per task (rows: (N,) tensors;
    prompts: (P,) tensors)."""
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
