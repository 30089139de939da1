"""Checkpoints written atomically: model, optimizer, scheduler, sampler and RNG state.

Layout: DIR/checkpoints/step_000050/state.pt. A checkpoint directory is first written under a
temporary name and then renamed, so a kill at any moment leaves either the previous complete
checkpoint or the new complete one, never a half-written file that `--resume` would load. final/ is
published the same way (`publish`). What a killed write leaves (`.tmp-*`) is removed when a run starts or
resumes (`remove_stale_temporaries`); a write that fails (a full disk, no permission) is reported with its path
and the free space (`WriteFailed`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d{6,})$")
_STALE = re.compile(r"^\.(tmp|old)-")


class WriteFailed(OSError):
    """A checkpoint or final/ that could not be written; the message names the path and the free space."""


def write_failed(path: Path, err: OSError) -> WriteFailed:
    try:
        free = f"{shutil.disk_usage(_existing_parent(path)).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = err.strerror or str(err)
    return WriteFailed(err.errno or 0, f"could not write {path}: {reason} ({free}); make room or choose another "
                                       "--output-dir, then continue with --resume")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def publish(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` appear as `final`, replacing an older `final` (never half of either)."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> list[Path]:
    """What killed writes left in a run directory (`.tmp-*`, `.old-*` beside final/ and the checkpoints), removed.
    If final/ itself is missing because a kill came between the two renames of `publish`, its old copy is restored."""
    removed = []
    for folder in (Path(root), _dir(Path(root))):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not _STALE.match(path.name):
                continue
            target = folder / path.name.split("-")[1] if path.name.startswith(".old-") else None
            if target is not None and not target.exists():
                os.replace(path, target)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _dir(root: Path) -> Path:
    return root / "checkpoints"


@dataclass(frozen=True)
class CheckpointParts:
    """What a checkpoint saves: the learner (weights, optimizer, schedule), the task sampler, and `extra`
    {name: object with state_dict()} beside them (e.g. the learning-gain tracker)."""

    learner: Any
    sampler: Any
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(root: Path, step: int, parts: CheckpointParts, keep: int = 2, write: bool = True) -> Path:
    """Checkpoint `step` of `parts` under `root` (written whole or not at all), keeping the `keep` newest.

    `write`: whether this process writes the files. A sharded learner gathers its state over every process, so
    with sharding all processes call this and only rank 0 writes; without it, the other processes need not call."""
    learner = parts.learner
    if not write and not learner.sharded:
        return _dir(root) / f"step_{step:06d}"
    model_state, optimizer_state = learner.checkpoint_state()  # a collective when sharded
    if not write:
        return _dir(root) / f"step_{step:06d}"
    ckpt_dir = _dir(root)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-step_{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "sharded": learner.sharded,
        "scheduler": learner.scheduler.state_dict(),
        "sampler": parts.sampler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": {name: obj.state_dict() for name, obj in parts.extra.items()},
    }
    try:
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError ("unexpected pos ...")
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):
            full = shutil.disk_usage(_existing_parent(final)).free < 2**20
            err = OSError(28, "no space left on device") if full else OSError(0, str(err))
        raise write_failed(final, err) from err
    publish(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_dir = _dir(root)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def looks_readable(path: Path) -> bool:
    """Whether a checkpoint's state.pt is a whole torch file (a zip archive with its directory at the end): a cheap
    check before a resume writes anything; loading it is the full one."""
    import zipfile

    return zipfile.is_zipfile(Path(path) / "state.pt")


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory (`list_checkpoints`) holds, from its name."""
    return int(_NAME.match(Path(path).name).group(1))


def load_latest_checkpoint(root: Path, learner, sampler, extra: dict[str, Any] | None = None) -> int:
    """Restore the newest loadable checkpoint; returns its step (0 if there is none).

    `extra`: {name: object with load_state_dict()}, restored from what `save_checkpoint` saved."""
    for path in reversed(list_checkpoints(root)):
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint: fall back to the previous one
            import warnings

            warnings.warn(f"checkpoint {path} is unreadable ({err!r}); trying an older one", stacklevel=2)
            continue
        if state.get("sharded", False) != learner.sharded:  # the optimizer states are keyed differently
            raise ValueError(f"checkpoint {path} was written with sharding={'fsdp' if state.get('sharded') else 'none'}"
                             f"; resume it with the same setting")
        learner.load_checkpoint_state(state["model"], state["optimizer"])
        learner.scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        for name, obj in (extra or {}).items():
            if name in state["extra"]:
                obj.load_state_dict(state["extra"][name])
        torch.set_rng_state(state["rng"]["torch"])
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        return int(state["step"])
    return 0
