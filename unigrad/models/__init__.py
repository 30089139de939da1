"""Models and tokenizers: HF loading (local path or hub id), LoRA, the embedded default ``unigrad-tiny`` and the
embedded chat model with tools ``unigrad-chat``.

The names below are imported on first use (PEP 562), so that importing one light submodule (the package root
imports ``unigrad.models.build_evaluations``) does not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unigrad.models.chat_model import CHAT_NAME, ChatRecipe, chat_cache_dir, ensure_chat
    from unigrad.models.loading import (
        DEFAULT_CHAT_TEMPLATE,
        LoraSettings,
        ModelNotFoundError,
        apply_lora,
        load_model_and_tokenizer,
        save_model,
    )
    from unigrad.models.tiny import TINY_NAME, TinyRecipe, cache_root, ensure_tiny, tiny_cache_dir, tiny_report
    from unigrad.models.tokenizer import CHAT_TEMPLATE, build_char_tokenizer

_HOMES = {
    "chat_model": ("CHAT_NAME", "ChatRecipe", "chat_cache_dir", "ensure_chat"),
    "loading": ("DEFAULT_CHAT_TEMPLATE", "LoraSettings", "ModelNotFoundError", "apply_lora",
                "load_model_and_tokenizer", "save_model"),
    "tiny": ("TINY_NAME", "TinyRecipe", "cache_root", "ensure_tiny", "tiny_cache_dir", "tiny_report"),
    "tokenizer": ("CHAT_TEMPLATE", "build_char_tokenizer"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "CHAT_NAME",
    "CHAT_TEMPLATE",
    "ChatRecipe",
    "DEFAULT_CHAT_TEMPLATE",
    "LoraSettings",
    "ModelNotFoundError",
    "TINY_NAME",
    "TinyRecipe",
    "apply_lora",
    "build_char_tokenizer",
    "cache_root",
    "chat_cache_dir",
    "ensure_chat",
    "ensure_tiny",
    "load_model_and_tokenizer",
    "save_model",
    "tiny_cache_dir",
    "tiny_report",
]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
