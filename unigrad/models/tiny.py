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
per task when the caller passes the evaluation a build ends with: ``ensure_tiny(evaluate_built=
unigrad.eval.tiny_heldout_accuracy)``; evaluation sits in a layer above models, so it is handed in).
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

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unigrad.models.pretrain import pretrain, say, training_data
from unigrad.models.tokenizer import PAD_ID, VOCAB_SIZE, build_char_tokenizer

TINY_NAME = "unigrad-tiny"
TINY_MOE_NAME = "unigrad-tiny-moe"  # the same recipe with 4 experts per layer, 2 routed per token (mismatch lab)
TINY_MOE_EXPERTS = {"num_experts": 4, "experts_per_token": 2, "intermediate_size": 256}
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.json"
REPORT_FILE = "report.json"

# The held-out evaluation that ends a build: (model, tokenizer, recipe) -> greedy accuracy per task. The build
# takes it from its caller (unigrad.eval.tiny_heldout_accuracy; the models layer sits below eval), and a build
# given none records no accuracy (report.json's "heldout_greedy_accuracy" is {}).
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
class TinyRecipe:
    """Every choice that determines the tiny model's weights (its hash names the cache directory)."""

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

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = [[name, float(w)] for name, w in self.tasks]
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyRecipe:
        d = dict(d)
        d["tasks"] = tuple((str(name), float(w)) for name, w in d["tasks"])
        d["betas"] = tuple(d["betas"])
        return cls(**d)

    def replace(self, **changes: Any) -> TinyRecipe:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$UNIGRAD_CACHE``, else ``$XDG_CACHE_HOME/unigrad``, else ``~/.cache/unigrad``."""
    if os.environ.get("UNIGRAD_CACHE"):
        return Path(os.environ["UNIGRAD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "unigrad"
    return Path.home() / ".cache" / "unigrad"


def tiny_cache_dir(recipe: TinyRecipe | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the model of ``recipe`` is (or will be) cached."""
    recipe = recipe or TinyRecipe()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / f"{TINY_NAME}-{_recipe_key(recipe)}"


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
    on one machine wait for each other (file lock) instead of building twice. ``evaluate_built``: the held-out
    evaluation a build ends with (``unigrad.eval.tiny_heldout_accuracy``); None: a build records no accuracy.
    """
    global _BUILDS
    recipe = recipe or TinyRecipe()
    final = tiny_cache_dir(recipe, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f"{final.name}.lock"):
        problem = verify_cache(final)
        if problem is None:
            return final
        if final.exists():
            warnings.warn(
                f"unigrad-tiny cache at {final} is damaged ({problem}); rebuilding it", RuntimeWarning, stacklevel=2
            )
            trash = final.parent / f".{final.name}.damaged-{os.getpid()}-{time.time_ns()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build_tiny(recipe, tmp, progress=progress, evaluate_built=evaluate_built)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _BUILDS += 1
    return final


def verify_cache(path: str | os.PathLike) -> str | None:
    """None if ``path`` holds a complete tiny model matching its manifest, else what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest: {e}"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')} != {FORMAT_VERSION}"
    for required in ("config.json", "model.safetensors", "tokenizer.json", RECIPE_FILE, REPORT_FILE):
        if required not in files:
            return f"manifest lists no {required}"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


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
    ``evaluate_built`` (when given and ``recipe.eval_examples`` > 0) measures the held-out accuracy it records."""
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
            "versions": _versions(),
        }
        _save_quietly(model, tokenizer, out_dir)
        (out_dir / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _write_manifest(out_dir, recipe)
        if progress:
            acc = ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()) or "not evaluated"
            say(
                f"unigrad-tiny: built in {report['build_seconds']:.0f} s, loss {report['final_loss']:.3f}, "
                f"held-out greedy accuracy: {acc}"
            )
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _save_quietly(model, tokenizer, out_dir: Path) -> None:
    """``save_pretrained`` without transformers' own "Writing model shards" progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _recipe_key(recipe: TinyRecipe) -> str:
    fields = recipe.to_dict()
    if not recipe.num_experts:  # dense recipes keep the key they had before the MoE option existed
        fields.pop("num_experts"), fields.pop("experts_per_token")
    payload = json.dumps({"recipe": fields, "data": _data_fingerprint(recipe)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _data_fingerprint(recipe: TinyRecipe) -> str:
    """A hash of a few train and test examples per task, so that a changed task generator gives a new cache."""
    from unigrad.tasks import get_task

    h = hashlib.sha256()
    for name in recipe.task_names:
        task = get_task(name)
        for split in ("train", "test"):
            for ex in task.examples(split, 4, recipe.seed):
                h.update(json.dumps([ex.prompt, ex.demonstration, ex.answer]).encode())
    return h.hexdigest()


def _write_manifest(out_dir: Path, recipe: TinyRecipe) -> None:
    files = {
        f.name: {"sha256": _sha256(f), "size": f.stat().st_size}
        for f in sorted(out_dir.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "name": TINY_NAME, "files": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
