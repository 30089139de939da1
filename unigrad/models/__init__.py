"""Models and tokenizers: HF loading (local path or hub id), LoRA, the embedded default ``unigrad-tiny`` and the
embedded chat model with tools ``unigrad-chat``."""

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
