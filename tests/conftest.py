"""Fixtures shared by the test modules that run the real CLI."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unigrad.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A random 2-layer char-level Llama saved in HF format: loaded through the same path as any model."""
    path = tmp_path_factory.mktemp("model")
    tok = build_char_tokenizer(model_max_length=256)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
