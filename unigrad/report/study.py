"""Helpers for the comparison studies in examples/: run the real CLI, summarise metrics by phase.

A study runs several configurations through `python -m unigrad.cli train` (so each is exactly what a
user would run), resuming a run directory that a cut-off study left behind, and skipping one that
already finished.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from unigrad.report.run_report import read_metrics


def run_training(run_dir: Path, config: Path | None, overrides: list[str], *, report: bool = True) -> Path:
    """Train into run_dir through the CLI (resume if it holds an unfinished run); then `unigrad report`."""
    run_dir = Path(run_dir)
    if not (run_dir / "final" / "config.json").is_file():
        cmd = [sys.executable, "-m", "unigrad.cli", "train", *([str(config)] if config else []), *overrides,
               "--output-dir", str(run_dir)]
        if (run_dir / "metrics.jsonl").exists():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
    if report:
        subprocess.run([sys.executable, "-m", "unigrad.cli", "report", str(run_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    return run_dir


def phase_means(run_dir: Path, keys: list[str], phases: int = 3) -> dict[str, list[float]]:
    """{key: [mean over the first 1/phases of the steps, ..., over the last]} (NaN where never logged)."""
    rows = read_metrics(run_dir)
    out = {}
    for key in keys:
        values = []
        for p in range(phases):
            part = rows[p * len(rows) // phases:(p + 1) * len(rows) // phases]
            finite = [r[key] for r in part if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            values.append(sum(finite) / len(finite) if finite else float("nan"))
        out[key] = values
    return out


def fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}" if (x != 0 and abs(x) < 1e-2) else f"{x:.{digits}f}"
