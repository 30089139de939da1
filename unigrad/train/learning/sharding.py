"""A sharded learner: `sharding=fsdp` shards parameters, gradients and AdamW state over the processes with torch's
FSDP2 (`torch.distributed.fsdp.fully_shard`), instead of every process holding a full replica.

Layout. Every decoder layer is its own FSDP unit; the rest (embeddings, final norm, lm_head, tied or not) forms the
root unit. The root is a small wrapper module whose forward is `sequence_logprobs`: the learner's log-prob pass
calls the decoder and the lm_head directly (to chunk the logits), which would bypass a root installed on the causal
LM itself. Through the wrapper, FSDP gathers the root's parameters before the pass and reduce-scatters their
gradients after the backward, as for any module. A group's rows do not share their prompt pass here: sharing is
decided per micro-batch and costs a second decoder call, and every process must make the same calls.

Semantics. Gradients are summed over processes (not averaged), as in the replicated path: the loss normalisers are
already global, so each process's backward yields its share of the single-process gradient. Every FSDP forward and
backward is a collective, so all processes must run the same sequence of learner passes: the training step pads a
process that has fewer micro-batches in a group with `idle_pass` (a one-token pass whose loss is multiplied by 0).

What stays whole on every process: the rollout engine's copy of the model (synchronised from `full_state_dict`
after each optimizer step), the frozen KL reference, and the copy rank 0 evaluates and saves.
"""

from __future__ import annotations

import torch
from torch import nn

from unigrad.diagnostics.sharded_grads import flat_local_grads, is_sharded, local, set_flat_grads  # noqa: F401
from unigrad.rollout.logprobs import sequence_logprobs


class LogprobModule(nn.Module):
    """`sequence_logprobs(model, ...)` as a module, so that FSDP's root hooks wrap the learner's whole pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        # No prompt sharing: it makes two decoder calls instead of one, chosen per micro-batch by how much it saves,
        # and FSDP needs every process to make the same calls (a mismatch deadlocks the collectives).
        return sequence_logprobs(self.model, *args, share_prompts=False, **kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class transformers marks as not to be split across devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module) -> LogprobModule:
    """Shard `model` in place over the default process group (one FSDP unit per decoder layer, the rest in the
    root); returns the root module whose forward is `sequence_logprobs` on `model`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    root = LogprobModule(model)
    fully_shard(root, mesh=mesh)
    for module in root.modules():
        if isinstance(module, FSDPModule):  # sum, not mean, over processes; plain SUM (gloo has no PREMUL_SUM)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole. A collective when the model is sharded:
    every process must call it."""
    return {k: v.full_tensor() if is_sharded(v) else v for k, v in model.state_dict().items()}


def scalar(value: torch.Tensor) -> float:
    """A reduced scalar (e.g. clip_grad_norm_'s total norm, sharded when the gradients are) as a float."""
    return float(value.full_tensor() if is_sharded(value) else value)
