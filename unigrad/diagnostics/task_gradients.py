"""Per-task gradients of one optimizer step (seed 000, arXiv 2510.19178; DESIGN.md section 7).

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def task_gradient_stats(halves: dict[str, Sequence[torch.Tensor | None]],
                        rows: dict[str, Sequence[int]],
                        g_task: dict[str, torch.Tensor] | None = None,
                        g: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics from each task's two half-gradients (flat vectors; None for a half with no rows) and the row count
    of each half (`g_task`: their sums, and `g`: the sum over tasks, if the caller has them)."""
    g_task = g_task if g_task is not None else {k: _half_sum(a, b) for k, (a, b) in halves.items()}
    g = g if g is not None else sum(g_task.values())
    g_sq = float(g @ g) if g_task else 0.0
    out: dict[str, float] = {}
    for k, (a, b) in halves.items():
        gk = g_task[k]
        n_a, n_b = rows[k]
        sq = float(gk @ gk)
        out[f"grad/{k}/sq_norm"] = sq
        out[f"grad/{k}/cross_sq_norm"] = (
            float(a @ b) * (n_a + n_b) ** 2 / (n_a * n_b) if n_a and n_b else float("nan"))  # 0-row half: no term
        dot = float(gk @ g)
        out[f"grad/{k}/cos"] = dot / math.sqrt(sq * g_sq) if sq > 0 and g_sq > 0 else float("nan")
        out[f"grad/{k}/share"] = dot / g_sq if g_sq > 0 else float("nan")
    norms = [out[f"grad/{k}/sq_norm"] for k in halves if out[f"grad/{k}/sq_norm"] > 0]
    out["grad/sq_norm_ratio"] = max(norms) / min(norms) if len(norms) >= 2 else float("nan")
    return out


def _half_sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """g_k from its two halves, either of which may be None (no rows)."""
    if a is None or b is None:
        return a if b is None else b
    return a + b


def balanced_sum(g_task: dict[str, torch.Tensor], target: float | None = None) -> torch.Tensor:
    """sum_k (c / ||g_k||) g_k: every non-zero task gradient rescaled to norm c before summing.

    c is `target` if given, else the mean of the non-zero ||g_k||; all-zero task gradients stay zero.
    """
    vectors = list(g_task.values())
    norms = [float(v.norm()) for v in vectors]
    live = [n for n in norms if n > 0]
    total = torch.zeros_like(vectors[0])
    if not live:
        return total
    c = float(target) if target is not None else sum(live) / len(live)
    for v, n in zip(vectors, norms, strict=True):
        if n > 0:
            total.add_(v, alpha=c / n)
    return total


def projected_sum(g_task: dict[str, torch.Tensor]) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, arXiv 2001.06782): each g_k loses its component along every other task's
    *original* gradient g_j that it conflicts with (<g_k, g_j> < 0), then the results are summed.

    The other tasks are taken in a fixed order (the dict's), not PCGrad's random order, so that a
    resumed run repeats the update exactly.
    """
    names = list(g_task)
    total = torch.zeros_like(g_task[names[0]])
    for k in names:
        gk = g_task[k].clone()
        for j in names:
            if j == k:
                continue
            gj = g_task[j]
            dot, sq = float(gk @ gj), float(gj @ gj)
            if dot < 0 and sq > 0:
                gk.sub_(gj, alpha=dot / sq)
        total.add_(gk)
    return total


class TaskGradients:
    """Collects per-(task, half) gradients from `param.grad` during one optimizer step.

    Usage: for each group, run its backward passes, then `collect(task, half, n_rows)`; after the
    last group, `finish()` puts the combined gradient into `param.grad` and returns the metrics.
    """

    def __init__(self, params: list[torch.nn.Parameter], balance: bool = False, balance_target: float | None = None,
                 project: bool = False, reduce=None, task_names: list[str] | None = None, cross_every: int = 1):
        """`cross_every`: steps that split tasks in halves for the cross term (see `splits_halves`).
        `reduce`: sums a flat tensor over data-parallel processes in place (then `task_names`, the run's tasks in a
        fixed order, is required: every process reduces the same (task, half) vectors, zeros where it had none)."""
        if reduce is not None and not task_names:
            raise ValueError("reduce needs task_names")
        self.reduce, self.task_names = reduce, task_names
        if balance and project:
            raise ValueError("choose one of balance and project")
        self.params = params
        self.cross_every = cross_every
        self.balance = balance
        self.project = project
        self.balance_target = balance_target
        self._halves: dict[str, list[torch.Tensor | None]] = {}
        self._rows: dict[str, list[int]] = {}
        self.last: dict[str, torch.Tensor] = {}  # g_k of the latest finish(), flat, for inspection

    def splits_halves(self, step: int) -> bool:
        """Whether step `step` (from 1) splits each task's rows in two halves: steps 1, 1 + N, 1 + 2N, ..."""
        return self.cross_every > 0 and (step - 1) % self.cross_every == 0

    def collect(self, task: str, half: int, n_rows: int) -> None:
        """Take the gradient accumulated since the last collect as (task, half) and clear `param.grad`."""
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in self.params
        ])
        for p in self.params:
            p.grad = None
        halves = self._halves.setdefault(task, [None, None])
        rows = self._rows.setdefault(task, [0, 0])
        halves[half] = flat if halves[half] is None else halves[half] + flat
        rows[half] += n_rows

    def finish(self) -> dict[str, float]:
        """Write sum_k g_k (or its balanced or projected version) into `param.grad`; return the metrics; reset."""
        if self.reduce is not None:
            self._reduce_over_processes()
        if not self._halves:
            return {}
        g_task = {k: _half_sum(a, b) for k, (a, b) in self._halves.items()}  # no copy for a task collected whole
        g = torch.stack(list(g_task.values())).sum(0)
        metrics = task_gradient_stats(self._halves, self._rows, g_task, g)
        self.last = g_task
        if self.balance:
            total = balanced_sum(g_task, self.balance_target)
        elif self.project:
            total = projected_sum(g_task)
        else:
            total = g
        offset = 0
        for p in self.params:  # param.grad become views of `total`, which nothing else holds
            n = p.numel()
            p.grad = total[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        self._halves, self._rows = {}, {}
        return metrics

    def _reduce_over_processes(self) -> None:
        size = sum(p.numel() for p in self.params)
        halves, rows = {}, {}
        for name in self.task_names:
            parts = self._halves.get(name, [None, None])
            parts = [t if t is not None else torch.zeros(size) for t in parts]
            for t in parts:
                self.reduce(t)
            counts = self.reduce(torch.tensor(self._rows.get(name, [0, 0]), dtype=torch.float64))
            if counts.sum() > 0:  # a task no process drew this step has no metrics, as in a single process
                halves[name] = [t if c > 0 else None for t, c in zip(parts, counts.tolist(), strict=True)]
                rows[name] = [int(c) for c in counts.tolist()]
        self._halves, self._rows = halves, rows
