"""The learner: the trained model, its optimizer, the frozen reference, and log-prob passes."""

from __future__ import annotations

import copy
import math
from functools import partial

import torch

from unigrad.config import OptimSection
from unigrad.models.lr_schedule import lr_multiplier
from unigrad.rollout.logprobs import sequence_logprobs
from unigrad.train.learning import sharding
from unigrad.train.learning.batching import SequenceBatch
from unigrad.train.learning.weight_average import WeightAverage


def _adamw(params: list[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it exists for these parameters (6x faster than the default
    for-each kernel for a 1M-parameter model on a CPU; the same update), else the default."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # e.g. a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(params, **kwargs)


class Learner:
    def __init__(self, model: torch.nn.Module, optim: OptimSection, *, keep_reference: bool = False,
                 shard: bool = False, total_steps: int = 0):
        """`shard`: shard the model over the process group with FSDP (unigrad.train.learning.sharding); needs one.
        `total_steps`: optimizer steps of the run, where a linear or cosine `optim.schedule` reaches its floor."""
        self.model = model
        # The KL reference is the starting policy, frozen (only built when beta > 0), whole on every process.
        self.reference = None
        if keep_reference:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.sharded = shard
        # Rollout routing replay (rollout.routing_replay): MoE routers use the engine's recorded expert choices.
        self.replay_routing = False
        # Sharded: a whole copy for the rollout engine, evaluation and saving (see `whole_model`).
        self.whole = copy.deepcopy(model) if shard else model
        self._forward = sharding.shard_model(model) if shard else None  # the FSDP root: sequence_logprobs on model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if optim.schedule != "constant" and total_steps < 1:
            raise ValueError(f"optim.schedule={optim.schedule!r} decays over the run's optimizer steps: give "
                             "total_steps (or optim.schedule='constant')")
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = _adamw(self.params, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                weight_decay=optim.weight_decay)
        # Counted in optimizer steps; `total_steps` (the run's optimizer steps) ends a decaying schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_multiplier, warmup=optim.warmup_steps, total=total_steps, schedule=optim.schedule,
            min_ratio=optim.min_lr_ratio))
        # The weights' moving average for the final model (optim.weight_ema_decay > 0), else None.
        self.weight_average = WeightAverage(self.params, optim.weight_ema_decay) if optim.weight_ema_decay else None

    @property
    def device(self) -> torch.device:
        """Where the model's trained parameters are (`model.device`); log-prob passes run there."""
        return self.params[0].device

    def logprobs(self, batch: SequenceBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp, entropy), both (B, T) with grad, on the learner's device, under the sampling temperature."""
        self.model.train()
        batch = batch.to(self.device)
        forward = self._forward or (lambda *a, **k: sequence_logprobs(self.model, *a, **k))
        replay = batch.routing if self.replay_routing else None  # rollout routing replay (rollout.routing_replay)
        return forward(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                       temperature=temperature, return_entropy=True, observation_mask=batch.observation_mask,
                       routing=replay)

    def idle_pass(self) -> None:
        """A forward and backward pass that adds nothing to the gradient (a one-token row, loss times 0). A sharded
        learner's passes are collectives: a process with fewer micro-batches than the others runs this instead."""
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        batch = SequenceBatch(one, torch.ones_like(one), one, torch.ones_like(one))
        logp, entropy = self.logprobs(batch, 1.0)
        (0.0 * (logp.sum() + entropy.sum())).backward()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights, whole (gathered from the shards when sharded: every process must call this)."""
        return sharding.full_state_dict(self.model) if self.sharded else self.model.state_dict()

    def whole_model(self) -> torch.nn.Module:
        """The model with the current weights, unsharded (every process must call this when sharded)."""
        if self.sharded:
            self.whole.load_state_dict(self.full_state_dict())
        return self.whole

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state for a checkpoint. Sharded: gathered whole on rank 0 (empty elsewhere); every
        process must call this."""
        if not self.sharded:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, self.optimizer, options=options))

    def load_checkpoint_state(self, model_state: dict, optimizer_state: dict) -> None:
        """Restore what `checkpoint_state` returned (every process passes the whole state when sharded)."""
        if not self.sharded:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)

    @torch.no_grad()
    def reference_logprobs(self, batch: SequenceBatch, temperature: float) -> torch.Tensor:
        batch = batch.to(self.device)
        logp, _ = sequence_logprobs(self.reference, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                    batch.completion_mask, temperature=temperature, return_entropy=True,
                                    observation_mask=batch.observation_mask)
        return logp

    def clip_and_step(self, grad_norm_cap: float | None = None) -> tuple[float, str]:
        """Clip the global grad norm, then step. A non-finite gradient skips the step ("nonfinite"), and so
        does a pre-clip norm above `grad_norm_cap` ("grad_cap"); otherwise "ok".

        Returns (pre-clip grad norm, status). Skipped steps leave weights, optimizer and schedule untouched.
        """
        norm = sharding.scalar(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        status = "nonfinite" if not math.isfinite(norm) else "grad_cap" if grad_norm_cap and norm > grad_norm_cap \
            else "ok"
        if status == "ok":
            self.optimizer.step()
            self.scheduler.step()
            if self.weight_average is not None:
                self.weight_average.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, status

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
