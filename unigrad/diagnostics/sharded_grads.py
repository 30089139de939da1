"""Gradients of parameters that may be sharded (torch DTensor, `sharding=fsdp`): this process's part of them as
one flat vector, and back. Below the trainer, so that the per-task gradient accounting (unigrad.diagnostics.
task_gradients) and the sharded learner (unigrad.train.learning.sharding) share them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; the tensor itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def flat_local_grads(params: list[nn.Parameter]) -> torch.Tensor:
    """This process's part of the gradient as one float32 vector (zeros for a parameter without a gradient)."""
    return torch.cat([(local(p.grad) if p.grad is not None else local(p).new_zeros(local(p).shape)).reshape(-1).float()
                      for p in params])


def set_flat_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """`param.grad` = views of `flat` (laid out as `flat_local_grads`), as sharded tensors where the parameters are."""
    offset = 0
    for p in params:
        shard = local(p)
        view = flat[offset:offset + shard.numel()].view_as(shard).to(p.dtype)
        offset += shard.numel()
        if is_sharded(p):
            from torch.distributed.tensor import DTensor

            view = DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        p.grad = view
