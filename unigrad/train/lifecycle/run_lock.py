"""One run at a time per run directory: a lock file (`DIR/.lock`, holding the owner's pid) locked with `flock` for
the run's whole life. A second `unigrad train` on the same directory is refused, naming the pid that holds it. The
kernel releases the lock when the process ends, however it ends, so a crashed run never leaves the directory
locked; a run that ends normally also removes the file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirectoryBusy(FileExistsError):
    """Another process is training into the same run directory."""


class RunDirectoryLock:
    """`acquire()` takes the directory's lock or raises RunDirectoryBusy; `release()` gives it back (idempotent)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryBusy(
                    f"{self.path.parent} is in use by another unigrad train (pid {holder}); wait for it to end (or "
                    "stop it), or choose another --output-dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino  # not a file its last owner just removed
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting process then makes a fresh one
        finally:
            os.close(self._fd)
            self._fd = None
