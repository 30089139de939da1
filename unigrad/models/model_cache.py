"""The cache of the embedded models (``unigrad-tiny``, ``unigrad-chat``): where it is, how an entry is built, checked
and rebuilt.

An entry is a directory ``cache_root()/models/<name>-<recipe hash>`` in HF format plus ``recipe.json``,
``report.json`` and ``manifest.json`` (format version, model name, sha256 and size of every other file). It is
built in a temporary directory next to its final place and moved there with one ``os.replace``, so a reader sees
a whole entry or none. An entry that fails its manifest check (missing, truncated or altered file) is rebuilt
with a ``RuntimeWarning``. Concurrent builders on one machine wait for each other (file lock) instead of building
twice.
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
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.json"
REPORT_FILE = "report.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", RECIPE_FILE, REPORT_FILE)


class RecipeRecord:
    """What the embedded models' recipes (frozen dataclasses with `tasks` as ((name, weight), ...) and `betas`)
    share: their task names, their JSON form (recipe.json, the cache key) and copies with changes."""

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = [[name, float(w)] for name, w in self.tasks]
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        d["tasks"] = tuple((str(name), float(w)) for name, w in d["tasks"])
        d["betas"] = tuple(d["betas"])
        return cls(**d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def cache_root() -> Path:
    """``$UNIGRAD_CACHE``, else ``$XDG_CACHE_HOME/unigrad``, else ``~/.cache/unigrad``."""
    if os.environ.get("UNIGRAD_CACHE"):
        return Path(os.environ["UNIGRAD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "unigrad"
    return Path.home() / ".cache" / "unigrad"


def entry_dir(name: str, key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of model `name` built from the recipe whose hash is `key`."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / f"{name}-{key}"


def ensure_entry(final: Path, build: Callable[[Path], object], name: str) -> bool:
    """Make sure `final` holds a whole entry: if it fails `verify_cache`, `build(tmp)` writes one into a temporary
    directory, which then replaces `final` (a damaged `final` is removed first, with a warning naming `name`).
    True when this call built it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        problem = verify_cache(final)
        if problem is None:
            return False
        if final.exists():
            warnings.warn(f"{name} cache at {final} is damaged ({problem}); rebuilding it", RuntimeWarning,
                          stacklevel=3)
            trash = final.parent / f".{final.name}.damaged-{os.getpid()}-{time.time_ns()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def verify_cache(path: str | os.PathLike) -> str | None:
    """None if ``path`` holds a complete model matching its manifest, else what is wrong with it."""
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
    for required in REQUIRED_FILES:
        if required not in files:
            return f"manifest lists no {required}"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if sha256_of(f) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


def write_entry(out_dir: Path, model, tokenizer, recipe: dict, report: dict) -> None:
    """Save `model` and `tokenizer` (HF format), the recipe and the report as JSON, then the manifest of them all."""
    save_quietly(model, tokenizer, out_dir)
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(out_dir, report["name"])


def save_quietly(model, tokenizer, out_dir: Path) -> None:
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


def write_manifest(out_dir: Path, name: str) -> None:
    files = {
        f.name: {"sha256": sha256_of(f), "size": f.stat().st_size}
        for f in sorted(out_dir.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "name": name, "files": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def task_data_fingerprint(task_names: tuple[str, ...], seed: int) -> str:
    """A hash of a few train and test examples per task, so that a changed task generator gives a new cache."""
    from unigrad.tasks import get_task

    h = hashlib.sha256()
    for name in task_names:
        task = get_task(name)
        for split in ("train", "test"):
            for ex in task.examples(split, 4, seed):
                h.update(json.dumps([ex.prompt, ex.demonstration, ex.answer]).encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
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
