"""The run directory's logs: metrics.jsonl, samples.jsonl, TensorBoard events, optional trackers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf; None reads back unambiguously
    return value


class RunLogger:
    def __init__(self, root: Path, tensorboard: bool = True, trackers: list | None = None):
        self.root = root
        self.trackers = trackers or []  # unigrad.train.lifecycle.trackers: W&B, MLflow, trackio
        self.metrics = open(root / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.samples = open(root / "samples.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON logs still hold everything
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(root))

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        line = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        os.fsync(self.metrics.fileno())
        for s in samples:
            self.samples.write(json.dumps(s) + "\n")
        self.samples.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (a resumed run re-logs those steps)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
