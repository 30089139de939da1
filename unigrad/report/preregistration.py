"""When a study file was committed, for the page's preregistration line: the commit that first added the file and
the last commit that changed it (`git log` on the file), so a reader can check that the file predates its runs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileHistory:
    first_commit: str
    first_date: str  # ISO date, YYYY-MM-DD
    last_commit: str
    last_date: str


def parse_log(text: str) -> FileHistory | None:
    """From `git log --follow --format='%h %cs'` output (newest first, one commit a line): the oldest and newest
    commit; None when the file has no commit."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows:
        return None
    for row in rows:
        if len(row) != 2:
            raise ValueError(f"unexpected git log line {' '.join(row)!r}: expected 'HASH YYYY-MM-DD'")
    return FileHistory(rows[-1][0], rows[-1][1], rows[0][0], rows[0][1])


def file_history(path: str | Path) -> FileHistory | None:
    """The study file's commits (None: not in a git work tree, git missing, or never committed)."""
    path = Path(path).resolve()
    try:
        out = subprocess.run(["git", "log", "--follow", "--format=%h %cs", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return parse_log(out)


def preregistration_line(path: str | Path) -> str:
    """One sentence for the page: when the study file was first committed and last changed, or that it never was."""
    history = file_history(path)
    if history is None:
        return f"Study file {Path(path).name}: not committed (no preregistration record)."
    text = f"Study file first committed at {history.first_commit} ({history.first_date})"
    if history.last_commit != history.first_commit:
        text += f", last changed at {history.last_commit} ({history.last_date})"
    return text + ": runs that predate a change ran an earlier version of the file."
