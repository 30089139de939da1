"""The learning half of a step: a `Batch` in, the update made and its metrics out.

One loop, one code path for every loss component: for each micro-batch of the plan (`unigrad.train.plan`), the
learner's log-probs under the sampling temperature, the reference's when the component's objective has beta > 0,
`policy_loss` with the component's objective and its whole-batch normalisers, backward with its
coefficient. Per-task gradients are collected at the end of each accounting group. Then the clip and the optimizer
step, `num_iterations` times over the same batch:
- with num_iterations = 1 the "old" log-probs are the learner's own, detached (no extra pass);
- with num_iterations > 1 they are the detached log-probs of the first iteration, which ran before any update.
The mismatch metrics compare the engine's log-probs of the sampled rows with the learner's of the first iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from unigrad.diagnostics.mismatch import mismatch_metrics
from unigrad.objective import LossInputs, policy_loss
from unigrad.train.batch import Batch, LossComponent
from unigrad.train.distributed import Distributed
from unigrad.train.learner import Learner
from unigrad.train.metrics import merge_loss_metrics
from unigrad.train.plan import aligned_plan, micro_batch_plan


@dataclass
class LearnSettings:
    """What `learn` needs besides the batch (fixed for a run)."""

    micro_batch_size: int
    num_iterations: int = 1
    grad_norm_cap: float | None = None  # skip a step whose pre-clip grad norm exceeds this


@dataclass
class _Pass:
    """One micro-batch's learner pass, as the loop needs it."""

    component: LossComponent
    rows: torch.Tensor
    old: torch.Tensor | None = None  # first iteration's log-probs (num_iterations > 1)
    ref: torch.Tensor | None = None  # the reference's log-probs (beta > 0), computed once


def learn(batch: Batch, learner: Learner, settings: LearnSettings, dist: Distributed,
          task_gradients=None, task_names: list[str] | None = None, measure_from: int = 0) -> dict[str, float]:
    """Train on `batch` (num_iterations optimizer steps); returns the step's learner metrics.
    `task_gradients` (unigrad.diagnostics.task_gradients) measures per-task gradients, named by `task_names`."""
    t0 = time.perf_counter()
    plan = micro_batch_plan(batch, settings.micro_batch_size, per_task=task_gradients is not None)
    if learner.sharded:  # every learner pass is a collective: all processes run the same sequence
        plan = aligned_plan(plan, dist)
    passes = [None if rows is None else _Pass(batch.components[c], rows) for _, c, rows in plan]
    measured = [(torch.zeros(c.sequences.completion_ids.shape), torch.zeros(c.sequences.completion_ids.shape))
                if c.sampled else None for c in batch.components]  # (n, T) learner log-probs and entropy
    loss_metrics, grad_norms, grad_metrics, statuses, t_optim = [], [], {}, [], 0.0
    nonfinite_loss, idle_passes = False, 0
    for iteration in range(settings.num_iterations):
        for i, (group, c, rows) in enumerate(plan):
            if rows is None:  # sharded: another process has a micro-batch here
                learner.idle_pass()
                idle_passes += 1
            else:
                out = _forward_backward(passes[i], batch, learner, keep_old=settings.num_iterations > 1)
                nonfinite_loss |= not torch.isfinite(out["loss"]).item()
                if iteration == 0 and measured[c] is not None:
                    width = out["logp"].shape[1]
                    measured[c][0][rows, :width], measured[c][1][rows, :width] = out["logp"], out["entropy"]
                loss_metrics.append({f"{passes[i].component.name}/{k}": v for k, v in out["metrics"].items()})
            if task_gradients is not None and (i + 1 == len(plan) or plan[i + 1][0] != group):
                n_rows = sum(len(r) for g, _, r in plan if g == group and r is not None)
                task_gradients.collect(task_names[group[0]], group[1], n_rows)
        if task_gradients is not None:
            measured_grads = task_gradients.finish()  # param.grad = sum_k g_k (or the balanced sum), over processes
            grad_metrics = grad_metrics or measured_grads  # the first iteration's: the fresh batch
        elif not learner.sharded:  # sharded: FSDP has summed them in the backward passes
            dist.sum_gradients(learner.params)
        t1 = time.perf_counter()
        norm, status = learner.clip_and_step(settings.grad_norm_cap)
        grad_norms.append(norm)
        statuses.append(status)
        t_optim += time.perf_counter() - t1

    metrics = merge_loss_metrics(sum(dist.gather(loss_metrics), []), settings.num_iterations)
    metrics.update(grad_metrics)
    metrics.update(_mismatch(batch, measured, dist))
    if learner.sharded:  # padding passes, summed over processes (what unequal micro-batch counts cost)
        metrics["sharding/idle_passes"] = dist.sum_float(float(idle_passes))
    metrics["loss"] = sum(c.coef * metrics.get(f"{c.name}/loss", 0.0) for c in batch.components)
    metrics.update({
        "grad_norm": grad_norms[-1], "grad_norm/max": max(grad_norms),
        "skipped/nonfinite": float(statuses.count("nonfinite")),
        "skipped/nonfinite_loss": float(dist.sum_float(float(nonfinite_loss)) > 0),
        "skipped/grad_cap": float(statuses.count("grad_cap")),
        "lr": learner.lr, "time/learner": time.perf_counter() - t0 - t_optim, "time/optimizer": t_optim,
    })
    return metrics


def _forward_backward(p: _Pass, batch: Batch, learner: Learner, keep_old: bool) -> dict:
    """One micro-batch: log-probs, loss, backward. Returns the loss, its metrics and the (detached, CPU)
    log-probs and entropy of the pass."""
    device = learner.device  # bookkeeping stays on the CPU; each micro-batch's loss is formed here
    comp, rows = p.component, p.rows
    obj = comp.objective
    mb = comp.sequences.rows(rows).trimmed().to(device)  # (b, T'), T' <= T: this micro-batch's own padding only
    width = mb.completion_ids.shape[1]
    logp, entropy = learner.logprobs(mb, batch.temperature)  # (b, T') each
    if obj.beta > 0 and p.ref is None:
        p.ref = learner.reference_logprobs(mb, batch.temperature)
    off = comp.off_policy
    out = policy_loss(LossInputs(
        logp, mb.completion_mask, comp.advantages[rows].to(device), old_logprobs=p.old,
        infer_logprobs=comp.infer_logprobs[rows, :width].to(device) if obj.needs_infer_logprobs else None,
        ref_logprobs=p.ref, entropy=entropy if comp.sampled else None,
        off_policy_mask=off[rows, None].to(device) & mb.completion_mask if off is not None else None,
        max_length=batch.max_length if comp.sampled else None,
        num_tokens=comp.normalisers.num_tokens, num_sequences=comp.normalisers.num_sequences), obj)
    (comp.coef * out.loss).backward()
    if keep_old and p.old is None:
        p.old = logp.detach()
    return {"loss": out.loss, "metrics": out.metrics, "logp": logp.detach().cpu(), "entropy": entropy.detach().cpu()}


def _mismatch(batch: Batch, measured: list, dist: Distributed) -> dict[str, float]:
    """The engine's log-probs against the learner's, on the engine's own samples (gathered over processes)."""
    for comp, pair in zip(batch.components, measured, strict=True):
        if pair is None or comp.infer_logprobs is None:
            continue
        mask = comp.sequences.completion_mask
        if comp.off_policy is not None:
            mask = mask & ~comp.off_policy[:, None]
        mask = dist.cat(mask)
        if mask.any():
            return mismatch_metrics(dist.cat(pair[0]), dist.cat(comp.infer_logprobs), mask,
                                    entropy=dist.cat(pair[1]), low=comp.objective.icepop_low,
                                    high=comp.objective.icepop_high)
    return {}
