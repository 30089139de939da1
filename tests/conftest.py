"""Fixtures shared by the test modules that run the real CLI."""

from pathlib import Path

import pytest
from step_helpers import small_char_llama, turn_ending_llama

from unigrad.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A random 2-layer char-level Llama saved in HF format: loaded through the same path as any model."""
    path = tmp_path_factory.mktemp("model")
    tok = build_char_tokenizer(model_max_length=256)
    small_char_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def turn_ending_model(tmp_path_factory) -> Path:
    """`small_model` taught to end its turns after a few characters: its multi-turn episodes last several turns."""
    path = tmp_path_factory.mktemp("turn_model")
    tok = build_char_tokenizer(model_max_length=256)
    turn_ending_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
