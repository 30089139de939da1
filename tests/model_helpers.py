"""Tiny random transformers models, and a learner switched to plain SGD: what the tests build again and again.

Plain functions, imported by name (`from model_helpers import tiny_model`)."""

import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "cohere": (CohereConfig, CohereForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(vocab_size: int, family: str = "llama", seed: int = 0, **config) -> torch.nn.Module:
    """A random `family` causal LM over `vocab_size` tokens, its weights drawn after `torch.manual_seed(seed)`.
    `config`: fields of the family's config, by transformers' names; unless given, 2 layers of width 32, an MLP
    twice as wide, 2 attention heads with a key/value head each. Every other field (token ids, positions, tied
    embeddings) keeps transformers' default: `pad_token_id` matters (its embedding row starts at zero)."""
    if family not in FAMILIES:
        raise ValueError(f"tiny_model: unknown family {family!r}; known: {sorted(FAMILIES)}")
    config.setdefault("hidden_size", 32)
    config.setdefault("intermediate_size", 2 * config["hidden_size"])
    config.setdefault("num_hidden_layers", 2)
    config.setdefault("num_attention_heads", 2)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config_class(vocab_size=vocab_size, **config))


def char_token_ids(tok) -> dict[str, int]:
    """The special-token fields of a model config for the char tokenizer `tok`."""
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def use_plain_sgd(learner, lr: float) -> None:
    """Replace `learner`'s optimizer by plain SGD at a constant rate: each update is then -lr times the gradient
    (Adam's first step is about lr * sign(g), blind to the gradient's scale)."""
    learner.optimizer = torch.optim.SGD(learner.params, lr=lr)
    learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda _: 1.0)
