"""Data-parallel training over processes with torch.distributed.

Launch with `unigrad train --nproc N ...` (which runs torch's `torchrun` launcher), or with `torchrun` or
`accelerate launch` directly: every process reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from its
environment. Backend: NCCL when the learner is on a GPU (`model.device`), else gloo (CPU).

What is split and what is reduced (unigrad.train.step uses these helpers; with one process they do nothing):
- every process draws the same prompts from the same task sampler, then takes its own contiguous block of them,
  each prompt with the random stream it would have had in a single process (`prompt_stream_seeds`);
- rewards are gathered, so advantages (including batch-level ones) are those of the whole batch;
- the loss normalisers (token and sequence counts) are summed over processes before any loss is formed, so each
  process's backward gives its share of the single-process gradient, and gradients are then summed;
- per-task gradients are summed per (task, half) before their statistics;
- metrics are computed from gathered rewards, lengths and per-micro-batch loss records, so every process holds the
  metrics a single process would log (rank 0 writes them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from unigrad.rollout.padding import widen


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where the backend's collectives run (NCCL: this process's GPU)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, total: int) -> tuple[int, int]:
        """This process's [lo, hi) share of `total` items (contiguous; `total` must divide evenly)."""
        check_prompts_split(total, self.world)
        size = total // self.world
        return self.rank * size, (self.rank + 1) * size

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce `tensor` in place (sum over processes) and return it. A tensor on another device than the
        backend's (a CPU tensor under NCCL) is reduced through a copy on the backend's device."""
        if self.active:
            if tensor.device == self.device:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            else:
                buffer = tensor.to(self.device)
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                tensor.copy_(buffer)
        return tensor

    def sum_float(self, value: float) -> float:
        return float(self.sum_(torch.tensor([value], dtype=torch.float64))[0]) if self.active else value

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (picklable objects; small things only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every process's tensor, in rank order. Dim 0 may differ; so may dim 1 of
        2-D tensors (e.g. completion widths), which are right-padded with zeros (False) to the widest."""
        if not self.active:
            return tensor
        parts = self.gather(tensor.cpu())
        if tensor.dim() == 2:
            width = max(t.shape[1] for t in parts)
            parts = [widen(t, width, "right", 0) for t in parts]
        return torch.cat(parts, dim=0).to(tensor.device)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum `param.grad` over processes (one flat buffer, one collective)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.sum_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Distributed()


def check_prompts_split(prompts_per_step: int, processes: int) -> None:
    """Each process takes an equal block of a step's prompts: refuse (ConfigError) a count that does not split."""
    if prompts_per_step % processes:
        from unigrad.config import ConfigError

        raise ConfigError(f"prompts_per_step={prompts_per_step} must be a multiple of the number of processes "
                          f"({processes})")


def init_distributed(device: torch.device | str = "cpu") -> Distributed:
    """Join the process group described by the environment (WORLD_SIZE > 1), else a single process.

    `device` is this process's learner device (unigrad.train.lifecycle.device): NCCL on a CUDA device (made the current
    one, as NCCL's object collectives expect), gloo on the CPU."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"data-parallel training runs on cuda (NCCL) or cpu (gloo), not on {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


# What `accelerate launch` puts in the environment for its FSDP plugin that unigrad's FSDP does not apply, with the
# value that matches what unigrad does (None: any value is fine only if unset).
_FSDP_PLUGIN_MATCHES = {
    "FSDP_SHARDING_STRATEGY": ("1", "FULL_SHARD"),
    "FSDP_OFFLOAD_PARAMS": ("false",),
    "FSDP_ACTIVATION_CHECKPOINTING": ("false",),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": ("false",),
}


def accelerate_launch_settings(environ: dict[str, str], sharding: str) -> tuple[str, list[str]]:
    """(sharding to use, notes to print) for a process started by `accelerate launch`, from the environment the
    launcher sets.

    accelerate's FSDP plugin (`--use_fsdp` or an FSDP config file) turns on `sharding=fsdp`, which is torch's FSDP2
    with full sharding; plugin settings unigrad does not apply (another sharding strategy, CPU offload, activation
    checkpointing) are named in a note. DeepSpeed is refused with a clear error: it is not wired in. A mixed
    precision other than "no" is noted: the learner's dtype is `model.dtype`.
    """
    from unigrad.config import ConfigError

    notes: list[str] = []
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("accelerate launch asked for DeepSpeed, which unigrad does not wire in; launch without it "
                          "and set sharding=fsdp to shard parameters, gradients and optimizer state (as ZeRO-3)")
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if sharding != "fsdp":
            notes.append("accelerate launch asked for FSDP: training with sharding=fsdp (torch FSDP2, full sharding)")
            sharding = "fsdp"
        ignored = [f"{key}={environ[key]}" for key, fine in _FSDP_PLUGIN_MATCHES.items()
                   if key in environ and environ[key] not in fine]
        if ignored:
            notes.append("accelerate FSDP settings unigrad does not apply (it shards fully, without offload or "
                         "activation checkpointing): " + ", ".join(ignored))
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", ""):
        notes.append(f"accelerate mixed_precision={precision} is not applied: the learner trains in model.dtype")
    return sharding, notes
