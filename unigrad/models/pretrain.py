"""Pretraining the embedded models: demonstrations of the built-in tasks, packed, and an SFT loop.

An example is (token ids, prompt length): the loss is on the tokens after the prompt (the tiny model's
demonstrations); or (token ids, loss mask): the loss is on the tokens whose mask is True (the assistant turns
of a multi-turn chat, ``unigrad-chat``). Examples of a batch are packed into rows of `pack_length` tokens with
block-diagonal attention and per-example positions, so packing changes the speed (30% faster here), not the
logits. Padding uses id 0 (both models' pad token) and is out of the loss.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch

from unigrad.models.lr_schedule import lr_multiplier
from unigrad.models.tokenizer import PAD_ID, completion_ids, prompt_ids

if TYPE_CHECKING:
    from unigrad.models.tiny import TinyRecipe


def training_data(recipe: TinyRecipe) -> tuple[list[list[tuple[list[int], int]]], dict[str, int]]:
    """Per task, (token ids, prompt length) of each demonstration; and how many were too long, per task."""
    from unigrad.tasks import get_task

    data: list[list[tuple[list[int], int]]] = []
    skipped: dict[str, int] = {}
    for name, _ in recipe.tasks:
        rows: list[tuple[list[int], int]] = []
        skipped[name] = 0
        for ex in get_task(name).examples("train", recipe.train_examples_per_task, recipe.seed):
            if ex.demonstration is None:
                continue
            p, c = prompt_ids(ex.prompt), completion_ids(ex.demonstration)
            if len(p) + len(c) > recipe.max_length:
                skipped[name] += 1
                continue
            rows.append((p + c, len(p)))
        if not rows:
            raise ValueError(f"task {name!r} gave no usable demonstrations for the tiny model")
        data.append(rows)
    return data, skipped


def batches(data: list[list[tuple[list[int], int]]], recipe: TinyRecipe) -> Iterator[list[tuple[list[int], int]]]:
    """A seeded stream of batches: each row draws its task by weight, then an example (epochs, shuffled)."""
    g = torch.Generator().manual_seed(recipe.seed)
    weights = torch.tensor([w for _, w in recipe.tasks], dtype=torch.float64)
    orders = [torch.randperm(len(rows), generator=g).tolist() for rows in data]
    cursors = [0] * len(data)
    while True:
        batch = []
        for t in torch.multinomial(weights, recipe.batch_size, replacement=True, generator=g).tolist():
            if cursors[t] == len(orders[t]):
                orders[t] = torch.randperm(len(data[t]), generator=g).tolist()
                cursors[t] = 0
            batch.append(data[t][orders[t][cursors[t]]])
            cursors[t] += 1
        yield batch


def pack(batch: list[tuple[list[int], int]], capacity: int) -> list[list[tuple[list[int], int]]]:
    """First-fit decreasing: the batch's examples in rows of at most ``capacity`` tokens (a longer one alone)."""
    rows: list[list[tuple[list[int], int]]] = []
    room: list[int] = []
    for example in sorted(batch, key=lambda r: -len(r[0])):  # stable: ties keep the batch order
        n = len(example[0])
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(example)
                room[i] -= n
                break
        else:
            rows.append([example])
            room.append(capacity - n)
    return rows


def loss_mask(example: tuple[list[int], int | list[bool]]) -> list[bool]:
    """Which tokens of an example are trained: those after its prompt length, or those its loss mask marks."""
    ids, target = example
    if isinstance(target, int):
        return [False] * target + [True] * (len(ids) - target)
    if len(target) != len(ids):
        raise ValueError(f"an example's loss mask has {len(target)} entries for {len(ids)} tokens")
    return list(target)


def micro_batches(batch: list[tuple[list[int], int]], recipe: TinyRecipe) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batch packed into rows, ``micro_batch_size`` rows at a time: (input_ids, attention_mask, position_ids,
    labels). Each example attends only to itself (4-D block-diagonal causal additive mask) and has positions from
    0, so its logits equal those of the example alone; labels are -100 except on trained tokens (`loss_mask`:
    completion tokens and eos, or an assistant turn's tokens)."""
    rows = pack(batch, recipe.pack_length)
    for start in range(0, len(rows), recipe.micro_batch_size):
        chunk = rows[start : start + recipe.micro_batch_size]
        width = max(sum(len(ids) for ids, _ in row) for row in chunk)
        input_ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        position_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        segment = torch.full((len(chunk), width), -1, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, row in enumerate(chunk):
            at = 0
            for j, example in enumerate(row):
                n = len(example[0])
                input_ids[i, at : at + n] = torch.tensor(example[0])
                position_ids[i, at : at + n] = torch.arange(n)
                segment[i, at : at + n] = j
                trained = torch.tensor(loss_mask(example), dtype=torch.bool)
                labels[i, at : at + n] = torch.where(trained, input_ids[i, at : at + n], -100)
                at += n
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        allowed = (same & causal)[:, None] | torch.eye(width, dtype=torch.bool)  # padding sees itself: no empty rows
        # Additive float mask: eager attention adds it to the scores (a bool mask would be added as 0/1).
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        yield input_ids, mask, position_ids, labels


def pretrain(model, data, recipe: TinyRecipe, progress: bool, on_step=None) -> list[float]:
    """SFT with a token-mean loss over the completion tokens of each whole batch; the loss per step.

    ``on_step(step, model)``, if given, is called after each optimizer step (for learning-curve probes).
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=recipe.betas,
    )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup=recipe.warmup_steps, total=recipe.steps, schedule="cosine",
        min_ratio=recipe.min_lr_ratio))
    model.train()
    losses: list[float] = []
    stream = batches(data, recipe)
    with Progress(recipe.steps, enabled=progress, name=recipe.model_name) as bar:
        for _ in range(recipe.steps):
            micro = list(micro_batches(next(stream), recipe))
            n_tokens = sum(int((labels[:, 1:] != -100).sum()) for *_, labels in micro)
            total = 0.0
            for input_ids, attention_mask, position_ids, labels in micro:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
                logits = logits[:, :-1]
                targets = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                ) / max(n_tokens, 1)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.advance(total)
            if on_step is not None:
                on_step(len(losses), model)
                model.train()
    return losses


# ----------------------------------------------------------------------------------------------- helpers


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A rich progress bar on a terminal; otherwise a log line with the loss every ~10% of the steps."""

    def __init__(self, total: int, enabled: bool, name: str = "unigrad-tiny") -> None:
        self.total, self.enabled, self.step, self.name = total, enabled, 0, name
        self.started = time.perf_counter()
        self.every = max(1, total // 10)
        self._rich = None
        self._ema: float | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            say(f"{self.name}: building the model ({self.total} SFT steps); cached after the first time")
            if sys.stderr.isatty():
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self._rich = Progress(
                    TextColumn(f"{self.name} SFT"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]}"),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    transient=True,
                )
                self._rich.__enter__()
                self._task = self._rich.add_task("sft", total=self.total, loss="-")
        return self

    def advance(self, loss: float) -> None:
        self.step += 1
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=1, loss=f"{self._ema:.3f}")
        elif self.step % self.every == 0 or self.step == self.total:
            say(
                f"{self.name}: step {self.step}/{self.total} loss {self._ema:.3f} "
                f"({time.perf_counter() - self.started:.0f} s)"
            )

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
