"""``unigrad-chat``: a second embedded model, with a byte-level BPE tokenizer and a chat template with tools.

Where ``unigrad-tiny`` has one token per character and a template without tools, this model has what real chat
models have: multi-token words, special tokens, a Qwen2.5 / Hermes-style template (``unigrad.models.chat_tokenizer``)
that renders ``tools=`` and ``tool_calls`` and tool results, so its tool style is "hf". It is a
``Qwen2ForCausalLM`` (grouped-query attention, tied embeddings), built locally like the tiny model: the BPE is
trained on the rendered training chats, then the model is pretrained by SFT (loss on the assistant turns only) on
the built-in tasks' train examples as chats, including calculator transcripts for ``countdown_calc``
(``unigrad.models.chat_data``), through the tiny model's packing and training loop (``unigrad.models.pretrain``).

Everything the build does is in a frozen ``ChatRecipe``; the result is cached under
``cache_root()/models/unigrad-chat-<hash>`` with the guarantees of ``unigrad.models.model_cache`` (atomic write,
manifest, damaged entries rebuilt). ``report.json`` holds the numbers of the model actually built; the measured
default is described in docs/environments.md ("unigrad-chat").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from unigrad.models.build_evaluations import build_evaluation
from unigrad.models.chat_data import chat_text_and_spans, encode_with_masks, task_chats
from unigrad.models.chat_tokenizer import IM_END_ID, IM_START_ID, PAD_ID, train_chat_tokenizer
from unigrad.models.model_cache import (
    FORMAT_VERSION,
    REPORT_FILE,
    RecipeRecord,
    ensure_entry,
    entry_dir,
    library_versions,
    task_data_fingerprint,
    write_entry,
)
from unigrad.models.pretrain import pretrain, say

CHAT_NAME = "unigrad-chat"

# The five built-in single-turn tasks, weighted as for unigrad-tiny, and countdown with the calculator.
DEFAULT_CHAT_TASKS: tuple[tuple[str, float], ...] = (
    ("arithmetic", 2.0),
    ("countdown", 1.0),
    ("word_problems", 1.0),
    ("code", 0.2),
    ("table_qa", 1.0),
    ("countdown_calc", 1.0),
)

# The held-out evaluation that ends a build: (model, tokenizer, recipe) -> entries of report.json
# ({"heldout_greedy_accuracy": {...}, "heldout_tool_calls": {...}}); unigrad.eval.chat_heldout_report is the one.
# The build takes the one its caller hands in, else the one registered for unigrad-chat (the package root registers
# it: the models layer sits below eval, unigrad.models.build_evaluations); with neither it records no accuracy.
ChatEvaluation = Callable[[Any, Any, "ChatRecipe"], dict[str, Any]]


@dataclass(frozen=True)
class ChatRecipe(RecipeRecord):
    """Every choice that determines unigrad-chat's tokenizer and weights (its hash names the cache directory)."""

    model_name: ClassVar[str] = CHAT_NAME
    tasks: tuple[tuple[str, float], ...] = DEFAULT_CHAT_TASKS
    seed: int = 0
    vocab_size: int = 1024  # byte-level BPE: 256 bytes, 7 added tokens, the rest merges
    # architecture (Qwen2, tied embeddings, grouped-query attention)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    # data
    train_examples_per_task: int = 4000
    max_length: int = 512  # chats longer than this many tokens are skipped
    # optimisation (unigrad.models.pretrain)
    steps: int = 750
    batch_size: int = 48
    pack_length: int = 256
    micro_batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    num_threads: int = 2
    # held-out evaluation written to report.json (0 to skip)
    eval_examples: int = 100
    eval_seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.tasks or any(w <= 0 for _, w in self.tasks):
            raise ValueError("ChatRecipe.tasks must name at least one task, each with a positive weight")
        if min(self.steps, self.batch_size, self.micro_batch_size, self.pack_length) < 1:
            raise ValueError("steps, batch_size, micro_batch_size and pack_length must be >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be a multiple of num_heads, and num_heads of num_kv_heads")



def chat_cache_dir(recipe: ChatRecipe | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the model of ``recipe`` is (or will be) cached."""
    recipe = recipe or ChatRecipe()
    payload = json.dumps({"recipe": recipe.to_dict(), "data": task_data_fingerprint(recipe.task_names, recipe.seed)},
                         sort_keys=True)
    return entry_dir(CHAT_NAME, hashlib.sha256(payload.encode()).hexdigest()[:16], cache_dir)


def ensure_chat(recipe: ChatRecipe | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                evaluate_built: ChatEvaluation | None = None) -> Path:
    """Path of the cached unigrad-chat of ``recipe`` (default recipe if None), building it first if needed (a
    damaged entry is rebuilt with a ``RuntimeWarning``). ``evaluate_built``: the held-out evaluation a build ends
    with; None: the one registered for unigrad-chat (``unigrad.eval.chat_heldout_report``)."""
    recipe = recipe or ChatRecipe()
    final = chat_cache_dir(recipe, cache_dir)
    ensure_entry(final, lambda tmp: build_chat(recipe, tmp, progress, evaluate_built), CHAT_NAME)
    return final


def chat_report(recipe: ChatRecipe | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The build report of the (cached, built if needed) unigrad-chat."""
    return json.loads((ensure_chat(recipe, cache_dir) / REPORT_FILE).read_text())


# ----------------------------------------------------------------------------------------------- build


def chat_config(recipe: ChatRecipe, vocab_size: int):
    """The Qwen2Config of ``recipe`` for a tokenizer of ``vocab_size`` tokens."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=IM_START_ID, eos_token_id=IM_END_ID,
        attention_dropout=0.0, use_sliding_window=False,
    )


def chat_training_data(recipe: ChatRecipe):
    """(tokenizer, data, skipped): the BPE trained on the rendered chats of every task; per task, (token ids,
    loss mask) of each chat; how many chats per task were longer than ``recipe.max_length`` tokens."""
    from unigrad.tasks import get_task

    rendered = []
    for name in recipe.task_names:
        task = get_task(name)
        chats = task_chats(task, task.examples("train", recipe.train_examples_per_task, recipe.seed), recipe.seed)
        if not chats:
            raise ValueError(f"task {name!r} gave no usable demonstrations for unigrad-chat")
        rendered.append([chat_text_and_spans(chat) for chat in chats])
    tokenizer = train_chat_tokenizer((text for texts in rendered for text, _ in texts), recipe.vocab_size,
                                     recipe.max_position_embeddings)
    data, skipped = [], {}
    for name, texts in zip(recipe.task_names, rendered, strict=True):
        rows = encode_with_masks(tokenizer, texts)
        data.append([row for row in rows if len(row[0]) <= recipe.max_length])
        skipped[name] = len(rows) - len(data[-1])
        if not data[-1]:
            raise ValueError(f"every chat of task {name!r} is longer than max_length={recipe.max_length} tokens")
    return tokenizer, data, skipped


def build_chat(recipe: ChatRecipe, out_dir: str | os.PathLike, progress: bool = True,
               evaluate_built: ChatEvaluation | None = None) -> dict[str, Any]:
    """Build the model of ``recipe`` into ``out_dir`` (HF format + recipe, report and manifest); its report."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        tokenizer, data, skipped = chat_training_data(recipe)
        torch.manual_seed(recipe.seed)
        model = Qwen2ForCausalLM(chat_config(recipe, len(tokenizer)))
        model.generation_config = GenerationConfig(bos_token_id=IM_START_ID, eos_token_id=IM_END_ID,
                                                   pad_token_id=PAD_ID)
        losses = pretrain(model, data, recipe, progress)
        train_seconds = time.perf_counter() - started
        heldout: dict[str, Any] = {"heldout_greedy_accuracy": {}}
        evaluate_built = evaluate_built or build_evaluation(CHAT_NAME)
        if recipe.eval_examples > 0 and evaluate_built is not None:
            model.eval()
            heldout.update(evaluate_built(model, tokenizer, recipe))
        report = _report(model, tokenizer, losses, heldout, skipped)
        report.update(train_seconds=round(train_seconds, 2), build_seconds=round(time.perf_counter() - started, 2),
                      num_threads=recipe.num_threads, eval_examples_per_task=recipe.eval_examples)
        write_entry(out_dir, model, tokenizer, recipe.to_dict(), report)
        if progress:
            acc = ", ".join(f"{k} {v:.0%}" for k, v in heldout["heldout_greedy_accuracy"].items()) or "not evaluated"
            say(f"{CHAT_NAME}: built in {report['build_seconds']:.0f} s, loss {report['final_loss']:.3f}, "
                f"held-out greedy accuracy: {acc}")
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _report(model, tokenizer, losses: list[float], heldout: dict[str, Any], skipped: dict[str, int]) -> dict:
    tail = losses[-max(1, len(losses) // 20):]
    return {
        "name": CHAT_NAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "final_loss": sum(tail) / len(tail),
        "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
        **heldout,
        "skipped_too_long": skipped,
        "versions": library_versions(),
    }
