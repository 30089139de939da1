"""``unigrad-tiny``: the embedded default model, built locally, pretrained to partial competence, cached.

No model hub is needed: a ~1 M-parameter ``LlamaForCausalLM`` with the character-level tokenizer of
``unigrad.models.tokenizer`` is initialised from a seed and pretrained by SFT (loss on the completion tokens
only, AdamW) on the demonstrations of the built-in tasks, stopped early enough that RL has room to improve.

Everything the build does is in a frozen ``TinyRecipe``; the same recipe gives bitwise-identical weights on
the same machine (seeded init, seeded data order, fixed thread count). The result is cached under
``cache_root()/models/unigrad-tiny-<hash>`` where the hash covers the recipe (which includes a format
version) and a fingerprint of the task generators' data. The directory is written atomically (built in a
temporary directory, then ``os.replace``) with ``manifest.json`` (sha256 and size of every file),
``recipe.json`` and ``report.json`` (final loss, parameter count, build time, and the held-out greedy accuracy
per task: ``unigrad.eval.tiny_heldout_accuracy``, which the package root registers for every build however it is
started, evaluation sitting in a layer above models (``unigrad.models.build_evaluations``); ``eval_examples=0``
skips it).
A damaged cache (missing, truncated or altered file) is rebuilt with a warning.

Training packs each batch's examples into rows of ``pack_length`` tokens with a block-diagonal causal mask
and per-example positions (the same logits as unpacked, ~30% less padding). The default recipe, measured on
a 2-core CPU with the tasks' default difficulties: 1.06 M parameters, 750 steps of 48 examples in 98-169 s,
final loss 0.26-0.29, held-out greedy accuracy (200 test prompts each, two builds on two machines)
arithmetic 14-29%, countdown 31%, word_problems 32-34%, code 39-51%, table_qa 25%. The spread is real:
pretraining has phase transitions (arithmetic can jump from ~10% to ~90% within a few hundred steps), so
floating-point differences between machines move the same recipe to different points. ``report.json``
holds the numbers of the model actually built.
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
from unigrad.models.model_cache import (
    FORMAT_VERSION,
    REPORT_FILE,
    RecipeRecord,
    cache_root,  # noqa: F401 - part of this module's interface (unigrad.models re-exports it)
    ensure_entry,
    entry_dir,
    library_versions,
    task_data_fingerprint,
    verify_cache,  # noqa: F401 - part of this module's interface
    write_entry,
)
from unigrad.models.pretrain import pretrain, say, training_data
from unigrad.models.tokenizer import PAD_ID, VOCAB_SIZE, build_char_tokenizer

TINY_NAME = "unigrad-tiny"
TINY_MOE_NAME = "unigrad-tiny-moe"  # the same recipe with 4 experts per layer, 2 routed per token (mismatch lab)
TINY_MOE_EXPERTS = {"num_experts": 4, "experts_per_token": 2, "intermediate_size": 256}

# The held-out evaluation that ends a build: (model, tokenizer, recipe) -> greedy accuracy per task. The build takes
# the one its caller hands in, else the one registered for unigrad-tiny (unigrad.eval.tiny_heldout_accuracy, which
# the package root registers: the models layer sits below eval); with neither it records no accuracy.
BuildEvaluation = Callable[[Any, Any, "TinyRecipe"], dict[str, float]]

# (task name, sampling weight): the built-in tasks (unigrad.tasks.DEFAULT_MIXTURE) and how often each is drawn
# during pretraining. The weights set how far each task gets in 750 steps. Arithmetic examples are short
# (~10 tokens against 30-70 for the others) and the task learns slowest per example, so it is drawn more
# often; code (copying a name and a constant into an expression) learns fastest and is drawn least, else it
# ends near 95% and leaves RL nothing to do.
DEFAULT_TASKS: tuple[tuple[str, float], ...] = (
    ("arithmetic", 2.0),
    ("countdown", 1.0),
    ("word_problems", 1.0),
    ("code", 0.2),
    ("table_qa", 1.0),
)


@dataclass(frozen=True)
class TinyRecipe(RecipeRecord):
    """Every choice that determines the tiny model's weights (its hash names the cache directory)."""

    model_name: ClassVar[str] = TINY_NAME  # not a field: in neither the hash nor recipe.json
    tasks: tuple[tuple[str, float], ...] = DEFAULT_TASKS
    seed: int = 0
    # architecture (Llama, tied embeddings)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    # mixture of experts (Mixtral architecture) when num_experts > 0: each layer's MLP becomes
    # num_experts experts of intermediate_size, experts_per_token of them routed per token
    num_experts: int = 0
    experts_per_token: int = 2
    # data
    train_examples_per_task: int = 4000
    max_length: int = 512  # examples whose prompt + completion exceed this many tokens are skipped
    # optimisation
    steps: int = 750
    batch_size: int = 48  # examples per optimizer step
    pack_length: int = 128  # examples are packed into rows of this many tokens (block-diagonal attention)
    micro_batch_size: int = 16  # packed rows per forward pass (gradients accumulate; same gradient)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    num_threads: int = 2
    # held-out evaluation written to report.json (0 to skip)
    eval_examples: int = 200
    eval_seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("TinyRecipe.tasks must name at least one task")
        if any(w <= 0 for _, w in self.tasks):
            raise ValueError("TinyRecipe.tasks weights must be positive")
        if min(self.steps, self.batch_size, self.micro_batch_size, self.pack_length) < 1:
            raise ValueError("steps, batch_size, micro_batch_size and pack_length must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")



# ----------------------------------------------------------------------------------------------- cache


def tiny_cache_dir(recipe: TinyRecipe | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the model of ``recipe`` is (or will be) cached."""
    return entry_dir(TINY_NAME, _recipe_key(recipe or TinyRecipe()), cache_dir)


_BUILDS = 0


def build_count() -> int:
    """How many tiny models this process has built (for tests of cache reuse)."""
    return _BUILDS


def ensure_tiny(
    recipe: TinyRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    evaluate_built: BuildEvaluation | None = None,
) -> Path:
    """Path of the cached tiny model of ``recipe`` (default recipe if None), building it first if needed.

    A cache directory that fails its manifest check is rebuilt with a ``RuntimeWarning``. Concurrent callers
    on one machine wait for each other (file lock) instead of building twice (``unigrad.models.model_cache``).
    ``evaluate_built``: the held-out evaluation a build ends with; None: the one registered for unigrad-tiny
    (``unigrad.eval.tiny_heldout_accuracy``, see ``unigrad.models.build_evaluations``).
    """
    global _BUILDS
    recipe = recipe or TinyRecipe()
    final = tiny_cache_dir(recipe, cache_dir)
    if ensure_entry(final, lambda tmp: build_tiny(recipe, tmp, progress, evaluate_built), TINY_NAME):
        _BUILDS += 1
    return final


def tiny_report(recipe: TinyRecipe | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The build report of the (cached, built if needed) tiny model: accuracy per task, loss, size, time."""
    return json.loads((ensure_tiny(recipe, cache_dir) / REPORT_FILE).read_text())


# ----------------------------------------------------------------------------------------------- build


def tiny_config(recipe: TinyRecipe):
    """LlamaConfig, or MixtralConfig when the recipe asks for experts."""
    from transformers import LlamaConfig, MixtralConfig

    if recipe.num_experts:
        return MixtralConfig(
            vocab_size=VOCAB_SIZE, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
            num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
            num_key_value_heads=recipe.num_heads, num_local_experts=recipe.num_experts,
            num_experts_per_tok=recipe.experts_per_token, max_position_embeddings=recipe.max_position_embeddings,
            tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, attention_dropout=0.0,
        )
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )


def build_tiny(recipe: TinyRecipe, out_dir: str | os.PathLike, progress: bool = True,
               evaluate_built: BuildEvaluation | None = None) -> dict[str, Any]:
    """Build the model of ``recipe`` into ``out_dir`` (HF format + recipe, report and manifest); its report.
    ``evaluate_built`` (None: the registered one) measures the held-out accuracy it records when
    ``recipe.eval_examples`` > 0."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        data, skipped = training_data(recipe)
        torch.manual_seed(recipe.seed)
        config = tiny_config(recipe)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
        losses = pretrain(model, data, recipe, progress)
        train_seconds = time.perf_counter() - started
        tokenizer = build_char_tokenizer(model_max_length=recipe.max_position_embeddings)
        accuracy: dict[str, float] = {}
        evaluate_built = evaluate_built or build_evaluation(TINY_NAME)
        if recipe.eval_examples > 0 and evaluate_built is not None:
            model.eval()
            accuracy = evaluate_built(model, tokenizer, recipe)
        tail = losses[-max(1, len(losses) // 20) :]
        report = {
            "name": TINY_NAME,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(tail) / len(tail),
            "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
            "heldout_greedy_accuracy": accuracy,
            "eval_examples_per_task": recipe.eval_examples,
            "skipped_too_long": skipped,
            "train_seconds": round(train_seconds, 2),
            "build_seconds": round(time.perf_counter() - started, 2),
            "num_threads": recipe.num_threads,
            "versions": library_versions(),
        }
        write_entry(out_dir, model, tokenizer, recipe.to_dict(), report)
        if progress:
            acc = ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()) or "not evaluated"
            say(
                f"unigrad-tiny: built in {report['build_seconds']:.0f} s, loss {report['final_loss']:.3f}, "
                f"held-out greedy accuracy: {acc}"
            )
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _recipe_key(recipe: TinyRecipe) -> str:
    fields = recipe.to_dict()
    if not recipe.num_experts:  # dense recipes keep the key they had before the MoE option existed
        fields.pop("num_experts"), fields.pop("experts_per_token")
    payload = json.dumps({"recipe": fields, "data": task_data_fingerprint(recipe.task_names, recipe.seed)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
