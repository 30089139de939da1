"""Per-task gradients of one optimizer step (arXiv 2510.19178).

g is the step's full gradient and g_k the gradient of the same loss restricted to task k's
samples, with the step's global normalisers, so that sum_k g_k = g exactly. The step runs one
backward pass per (task, half) group of rows; `TaskGradients` collects each group's gradient
from `param.grad`, and at the end writes sum_k g_k (or the gradient-balanced sum) back into
`param.grad` for the clip and the optimizer. No extra forward pass; the cost is that micro-batches
never mix groups, plus one flattened gradient per task held in memory. Splitting every task in two
halves doubles the number of (small) backward calls, so it is done every `cross_every` steps only;
the other steps group rows by task, which costs about what the unaccounted step costs.

Per task (names as in metrics.jsonl):
- `grad/<task>/sq_norm`       ||g_k||^2
- `grad/<task>/cross_sq_norm` n^2 / (n_A n_B) * <g_k^A, g_k^B>: the gradients of two disjoint halves
                              of the task's samples (n_A + n_B = n rows). Each half's expectation is
                              (n_h / n) E[g_k], so this is an unbiased estimate of ||E[g_k]||^2, the
                              squared norm with the sampling noise removed (NaN with fewer than 2 rows,
                              and on the steps that do not split the halves: `cross_every`).
- `grad/<task>/cos`           cos(g_k, g)
- `grad/<task>/share`         <g_k, g> / ||g||^2 (shares sum to 1 over tasks)
plus `grad/sq_norm_ratio`: max_k / min_k of ||g_k||^2 over the tasks with a non-zero gradient.

g_k is divided by the step's normaliser N (all tasks' sequences, or tokens for token-mean aggregation), so a task
with more rows in the step has a larger g_k for that reason alone. With each task's own normaliser N_k (its own
sequences, or tokens) the same loss restricted to task k has the gradient (N / N_k) g_k exactly (a scalar: the
normaliser is a count, not a function of the weights), logged as
- `grad/<task>/sq_norm_own`   (N / N_k)^2 ||g_k||^2, and `grad/sq_norm_ratio_own` its max / min over tasks:
                              the imbalance with the count artefact removed. (The length artefact of GRPO's 1/|y|
                              weighting goes with token-mean aggregation: `objective_args.aggregation=token_mean`.)
And per sample (`diagnostics.sample_gradients` rows of each task, measured in `unigrad.train.learning.learn`):
- `grad/<task>/sample_sq_norm` the mean over the rows of ||grad of one row's loss over its own normaliser||^2, and
                              `grad/sample_sq_norm_ratio` its max / min over tasks: the imbalance of single samples,
                              where neither counts nor other rows' lengths enter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from unigrad.diagnostics.sharded_grads import flat_local_grads, set_flat_grads


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(H, H) float64 matrix of the vectors' dot products. Every statistic and every combination below is a
    function of it, so for vectors sharded over processes the sum of the processes' matrices is all they need."""
    out = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for i, a in enumerate(vectors):
        for j in range(i, len(vectors)):
            out[i, j] = out[j, i] = float(a @ vectors[j])
    return out


def _layout(halves: dict[str, Sequence[torch.Tensor | None]]) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    """The halves that exist, as a list, and each task's positions (half 0 first) in that list."""
    vectors: list[torch.Tensor] = []
    where: dict[str, list[int]] = {}
    for k, parts in halves.items():
        where[k] = []
        for v in parts:
            if v is not None:
                where[k].append(len(vectors))
                vectors.append(v)
    return vectors, where


def stats_from_gram(where: dict[str, list[int]], half_of: dict[str, list[int]], rows: dict[str, Sequence[int]],
                    g_half: torch.Tensor) -> dict[str, float]:
    """The metrics from the dot products `g_half` of the half-gradients; `where[k]`: task k's positions in it,
    `half_of[k]`: which half (0 or 1) each of those is, `rows[k]`: the row count of each half."""
    names = list(where)
    member = torch.zeros(len(names), g_half.shape[0], dtype=torch.float64)  # (K, H): task k = sum of its halves
    for i, k in enumerate(names):
        member[i, where[k]] = 1.0
    g_task = member @ g_half @ member.T  # (K, K) <g_k, g_l>
    g_sq = float(g_task.sum())  # ||g||^2, g = sum_k g_k
    out: dict[str, float] = {}
    for i, k in enumerate(names):
        n_a, n_b = rows[k]
        sq, dot = float(g_task[i, i]), float(g_task[i].sum())  # ||g_k||^2, <g_k, g>
        out[f"grad/{k}/sq_norm"] = sq
        both = n_a and n_b and len(where[k]) == 2 and half_of[k] == [0, 1]
        out[f"grad/{k}/cross_sq_norm"] = (  # a half without rows: no cross term
            float(g_half[where[k][0], where[k][1]]) * (n_a + n_b) ** 2 / (n_a * n_b) if both else float("nan"))
        out[f"grad/{k}/cos"] = dot / math.sqrt(sq * g_sq) if sq > 0 and g_sq > 0 else float("nan")
        out[f"grad/{k}/share"] = dot / g_sq if g_sq > 0 else float("nan")
    norms = [out[f"grad/{k}/sq_norm"] for k in names if out[f"grad/{k}/sq_norm"] > 0]
    out["grad/sq_norm_ratio"] = max(norms) / min(norms) if len(norms) >= 2 else float("nan")
    return out


def task_gradient_stats(halves: dict[str, Sequence[torch.Tensor | None]],
                        rows: dict[str, Sequence[int]]) -> dict[str, float]:
    """Metrics from each task's two half-gradients (flat vectors; None for a half with no rows) and the row count
    of each half."""
    vectors, where = _layout(halves)
    half_of = {k: [h for h, v in enumerate(parts) if v is not None] for k, parts in halves.items()}
    return stats_from_gram(where, half_of, rows, gram(vectors))


def balanced_coefficients(g_task: torch.Tensor, target: float | None = None) -> torch.Tensor:
    """(K,) weights c / ||g_k|| of the balanced sum from the tasks' (K, K) dot products (0 for a zero g_k).

    c is `target` if given, else the mean of the non-zero ||g_k||."""
    norms = g_task.diagonal().clamp_min(0).sqrt()
    live = norms > 0
    coef = torch.zeros_like(norms)
    if live.any():
        c = float(target) if target is not None else float(norms[live].mean())
        coef[live] = c / norms[live]
    return coef


def projected_coefficients(g_task: torch.Tensor) -> torch.Tensor:
    """(K, K) matrix P with PCGrad's sum_k g_k' = sum_l (sum_k P[k, l]) g_l, from the tasks' dot products.

    g_k' starts as g_k and, for each other task j in order, loses its component along g_j when they conflict
    (<g_k', g_j> < 0). Every g_k' stays a combination of the original g_l, so its coefficients (row k of P) and the
    dot products are all that is needed."""
    k_tasks = g_task.shape[0]
    proj = torch.eye(k_tasks, dtype=torch.float64)
    for k in range(k_tasks):
        for j in range(k_tasks):
            if j == k:
                continue
            dot, sq = float(proj[k] @ g_task[:, j]), float(g_task[j, j])
            if dot < 0 and sq > 0:
                proj[k, j] -= dot / sq
    return proj


def _combine(vectors: Sequence[torch.Tensor], coef: Sequence[float]) -> torch.Tensor:
    total = torch.zeros_like(vectors[0])
    for v, c in zip(vectors, coef, strict=True):
        if c:
            total.add_(v, alpha=float(c))
    return total


def balanced_sum(g_task: dict[str, torch.Tensor], target: float | None = None) -> torch.Tensor:
    """sum_k (c / ||g_k||) g_k: every non-zero task gradient rescaled to norm c before summing.

    c is `target` if given, else the mean of the non-zero ||g_k||; all-zero task gradients stay zero.
    """
    vectors = list(g_task.values())
    return _combine(vectors, balanced_coefficients(gram(vectors), target).tolist())


def projected_sum(g_task: dict[str, torch.Tensor]) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, arXiv 2001.06782): each g_k loses its component along every other task's
    gradient g_j that it conflicts with (<g_k, g_j> < 0), then the results are summed.

    The other tasks are taken in a fixed order (the dict's), not PCGrad's random order, so that a
    resumed run repeats the update exactly.
    """
    vectors = list(g_task.values())
    return _combine(vectors, projected_coefficients(gram(vectors)).sum(0).tolist())


def own_normaliser_stats(metrics: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    """`grad/<task>/sq_norm_own` = (N / N_k)^2 `grad/<task>/sq_norm` with N = sum_k N_k (the step's normaliser), and
    `grad/sq_norm_ratio_own`, max / min of those over the tasks with a non-zero gradient."""
    total = sum(own.values())
    out = {}
    for task, count in own.items():
        sq = metrics.get(f"grad/{task}/sq_norm")
        if sq is not None and count > 0:
            out[f"grad/{task}/sq_norm_own"] = (total / count) ** 2 * sq
    positive = [v for v in out.values() if v > 0]
    if len(positive) > 1:
        out["grad/sq_norm_ratio_own"] = max(positive) / min(positive)
    return out


@dataclass(frozen=True)
class ProcessReduction:
    """How the per-task gradients of data-parallel processes are summed: `reduce` sums a tensor over the processes
    in place, `task_names` (the run's tasks in a fixed order) are the vectors every process reduces, zeros where it
    had none. `sharded` (FSDP): the gradients are already summed and each process holds its shard of them, in the
    same groups on every process; only the dot products and the row counts are reduced."""

    reduce: Callable[[torch.Tensor], torch.Tensor]
    task_names: list[str]
    sharded: bool = False


class TaskGradients:
    """Collects per-(task, half) gradients from `param.grad` during one optimizer step.

    Usage: for each group, run its backward passes, then `collect(task, half, n_rows)`; after the
    last group, `finish()` puts the combined gradient into `param.grad` and returns the metrics.
    """

    def __init__(self, params: list[torch.nn.Parameter], balance: bool = False, balance_target: float | None = None,
                 project: bool = False, cross_every: int = 1, processes: ProcessReduction | None = None):
        """`cross_every`: steps that split tasks in halves for the cross term (see `splits_halves`).
        `processes`: how the gradients of data-parallel processes are summed (None: one process)."""
        if processes is not None and not processes.task_names:
            raise ValueError("reducing over processes needs task_names")
        self.reduce = processes.reduce if processes is not None else None
        self.task_names = processes.task_names if processes is not None else None
        self.sharded = processes is not None and processes.sharded
        if balance and project:
            raise ValueError("choose one of balance and project")
        self.params = params
        self.cross_every = cross_every
        self.balance = balance
        self.project = project
        self.balance_target = balance_target
        self._halves: dict[str, list[torch.Tensor | None]] = {}
        self._rows: dict[str, list[int]] = {}
        self._own: dict[str, float] = {}  # each task's own normaliser count N_k (sequences or tokens)
        self._last: dict[str, list[torch.Tensor | None]] = {}

    @property
    def last(self) -> dict[str, torch.Tensor]:
        """g_k of the latest finish(), flat (this process's shard when sharded), for inspection."""
        return {k: a if b is None else b if a is None else a + b for k, (a, b) in self._last.items()}

    def splits_halves(self, step: int) -> bool:
        """Whether step `step` (from 1) splits each task's rows in two halves: steps 1, 1 + N, 1 + 2N, ..."""
        return self.cross_every > 0 and (step - 1) % self.cross_every == 0

    def collect(self, task: str, half: int, n_rows: int, own_count: float | None = None) -> None:
        """Take the gradient accumulated since the last collect as (task, half) and clear `param.grad`.
        `own_count`: what the objective normalises by (sequences, or tokens for token-mean) in these rows."""
        flat = flat_local_grads(self.params)
        for p in self.params:
            p.grad = None
        halves = self._halves.setdefault(task, [None, None])
        rows = self._rows.setdefault(task, [0, 0])
        halves[half] = flat if halves[half] is None else halves[half] + flat
        rows[half] += n_rows
        self._own[task] = self._own.get(task, 0.0) + float(n_rows if own_count is None else own_count)

    def finish(self) -> dict[str, float]:
        """Write sum_k g_k (or its balanced or projected version) into `param.grad`; return the metrics; reset."""
        if self.sharded:
            self._order_and_count()
        elif self.reduce is not None:
            self._reduce_over_processes()
        if not self._halves:
            return {}
        vectors, where = _layout(self._halves)
        g_half = gram(vectors)
        if self.sharded:  # each process holds a slice of every vector: the dot products add up
            self.reduce(g_half)
        half_of = {k: [h for h, v in enumerate(parts) if v is not None] for k, parts in self._halves.items()}
        metrics = stats_from_gram(where, half_of, self._rows, g_half)
        metrics.update(own_normaliser_stats(metrics, self._own))
        names = list(where)
        if self.balance or self.project:
            member = torch.zeros(len(names), len(vectors), dtype=torch.float64)
            for i, k in enumerate(names):
                member[i, where[k]] = 1.0
            g_task = member @ g_half @ member.T
            task_coef = (balanced_coefficients(g_task, self.balance_target) if self.balance
                         else projected_coefficients(g_task).sum(0))
        else:
            task_coef = torch.ones(len(names), dtype=torch.float64)
        coef = [0.0] * len(vectors)
        for i, k in enumerate(names):
            for h in where[k]:
                coef[h] = float(task_coef[i])
        set_flat_grads(self.params, _combine(vectors, coef))  # param.grad: views of a vector nothing else holds
        self._last = self._halves
        self._halves, self._rows, self._own = {}, {}, {}
        return metrics

    def _order_and_count(self) -> None:
        """Sharded: the groups are the same on every process (the step aligns them); put them in the run's task
        order and sum the row counts."""
        halves, rows = {}, {}
        for name in self.task_names:
            if name in self._halves:
                halves[name] = self._halves[name]
                counts = self.reduce(torch.tensor(self._rows[name], dtype=torch.float64))
                rows[name] = [int(c) for c in counts.tolist()]
                self._own[name] = float(self.reduce(torch.tensor([self._own[name]], dtype=torch.float64))[0])
        self._halves, self._rows = halves, rows

    def _reduce_over_processes(self) -> None:
        size = sum(p.numel() for p in self.params)
        halves, rows = {}, {}
        for name in self.task_names:
            parts = self._halves.get(name, [None, None])
            parts = [t if t is not None else torch.zeros(size, device=self.params[0].device) for t in parts]
            for t in parts:
                self.reduce(t)
            counts = self.reduce(torch.tensor(self._rows.get(name, [0, 0]), dtype=torch.float64))
            own = float(self.reduce(torch.tensor([self._own.get(name, 0.0)], dtype=torch.float64))[0])
            if own > 0:
                self._own[name] = own
            if counts.sum() > 0:  # a task no process drew this step has no metrics, as in a single process
                halves[name] = [t if c > 0 else None for t, c in zip(parts, counts.tolist(), strict=True)]
                rows[name] = [int(c) for c in counts.tolist()]
        self._halves, self._rows = halves, rows
