"""A Mixtral model's weights under the checkpoint names vLLM loads.

transformers 5 holds a Mixtral layer's experts fused, as `<layer>.mlp.experts.gate_up_proj` (experts x 2I x H: each
expert's gate projection w1 in the first I rows, its up projection w3 in the last I) and
`<layer>.mlp.experts.down_proj` (experts x H x I: w2), its router as `<layer>.mlp.gate.weight`; its checkpoints (what
`save_pretrained` writes, what vLLM's weight loader reads) keep Mixtral's original layout,
`<layer>.block_sparse_moe.gate.weight` and `<layer>.block_sparse_moe.experts.<e>.w1|w2|w3.weight`.
`mixtral_checkpoint_state_dict` maps the first onto the second; every other name passes through unchanged, as do
state dicts already in the checkpoint layout (transformers 4).
"""

from __future__ import annotations

import torch

GATE_UP, DOWN, ROUTER = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj", ".mlp.gate.weight"


def mixtral_checkpoint_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{checkpoint name: tensor} for a Mixtral state dict under transformers 5's fused-expert names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith(ROUTER):
            out[name[: -len(ROUTER)] + ".block_sparse_moe.gate.weight"] = tensor
        elif name.endswith(GATE_UP):
            layer = name[: -len(GATE_UP)]
            experts, rows, _ = tensor.shape
            if rows % 2:
                raise ValueError(f"{name}: {rows} rows cannot split into gate and up projections")
            for e in range(experts):
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = gate
                out[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = up
        elif name.endswith(DOWN):
            layer = name[: -len(DOWN)]
            for e in range(tensor.shape[0]):
                out[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def checkpoint_state_dict(state_dict: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """The state dict under the names vLLM's loader reads for `model_type` (config.model_type)."""
    return mixtral_checkpoint_state_dict(state_dict) if model_type == "mixtral" else state_dict
