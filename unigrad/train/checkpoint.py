"""Checkpoints written atomically: model, optimizer, scheduler, sampler and RNG state.

Layout: DIR/checkpoints/step_000050/state.pt. A checkpoint directory is first written under a
temporary name and then renamed, so a kill at any moment leaves either the previous complete
checkpoint or the new complete one, never a half-written file that `--resume` would load.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d{6,})$")


def _dir(root: Path) -> Path:
    return root / "checkpoints"


def save_checkpoint(
    root: Path, step: int, learner, sampler, keep: int = 2, extra: dict[str, Any] | None = None, write: bool = True
) -> Path:
    """`extra`: {name: object with state_dict()} saved beside the rest (e.g. the learning-gain tracker).

    `write`: whether this process writes the files. A sharded learner gathers its state over every process, so
    with sharding all processes call this and only rank 0 writes; without it, the other processes need not call."""
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
        "sampler": sampler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": {name: obj.state_dict() for name, obj in (extra or {}).items()},
    }
    torch.save(state, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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
