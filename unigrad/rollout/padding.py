"""Padding, in one place: prompts are left-padded (their last token is where generation starts), completions and
their per-token values right-padded (their first token sits at position 0 of the completion).

Used by the engines (transformers, vLLM, the Ray pool's merge), the learner's batches, demonstrations and the
gathering of tensors over processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Side = Literal["left", "right"]


def pad_rows(rows: Sequence[Sequence], side: Side, value, *, width: int | None = None,
             dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask), both (len(rows), width): each row's items packed against `side`, the rest `value` (mask
    False). `width` defaults to the longest row."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if not len(row):
            continue
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        out[i, cols] = torch.as_tensor(row, dtype=dtype)
        mask[i, cols] = True
    return out, mask


def widen(tensor: torch.Tensor, width: int, side: Side, value) -> torch.Tensor:
    """A (N, W) tensor padded with `value` on `side` to (N, width), width >= W."""
    extra = width - tensor.shape[1]
    return torch.nn.functional.pad(tensor, (extra, 0) if side == "left" else (0, extra), value=value)
