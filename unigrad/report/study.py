"""Helpers for the comparison studies in examples/: run the real CLI, summarise metrics by phase.

A study runs several configurations through `python -m unigrad.cli train` (so each is exactly what a
user would run), resuming a run directory that a cut-off study left behind, and skipping one that
already finished.
"""

from __future__ import annotations

import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from unigrad.report.run_report import read_metrics


def run_training(run_dir: Path, config: Path | None, overrides: list[str], *, report: bool = True,
                 log: Path | None = None) -> Path:
    """Train into run_dir through the CLI (resume if it holds an unfinished run); then `unigrad report`.
    With `log`, the run's output goes to that file instead of the terminal."""
    run_dir = Path(run_dir)
    if not (run_dir / "final" / "config.json").is_file():
        cmd = [sys.executable, "-m", "unigrad.cli", "train", *([str(config)] if config else []), *overrides,
               "--output-dir", str(run_dir)]
        if (run_dir / "metrics.jsonl").exists():
            cmd.append("--resume")
        if log is None:
            subprocess.run(cmd, check=True)
        else:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    if report:
        subprocess.run([sys.executable, "-m", "unigrad.cli", "report", str(run_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    return run_dir


def run_many(jobs: dict[str, tuple[Path, Path | None, list[str]]], parallel: int = 1) -> dict[str, Path]:
    """Run {name: (run_dir, config, overrides)}; with parallel > 1, that many at once, one torch thread
    each (the tiny model gains little from a second thread) and each run's output in run_dir.log."""
    if parallel <= 1:
        return {name: run_training(*job) for name, job in jobs.items()}
    with ThreadPoolExecutor(parallel) as pool:
        futures = {name: pool.submit(run_training, d, c, [*o, "threads=1"], log=Path(f"{d}.log"))
                   for name, (d, c, o) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


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


NOTES = "<!-- notes: everything below this line is hand-written and kept when the table is regenerated -->"


def write_page(path: Path, generated: str) -> None:
    """Write a study's generated page, keeping the hand-written part below the NOTES marker of the old page."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else NOTES + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated.rstrip() + "\n\n" + notes)
