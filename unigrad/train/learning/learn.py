"""The learning half of a step: a `Batch` in, the updates made and their metrics out.

Three policies take part (named as in decoupled PPO, AReaL arXiv 2505.24298):
- behaviour: the rollout engine's, whose log-probs it reported when it sampled the rows (`infer_logprobs`);
- proximal: the learner's weights before this batch's first update, whose log-probs anchor the clip;
- current: the weights being trained.
The objective's correction (TIS, IcePop, ...) weighs proximal against behaviour; its stabiliser clips current
against proximal.

The batch is trained in `num_iterations` epochs of `mini_batches` optimizer steps each. Every optimizer step takes
a disjoint mini-batch of the step's prompts (groups whole; `unigrad.train.learning.plan.mini_batch_prompts`,
reshuffled each
epoch from a seed) and divides by that mini-batch's own normalisers. For each micro-batch of its plan: the
learner's log-probs under the sampling temperature, the reference's when the component's objective has beta > 0,
`policy_loss`, backward with the component's coefficient; per-task gradients are collected at the end of each
accounting group; then the clip and the optimizer step.

The proximal log-probs cost nothing when every row is first trained before any update (one mini-batch): the first
optimizer step's own pass is then the proximal pass, and with one epoch the loss takes it as its own detached copy
(ratio 1). With several mini-batches, the rows of all but the first are scored once by a no-grad pass before the
first update. The mismatch metrics compare the engine's log-probs of the sampled rows with the proximal ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from unigrad.diagnostics.mismatch import mismatch_metrics
from unigrad.diagnostics.routing import learner_routing_agreement
from unigrad.objective import LossInputs, policy_loss
from unigrad.objective.aggregation import Normalisers
from unigrad.rollout.episodes import turn_index
from unigrad.train.batch import Batch, LossComponent, rows_normalisers
from unigrad.train.learning.learner import Learner
from unigrad.train.learning.metrics import merge_loss_metrics
from unigrad.train.learning.plan import aligned_plan, component_rows, micro_batch_plan, mini_batch_prompts
from unigrad.train.lifecycle.distributed import Distributed


@dataclass
class LearnSettings:
    """What `learn` needs besides the batch (fixed for a run, except the shuffle seed)."""

    micro_batch_size: int
    num_iterations: int = 1  # epochs over the batch
    grad_norm_cap: float | None = None  # skip an optimizer step whose pre-clip grad norm exceeds this
    mini_batches: int = 1  # optimizer steps per epoch, each on 1/mini_batches of the prompts
    shuffle_seed: int = 0  # seeds the deal of prompts into mini-batches (with the epoch)
    sample_gradients: int = 0  # rows per task whose own gradient norm is measured this step (0 = none)


class RowCache:
    """Per-row (n, T) values of one loss component, filled row by row (log-probs of a policy that does not change
    during the step: the proximal or the reference)."""

    def __init__(self, shape: torch.Size):
        self.values = torch.zeros(shape)
        self.filled = torch.zeros(shape[0], dtype=torch.bool)

    def get(self, rows: torch.Tensor, width: int, device) -> torch.Tensor | None:
        """(b, width) values of `rows`, or None unless every one of them is filled."""
        return self.values[rows, :width].to(device) if bool(self.filled[rows].all()) else None

    def put(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.values[rows, :values.shape[1]] = values.detach().float().cpu()
        self.filled[rows] = True


@dataclass(frozen=True)
class _Cached:
    """The cached log-probs of one component a loss pass reads: the proximal policy's (None: the pass needs none,
    or it is the proximal pass itself) and the KL reference's (computed and kept where missing)."""

    proximal: RowCache | None
    reference: RowCache


def _own_count(comp, rows: torch.Tensor) -> float:
    """What the component's objective normalises by, counted over `rows`: tokens for token-mean aggregation,
    else sequences (Dr. GRPO's constant L_max cancels in a ratio of counts)."""
    if comp.objective.normalises_by_tokens:
        return float(comp.sequences.completion_mask[rows].sum())
    return float(len(rows))


@dataclass
class _Progress:
    """What `learn`'s optimizer steps gather: the row caches they fill, and what their metrics are made of."""

    proximal: list[RowCache]  # the proximal log-probs of every row, per component
    entropy: list[RowCache | None]  # the entropy at the proximal weights (sampled components)
    reference: list[RowCache]  # the KL reference's log-probs
    needs_proximal: bool  # some row is trained after an update (several epochs or mini-batches)
    loss_metrics: list[dict[str, float]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    grad_metrics: dict[str, float] = field(default_factory=dict)  # the first optimizer step's per-task gradients
    statuses: list[str] = field(default_factory=list)
    t_optim: float = 0.0
    nonfinite_loss: bool = False
    idle_passes: int = 0
    updates: int = 0
    whole_plan: list | None = None  # one mini-batch: the same micro-batch plan every epoch


@dataclass
class _Learning:
    """The fixed inputs of one `learn` call."""

    batch: Batch
    learner: Learner
    settings: LearnSettings
    dist: Distributed
    task_gradients: object | None
    task_names: list[str] | None


def learn(batch: Batch, learner: Learner, settings: LearnSettings, dist: Distributed,
          task_gradients=None, task_names: list[str] | None = None) -> dict[str, float]:
    """Train on `batch` (num_iterations x mini_batches optimizer steps); returns the step's learner metrics.
    `task_gradients` (unigrad.diagnostics.task_gradients) measures per-task gradients, named by `task_names`."""
    t0 = time.perf_counter()
    run = _Learning(batch, learner, settings, dist, task_gradients, task_names)
    epochs, pieces = settings.num_iterations, min(settings.mini_batches, batch.total_prompts)  # dynamic sampling
    # can leave a step with fewer prompts than mini-batches
    progress = _row_caches(batch, needs_proximal=epochs > 1 or pieces > 1)
    schedule = [[batch.local_prompts(p) for p in mini_batch_prompts(
        batch.total_prompts, pieces, settings.shuffle_seed * 1_000_003 + epoch)] if pieces > 1 else [None]
        for epoch in range(epochs)]
    t_proximal = _proximal_of_later_mini_batches(run, schedule, progress) if pieces > 1 else 0.0
    before_updates = _measured_before_updates(run, progress)
    for epoch_pieces in schedule:
        for prompts in epoch_pieces:
            _optimizer_step(run, prompts, progress)
    metrics = _learn_metrics(run, progress, epochs, before_updates)
    metrics.update({"lr": learner.lr, "time/learner": time.perf_counter() - t0 - progress.t_optim,
                    "time/optimizer": progress.t_optim})
    if progress.updates > 1:
        metrics.update({"grad_norm/mean": sum(progress.grad_norms) / progress.updates,
                        "optimizer_steps": float(progress.updates)})
    if pieces > 1:
        metrics["time/proximal"] = t_proximal
    return metrics


def _row_caches(batch: Batch, needs_proximal: bool) -> _Progress:
    """The proximal log-probs of every row (the loss's "old" when a row is trained after an update; always the
    learner's side of the mismatch metrics), the entropy at the same weights, and the reference's log-probs."""
    shapes = [c.sequences.completion_ids.shape for c in batch.components]
    return _Progress(proximal=[RowCache(s) for s in shapes],
                     entropy=[RowCache(s) if c.sampled else None for c, s in zip(batch.components, shapes,
                                                                                   strict=True)],
                     reference=[RowCache(s) for s in shapes], needs_proximal=needs_proximal)


def _proximal_of_later_mini_batches(run: _Learning, schedule: list, progress: _Progress) -> float:
    """The proximal log-probs of the rows the first optimizer step does not train; returns the seconds taken."""
    t1 = time.perf_counter()
    first = component_rows(run.batch, schedule[0][0])
    rest = [torch.nonzero(~torch.isin(torch.arange(len(c)), f)).flatten()
            for c, f in zip(run.batch.components, first, strict=True)]
    _proximal_pass(run.batch, run.learner, rest, run.settings.micro_batch_size, progress.proximal, progress.entropy)
    return time.perf_counter() - t1


def _measured_before_updates(run: _Learning, progress: _Progress) -> dict[str, float]:
    """What is measured on the weights the rows were sampled from: per-sample gradient norms, and (MoE batches with
    the engine's routing record) how often the learner's routers agree with it."""
    metrics = {}
    if run.settings.sample_gradients and run.task_names:
        t1 = time.perf_counter()
        metrics = _sample_gradients(run.batch, run.learner, run.settings.sample_gradients, run.task_names,
                                    progress.reference, run.dist)
        metrics["time/sample_gradients"] = time.perf_counter() - t1
    metrics.update(learner_routing_agreement(run.batch, run.learner, run.settings.micro_batch_size, run.dist))
    return metrics


def _optimizer_step(run: _Learning, prompts, progress: _Progress) -> None:
    """One optimizer step on the mini-batch `prompts` (None: the whole batch): its micro-batches' backward passes,
    the per-task gradients combined, the clip and the update."""
    comps, learner, dist = run.batch.components, run.learner, run.dist
    plan = _plan(run, prompts, progress)
    normalisers = [c.normalisers for c in comps] if prompts is None else \
        [rows_normalisers(c, rows, dist) for c, rows in zip(comps, component_rows(run.batch, prompts), strict=True)]
    for i, (group, c, rows) in enumerate(plan):
        if rows is None:  # sharded: another process has a micro-batch here
            learner.idle_pass()
            progress.idle_passes += 1
        else:
            _micro_batch(run, c, rows, normalisers[c], progress)
        if run.task_gradients is not None and (i + 1 == len(plan) or plan[i + 1][0] != group):
            entries = [(cc, r) for g, cc, r in plan if g == group and r is not None]
            run.task_gradients.collect(run.task_names[group[0]], group[1], sum(len(r) for _, r in entries),
                                       sum(_own_count(comps[cc], r) for cc, r in entries))
    if run.task_gradients is not None:
        measured_grads = run.task_gradients.finish()  # param.grad = sum_k g_k (or the balanced sum)
        progress.grad_metrics = progress.grad_metrics or measured_grads  # the first optimizer step's: fresh weights
    elif not learner.sharded:  # sharded: FSDP has summed them in the backward passes
        dist.sum_gradients(learner.params)
    t1 = time.perf_counter()
    norm, status = learner.clip_and_step(run.settings.grad_norm_cap)
    progress.grad_norms.append(norm)
    progress.statuses.append(status)
    progress.t_optim += time.perf_counter() - t1
    progress.updates += 1


def _plan(run: _Learning, prompts, progress: _Progress) -> list:
    """The micro-batch plan of a mini-batch (the whole batch's is made once and kept)."""
    plan = progress.whole_plan if prompts is None else None
    if plan is None:
        plan = micro_batch_plan(run.batch, run.settings.micro_batch_size, per_task=run.task_gradients is not None,
                                prompts=prompts)
        if run.learner.sharded:  # every learner pass is a collective: all processes run the same sequence
            plan = aligned_plan(plan, run.dist)
        if prompts is None:
            progress.whole_plan = plan
    return plan


def _micro_batch(run: _Learning, c: int, rows: torch.Tensor, normalisers: Normalisers, progress: _Progress) -> None:
    """Forward and backward of component `c`'s `rows`; before the first update, their proximal values kept."""
    comp = run.batch.components[c]
    cached = _Cached(progress.proximal[c] if progress.needs_proximal else None, progress.reference[c])
    out = _forward_backward(comp, rows, normalisers, run.batch, run.learner, cached)
    progress.nonfinite_loss |= not torch.isfinite(out["loss"]).item()
    if progress.updates == 0:  # weights untouched: this pass is the proximal one
        progress.proximal[c].put(rows, out["logp"])
        if progress.entropy[c] is not None:
            progress.entropy[c].put(rows, out["entropy"])
    progress.loss_metrics.append({f"{comp.name}/{k}": v for k, v in out["metrics"].items()})


def _learn_metrics(run: _Learning, progress: _Progress, epochs: int, before_updates: dict[str, float]
                   ) -> dict[str, float]:
    """The step's learner metrics, in the order they have always been logged (timings added by `learn`)."""
    dist, comps = run.dist, run.batch.components
    metrics = merge_loss_metrics(sum(dist.gather(progress.loss_metrics), []), epochs, progress.updates)
    metrics.update(progress.grad_metrics)
    metrics.update(before_updates)
    metrics.update(_mismatch(run.batch, progress.proximal, progress.entropy, dist))
    if run.learner.sharded:  # padding passes, summed over processes (what unequal micro-batch counts cost)
        metrics["sharding/idle_passes"] = dist.sum_float(float(progress.idle_passes))
    metrics["loss"] = sum(c.coef * metrics.get(f"{c.name}/loss", 0.0) for c in comps)
    metrics.update({
        "grad_norm": progress.grad_norms[-1], "grad_norm/max": max(progress.grad_norms),
        "skipped/nonfinite": float(progress.statuses.count("nonfinite")),
        "skipped/nonfinite_loss": float(dist.sum_float(float(progress.nonfinite_loss)) > 0),
        "skipped/grad_cap": float(progress.statuses.count("grad_cap")),
    })
    return metrics


def _forward_backward(comp: LossComponent, rows: torch.Tensor, normalisers: Normalisers | None, batch: Batch,
                      learner: Learner, cached: _Cached) -> dict:
    """One micro-batch: log-probs, loss, backward. Returns the loss, its metrics and the (detached, CPU)
    log-probs and entropy of the pass."""
    out, logp, entropy = _loss(comp, rows, normalisers, batch, learner, cached)
    (comp.coef * out.loss).backward()
    return {"loss": out.loss, "metrics": out.metrics, "logp": logp.detach().cpu(), "entropy": entropy.detach().cpu()}


def _loss(comp: LossComponent, rows: torch.Tensor, normalisers: Normalisers | None, batch: Batch,
          learner: Learner, cached: _Cached):
    """The objective's loss on `rows` of `comp` (its output, the learner's log-probs and entropy), not yet
    differentiated."""
    device = learner.device  # bookkeeping stays on the CPU; each micro-batch's loss is formed here
    obj = comp.objective
    mb = comp.sequences.rows(rows).trimmed().to(device)  # (b, T'), T' <= T: this micro-batch's own padding only
    width = mb.completion_ids.shape[1]
    logp, entropy = learner.logprobs(mb, batch.temperature)  # (b, T') each
    ref = None
    if obj.beta > 0:
        ref = cached.reference.get(rows, width, device)
        if ref is None:
            ref = learner.reference_logprobs(mb, batch.temperature)
            cached.reference.put(rows, ref)
    off = comp.off_policy
    out = policy_loss(LossInputs(
        logp, mb.completion_mask, comp.advantages[rows].to(device),
        old_logprobs=cached.proximal.get(rows, width, device) if cached.proximal is not None else None,
        infer_logprobs=comp.infer_logprobs[rows, :width].to(device) if obj.needs_infer_logprobs else None,
        ref_logprobs=ref, entropy=entropy if comp.sampled else None,
        off_policy_mask=off[rows, None].to(device) & mb.completion_mask if off is not None else None,
        max_length=batch.max_length if comp.sampled else None,
        num_tokens=normalisers.num_tokens, num_sequences=normalisers.num_sequences), obj)
    return out, logp, entropy


def sample_rows(candidates: torch.Tensor, wanted: int) -> torch.Tensor:
    """`wanted` of `candidates` spread evenly over them (first and last included), all of them if there are fewer."""
    if len(candidates) <= wanted:
        return candidates
    if wanted == 1:
        return candidates[:1]
    return candidates[torch.linspace(0, len(candidates) - 1, wanted).round().long()]


def _sample_gradients(batch: Batch, learner: Learner, wanted: int, task_names: list[str], reference: list[RowCache],
                      dist: Distributed) -> dict[str, float]:
    """Per-sample gradient norms at the step's starting weights: for up to `wanted` rows of each task (spread over
    the task's rows with a non-zero advantage; a row with advantage 0 has no policy gradient), the squared norm of
    the gradient of that row's loss divided by its own normaliser (one sequence, or its tokens with token-mean
    aggregation), so neither how many rows a task has in the step nor the other rows' lengths enter. Logged as
    `grad/<task>/sample_sq_norm` (mean over the rows measured, summed over processes) and
    `grad/sample_sq_norm_ratio` (max / min over tasks). `param.grad` is not touched."""
    from unigrad.objective.loss import batch_normalisers

    params = [p for p in learner.params if p.requires_grad]
    sums = torch.zeros(len(task_names), dtype=torch.float64)
    counts = torch.zeros(len(task_names), dtype=torch.float64)
    for comp, ref in zip(batch.components, reference, strict=True):
        row_task = batch.prompt_task[comp.row_prompt]
        for k in range(len(task_names)):
            live = torch.nonzero((row_task == k) & (comp.advantages != 0)).flatten()
            for row in sample_rows(live, wanted).tolist():
                rows = torch.tensor([row])
                own = batch_normalisers(comp.sequences.completion_mask[rows], comp.objective)
                out, _, _ = _loss(comp, rows, own, batch, learner, _Cached(None, ref))
                grads = torch.autograd.grad(comp.coef * out.loss, params, allow_unused=True)
                sums[k] += sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
                counts[k] += 1
    metrics, means = {}, {}
    for k, name in enumerate(task_names):  # every process makes the same calls, in the same order
        total, n = dist.sum_float(float(sums[k])), dist.sum_float(float(counts[k]))
        if n > 0:
            means[name] = metrics[f"grad/{name}/sample_sq_norm"] = total / n
    positive = [v for v in means.values() if v > 0]
    if len(positive) > 1:
        metrics["grad/sample_sq_norm_ratio"] = max(positive) / min(positive)
    return metrics


@torch.no_grad()
def _proximal_pass(batch: Batch, learner: Learner, rows: list[torch.Tensor], micro_batch_size: int,
                   proximal: list[RowCache], entropy: list[RowCache | None]) -> None:
    """The learner's log-probs (and entropy) of `rows` of each component under the weights before any update."""
    from unigrad.train.learning.batching import length_grouped_micro_batches

    for c, (comp, idx) in enumerate(zip(batch.components, rows, strict=True)):
        if not len(idx):
            continue
        for piece in length_grouped_micro_batches(comp.sequences.rows(idx), micro_batch_size,
                                                  groups=comp.row_prompt[idx]):
            r = idx[piece]
            logp, ent = learner.logprobs(comp.sequences.rows(r).trimmed(), batch.temperature)
            proximal[c].put(r, logp)
            if entropy[c] is not None:
                entropy[c].put(r, ent)


def _mismatch(batch: Batch, proximal: list[RowCache], entropy: list[RowCache | None],
              dist: Distributed) -> dict[str, float]:
    """The engine's log-probs against the learner's proximal ones, on the engine's own samples (gathered over
    processes)."""
    for comp, logp, ent in zip(batch.components, proximal, entropy, strict=True):
        if ent is None or comp.infer_logprobs is None:
            continue
        mask = comp.sequences.completion_mask
        if comp.off_policy is not None:
            mask = mask & ~comp.off_policy[:, None]
        mask = dist.cat(mask)
        if mask.any():
            train, infer = dist.cat(logp.values), dist.cat(comp.infer_logprobs)
            out = mismatch_metrics(train, infer, mask, entropy=dist.cat(ent.values), low=comp.objective.icepop_low,
                                   high=comp.objective.icepop_high)
            observed = dist.cat(comp.sequences.observation_mask)
            if observed.any():  # multi-turn episodes: the mismatch of each assistant turn
                turn = turn_index(mask, observed)
                for k in range(int(turn.max()) + 1):
                    per_turn = mismatch_metrics(train, infer, turn == k)
                    out.update({f"mismatch/turn{k + 1}/{key.removeprefix('mismatch/')}": per_turn[key]
                                for key in ("mismatch/kl_k3", "mismatch/abs_logp_diff_mean") if key in per_turn})
            return out
    return {}
