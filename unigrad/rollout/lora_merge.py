"""A LoRA model's weights merged into plain transformers names, for an engine that holds no adapter (vLLM).

peft's state dict of a LoRA-wrapped causal LM names a target linear layer's frozen weight
`base_model.model.<path>.base_layer.weight` and its adapter `<path>.lora_A.<adapter>.weight` (r x in) and
`<path>.lora_B.<adapter>.weight` (out x r). The layer computes x W^T + scaling * x A^T B^T (LoRA, "LoRA: Low-Rank
Adaptation of Large Language Models", arXiv 2106.09685), i.e. a linear layer with weight W + scaling * B A, where
scaling = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). `merged_lora_state_dict` returns that weight under the
plain name `<path>.weight`, and every other tensor under its plain name too.
"""

from __future__ import annotations

import torch

PEFT_PREFIX = "base_model.model."


def lora_scaling(model: torch.nn.Module, adapter: str = "default") -> float | None:
    """The adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) of a peft LoRA model; None for a plain
    model. Refuses what the merge below does not cover."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is None:
        return None
    if adapter not in peft_config:
        raise ValueError(f"the LoRA model has no adapter {adapter!r} (it has {sorted(peft_config)})")
    config = peft_config[adapter]
    if getattr(config, "peft_type", None) is not None and str(config.peft_type.value) != "LORA":
        raise ValueError(f"only LoRA adapters can be merged for the rollout engine, not {config.peft_type.value}")
    if getattr(config, "fan_in_fan_out", False):
        raise ValueError("LoRA with fan_in_fan_out (GPT-2's Conv1D layers) cannot be merged for the rollout engine")
    r = config.r
    return config.lora_alpha / (r**0.5 if getattr(config, "use_rslora", False) else r)


def merged_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float,
                           adapter: str = "default") -> dict[str, torch.Tensor]:
    """{plain transformers name: tensor} with each adapted weight replaced by W + scaling * B @ A (in W's dtype,
    computed in float32). A LoRA factor without its base weight, or a base weight with one factor, is an error."""
    plain = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in state_dict.items()}
    a_tag, b_tag = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in plain.items():
        if ".lora_" in name:
            if not name.endswith((a_tag, b_tag)):
                raise ValueError(f"cannot merge {name!r}: not a LoRA factor of adapter {adapter!r}")
            continue
        if ".base_layer." not in name:
            merged[name] = tensor
            continue
        path, _, leaf = name.rpartition(".base_layer.")
        if leaf != "weight":  # a bias: unchanged by LoRA
            merged[f"{path}.{leaf}"] = tensor
            continue
        lora_a, lora_b = plain.get(path + a_tag), plain.get(path + b_tag)
        if lora_a is None or lora_b is None:
            raise ValueError(f"{name!r} has no complete LoRA pair {path + a_tag!r} / {path + b_tag!r}")
        delta = lora_b.detach().float() @ lora_a.detach().float()
        merged[f"{path}.weight"] = (tensor.detach().float() + scaling * delta).to(tensor.dtype)
    orphans = [k for k in plain if ".lora_" in k and k.split(".lora_")[0] + ".base_layer.weight" not in plain]
    if orphans:
        raise ValueError(f"LoRA factors without a base weight: {orphans[:3]}")
    return merged
