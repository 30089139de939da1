"""The micro-batch plan of a step: which rows of which loss component go through the learner together.

A pure function of the batch: micro-batches never mix accounting groups (one group, or with per-task gradients one
per task and half), never mix components, keep a prompt's rows together (the learner runs their shared prompt once)
and put rows of similar length together (little padding). Normalisers are global to the step, so the plan never
changes the gradient. Over several processes whose learner is sharded every pass is a collective, so `aligned_plan`
pads each process's plan to the same sequence of (group, component) passes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from unigrad.train.batch import Batch
from unigrad.train.learning.batching import length_grouped_micro_batches
from unigrad.train.lifecycle.distributed import Distributed

# (accounting group, component index, row indices of that component; None = an idle pass on this process)
Pass = tuple[Any, int, torch.Tensor | None]


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


def mini_batch_prompts(num_prompts: int, mini_batches: int, seed: int) -> list[torch.Tensor]:
    """The step's prompts (global indices 0 .. num_prompts-1) dealt into `mini_batches` disjoint mini-batches, one
    per optimizer step: a seeded shuffle cut into consecutive pieces whose sizes differ by at most one. A prompt's
    group stays whole. One mini-batch is the whole step, in order (no shuffle)."""
    if not 1 <= mini_batches <= num_prompts:
        raise ValueError(f"{mini_batches} mini-batches of {num_prompts} prompts: each needs at least one prompt")
    if mini_batches == 1:
        return [torch.arange(num_prompts)]
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))
    return [piece.sort().values for piece in torch.tensor_split(order, mini_batches)]


def component_rows(batch: Batch, prompts: torch.Tensor | None) -> list[torch.Tensor]:
    """Each component's rows that answer one of `prompts` (this process's prompt indices; None = every row)."""
    if prompts is None:
        return [torch.arange(len(c)) for c in batch.components]
    return [torch.nonzero(torch.isin(c.row_prompt, prompts)).flatten() for c in batch.components]


def micro_batch_plan(batch: Batch, micro_batch_size: int, per_task: bool,
                     prompts: torch.Tensor | None = None) -> list[Pass]:
    """Micro-batches as (group, component, rows), consecutive per group, components in order within a group.
    `prompts`: only the rows of these prompts (this process's indices; a mini-batch), None = all of them.

    Without per-task gradients there is one group (None). With them a group is (task index, half), the halves
    from `task_halves` over the whole step's prompts (so processes agree): the two halves are disjoint samples of
    the task for the cross estimate; on steps without the cross term every half is 0."""
    comps = batch.components
    chosen = component_rows(batch, prompts)
    if not per_task:
        groups = [(None, chosen)]
    else:
        row_prompt = torch.cat([c.row_prompt for c in comps]) if comps else torch.zeros(0, dtype=torch.long)
        half = batch.prompt_half[row_prompt].clone()
        row_task = batch.prompt_task[row_prompt]
        for k in row_task[half < 0].unique().tolist():  # rows of a task's only prompt: dealt alternately
            rows = torch.nonzero(row_task == k).flatten()
            half[rows] = 0
            half[rows[1::2]] = 1
        bounds = torch.tensor([0] + [len(c) for c in comps]).cumsum(0).tolist()
        member = torch.zeros(len(row_task), dtype=torch.bool)
        for a, rows in zip(bounds[:-1], chosen, strict=True):
            member[a + rows] = True
        groups = [((k, h), [torch.nonzero((row_task[a:b] == k) & (half[a:b] == h) & member[a:b]).flatten()
                            for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
                  for k in row_task[member].unique().tolist() for h in (0, 1)]
    plan: list[Pass] = []
    for group, indices in groups:
        for c, idx in enumerate(indices):
            if len(idx):  # a prompt's rows stay together: the learner runs their shared prompt once
                plan += [(group, c, idx[r]) for r in length_grouped_micro_batches(
                    comps[c].sequences.rows(idx), micro_batch_size, groups=comps[c].row_prompt[idx])]
    return plan


def aligned_plan(plan: list[Pass], dist: Distributed) -> list[Pass]:
    """`plan` padded so that every process runs the same sequence of (group, component) passes: each key gets as
    many micro-batches as the process with most of them has, the missing ones as None (an idle pass). Groups in
    task order, components in order, as `micro_batch_plan` orders them."""
    def order(key):
        group, component = key
        return (-1, -1) if group is None else group, component

    counts: dict[Any, int] = {}
    for keys in dist.gather([(g, c) for g, c, _ in plan]):
        for key in set(keys):
            counts[key] = max(counts.get(key, 0), keys.count(key))
    mine: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for group, component, rows in plan:
        mine[(group, component)].append(rows)
    out: list[Pass] = []
    for key in sorted(counts, key=order):
        out += [(*key, rows) for rows in mine[key]] + [(*key, None)] * (counts[key] - len(mine[key]))
    return out
