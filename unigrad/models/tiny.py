"""``unigrad-tiny``: the embedded default model, built locally, pretrained to partial competence, cached.

No model hub is needed: a ~1 M-parameter ``LlamaForCausalLM`` with the character-level tokenizer of
``unigrad.models.tokenizer`` is initialised from a seed and pretrained by SFT (loss on the completion tokens
only, AdamW) on the demonstrations of the built-in tasks, stopped early enough that RL has room to improve.

Everything the build does is in a frozen ``TinyRecipe``; the same recipe gives bitwise-identical weights on
the same machine (seeded init, seeded data order, fixed thread count). The result is cached under
``cache_root()/models/unigrad-tiny-<hash>`` where the hash covers the recipe (which includes a format
version) and a fingerprint of the task generators' data. The directory is written atomically (built in a
temporary directory, then ``os.replace``) with ``manifest.json`` (sha256 and size of every file),
``recipe.json`` and ``report.json`` (held-out greedy accuracy per task, final loss, parameter count, build
time). A damaged cache (missing, truncated or altered file) is rebuilt with a warning.

Training packs each batch's examples into rows of ``pack_length`` tokens with a block-diagonal causal mask
and per-example positions (the same logits as unpacked, ~30% less padding). The default recipe, measured on
a 2-core CPU with the tasks' default difficulties: 1.06 M parameters, 750 steps of 48 examples in ~136 s,
final loss 0.27, held-out greedy accuracy (200 test prompts each) arithmetic 34%, countdown 20%,
word_problems 30%, code 38%, table_qa 24%. ``report.json`` holds the numbers of the model actually built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unigrad.models.tokenizer import PAD_ID, VOCAB_SIZE, build_char_tokenizer, completion_ids, prompt_ids

TINY_NAME = "unigrad-tiny"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.json"
REPORT_FILE = "report.json"

# (task name, sampling weight): the built-in tasks (unigrad.tasks.DEFAULT_MIXTURE) and how often each is drawn
# during pretraining. Arithmetic examples are short (~10 tokens against 30-70 for the others), so drawing them
# more often is cheap and lifts the task, which learns slowest per example, into partial competence.
DEFAULT_TASKS: tuple[tuple[str, float], ...] = (
    ("arithmetic", 4.0),
    ("countdown", 1.0),
    ("word_problems", 1.0),
    ("code", 1.0),
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
) -> Path:
    """Path of the cached tiny model of ``recipe`` (default recipe if None), building it first if needed.

    A cache directory that fails its manifest check is rebuilt with a ``RuntimeWarning``. Concurrent callers
    on one machine wait for each other (file lock) instead of building twice.
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
            build_tiny(recipe, tmp, progress=progress)
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
    from transformers import LlamaConfig

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


def build_tiny(recipe: TinyRecipe, out_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Build the model of ``recipe`` into ``out_dir`` (HF format + recipe, report and manifest); its report."""
    from transformers import GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        data, skipped = _training_data(recipe)
        torch.manual_seed(recipe.seed)
        config = tiny_config(recipe)
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
        losses = _pretrain(model, data, recipe, progress)
        train_seconds = time.perf_counter() - started
        tokenizer = build_char_tokenizer(model_max_length=recipe.max_position_embeddings)
        accuracy: dict[str, float] = {}
        if recipe.eval_examples > 0:
            from unigrad.eval import evaluate
            from unigrad.tasks import get_task

            model.eval()
            # Demonstrations are at most ~40 characters; 48 new tokens leave room for the EOS.
            res = evaluate(model, tokenizer, [get_task(t) for t in recipe.task_names], recipe.eval_examples,
                           max_new_tokens=48, seed=recipe.eval_seed)
            accuracy = {t: res[t]["pass@1"] for t in recipe.task_names}
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
            _say(
                f"unigrad-tiny: built in {report['build_seconds']:.0f} s, loss {report['final_loss']:.3f}, "
                f"held-out greedy accuracy: {acc}"
            )
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _training_data(recipe: TinyRecipe) -> tuple[list[list[tuple[list[int], int]]], dict[str, int]]:
    """Per task, (token ids, prompt length) of each demonstration; and how many were too long, per task."""
    from unigrad.tasks import get_task

    data: list[list[tuple[list[int], int]]] = []
    skipped: dict[str, int] = {}
    for name, _ in recipe.tasks:
        rows: list[tuple[list[int], int]] = []
        skipped[name] = 0
        for ex in get_task(name).examples("train", recipe.train_examples_per_task, recipe.seed):
            if ex.demonstration is None:
                continue
            p, c = prompt_ids(ex.prompt), completion_ids(ex.demonstration)
            if len(p) + len(c) > recipe.max_length:
                skipped[name] += 1
                continue
            rows.append((p + c, len(p)))
        if not rows:
            raise ValueError(f"task {name!r} gave no usable demonstrations for the tiny model")
        data.append(rows)
    return data, skipped


def _batches(data: list[list[tuple[list[int], int]]], recipe: TinyRecipe) -> Iterator[list[tuple[list[int], int]]]:
    """A seeded stream of batches: each row draws its task by weight, then an example (epochs, shuffled)."""
    g = torch.Generator().manual_seed(recipe.seed)
    weights = torch.tensor([w for _, w in recipe.tasks], dtype=torch.float64)
    orders = [torch.randperm(len(rows), generator=g).tolist() for rows in data]
    cursors = [0] * len(data)
    while True:
        batch = []
        for t in torch.multinomial(weights, recipe.batch_size, replacement=True, generator=g).tolist():
            if cursors[t] == len(orders[t]):
                orders[t] = torch.randperm(len(data[t]), generator=g).tolist()
                cursors[t] = 0
            batch.append(data[t][orders[t][cursors[t]]])
            cursors[t] += 1
        yield batch


def _pack(batch: list[tuple[list[int], int]], capacity: int) -> list[list[tuple[list[int], int]]]:
    """First-fit decreasing: the batch's examples in rows of at most ``capacity`` tokens (a longer one alone)."""
    rows: list[list[tuple[list[int], int]]] = []
    room: list[int] = []
    for example in sorted(batch, key=lambda r: -len(r[0])):  # stable: ties keep the batch order
        n = len(example[0])
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(example)
                room[i] -= n
                break
        else:
            rows.append([example])
            room.append(capacity - n)
    return rows


def _micro_batches(batch: list[tuple[list[int], int]], recipe: TinyRecipe) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batch packed into rows, ``micro_batch_size`` rows at a time: (input_ids, attention_mask, position_ids,
    labels). Each example attends only to itself (4-D block-diagonal causal additive mask) and has positions from
    0, so its logits equal those of the example alone; labels are -100 except on completion tokens and eos."""
    rows = _pack(batch, recipe.pack_length)
    for start in range(0, len(rows), recipe.micro_batch_size):
        chunk = rows[start : start + recipe.micro_batch_size]
        width = max(sum(len(ids) for ids, _ in row) for row in chunk)
        input_ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        position_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        segment = torch.full((len(chunk), width), -1, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, row in enumerate(chunk):
            at = 0
            for j, (ids, n_prompt) in enumerate(row):
                n = len(ids)
                input_ids[i, at : at + n] = torch.tensor(ids)
                position_ids[i, at : at + n] = torch.arange(n)
                segment[i, at : at + n] = j
                labels[i, at + n_prompt : at + n] = input_ids[i, at + n_prompt : at + n]  # completion + eos only
                at += n
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        allowed = (same & causal)[:, None] | torch.eye(width, dtype=torch.bool)  # padding sees itself: no empty rows
        # Additive float mask: eager attention adds it to the scores (a bool mask would be added as 0/1).
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        yield input_ids, mask, position_ids, labels


def _pretrain(model, data, recipe: TinyRecipe, progress: bool, on_step=None) -> list[float]:
    """SFT with a token-mean loss over the completion tokens of each whole batch; the loss per step.

    ``on_step(step, model)``, if given, is called after each optimizer step (for learning-curve probes).
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=recipe.betas,
    )

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        span = max(1, recipe.steps - recipe.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - recipe.warmup_steps) / span)))
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    batches = _batches(data, recipe)
    with _Progress(recipe.steps, enabled=progress) as bar:
        for _ in range(recipe.steps):
            micro = list(_micro_batches(next(batches), recipe))
            n_tokens = sum(int((labels[:, 1:] != -100).sum()) for *_, labels in micro)
            total = 0.0
            for input_ids, attention_mask, position_ids, labels in micro:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
                logits = logits[:, :-1]
                targets = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                ) / max(n_tokens, 1)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.advance(total)
            if on_step is not None:
                on_step(len(losses), model)
                model.train()
    return losses


# ----------------------------------------------------------------------------------------------- helpers


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
    payload = json.dumps({"recipe": recipe.to_dict(), "data": _data_fingerprint(recipe)}, sort_keys=True)
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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Progress:
    """A rich progress bar on a terminal; otherwise a log line with the loss every ~10% of the steps."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.step = total, enabled, 0
        self.started = time.perf_counter()
        self.every = max(1, total // 10)
        self._rich = None
        self._ema: float | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            _say(f"unigrad-tiny: building the default model ({self.total} SFT steps); cached after the first time")
            if sys.stderr.isatty():
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self._rich = Progress(
                    TextColumn("unigrad-tiny SFT"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]}"),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    transient=True,
                )
                self._rich.__enter__()
                self._task = self._rich.add_task("sft", total=self.total, loss="-")
        return self

    def advance(self, loss: float) -> None:
        self.step += 1
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=1, loss=f"{self._ema:.3f}")
        elif self.step % self.every == 0 or self.step == self.total:
            _say(
                f"unigrad-tiny: step {self.step}/{self.total} loss {self._ema:.3f} "
                f"({time.perf_counter() - self.started:.0f} s)"
            )

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
