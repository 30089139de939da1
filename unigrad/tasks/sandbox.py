"""Running untrusted Python (model-written code) in a contained subprocess.

Each snippet gets: a fresh empty temporary working directory (deleted afterwards); `python -I -S
-B` (isolated: no user site, no PYTHON* variables, no cwd on sys.path; no site-packages; no .pyc
writes); a minimal environment (no secrets of the parent); stdin closed; stdout and stderr into
anonymous files whose size RLIMIT_FSIZE caps; its own session and process group, killed as a
whole on timeout and after exit; and, inside the child (`sandbox_child.py`), rlimits on CPU time,
address space, file size, open files, processes and core files plus an audit hook that blocks
process creation, network, deletion and writing outside the working directory.

When the parent runs as root (as in many containers), RLIMIT_NPROC does not bind, so the child
also drops to the `nobody` user if the interpreter is reachable by it (probed once); otherwise a
warning says that containment rests on the audit hook and the other limits. For adversarial
code at scale, put this inside a container or gVisor as well: an audit hook is not a security
boundary (PEP 578).

`run_many` runs snippets in parallel from a small thread pool (subprocess creation without
`preexec_fn` is thread-safe).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text()


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 5.0  # wall-clock seconds before the process group is killed
    cpu_seconds: int = 5  # RLIMIT_CPU
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS (address space, so generous: the interpreter maps ~30 MB)
    file_bytes: int = 2**20  # RLIMIT_FSIZE: largest file the child may write, its stdout included
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 0  # RLIMIT_NPROC: no fork at all (ignored by the kernel for root; see module doc)
    output_chars: int = 65536  # how much of stdout / stderr is read back


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (e.g. -9 on timeout)
    stdout: str
    stderr: str
    timed_out: bool
    duration: float  # wall-clock seconds
    pid: int  # also the child's process-group id, so tests can check that nothing survived

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


DEFAULT_LIMITS = SandboxLimits()


_probe_lock = threading.Lock()


def _unprivileged_ids(python: str) -> tuple[int, int] | None:
    """(uid, gid) of `nobody` if we are root and `python` can run as it; else None."""
    if os.geteuid() != 0:
        return None
    with _probe_lock:  # probe once per interpreter, even when called from run_many's threads
        return _probe_unprivileged(python)


@functools.cache
def _probe_unprivileged(python: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
        ids = (entry.pw_uid, entry.pw_gid)
    except KeyError:
        ids = (65534, 65534)
    try:
        probe = subprocess.run(
            [python, "-I", "-S", "-c", "pass"], user=ids[0], group=ids[1], extra_groups=[], cwd="/",
            env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        )
        if probe.returncode == 0:
            return ids
    except (OSError, subprocess.SubprocessError):
        pass
    log.warning(
        "sandbox: running as root and %s cannot run as uid %d, so sandboxed code runs as root; RLIMIT_NPROC "
        "does not bind root, and containment rests on the audit hook, rlimits and process-group kill", python, ids[0],
    )
    return None


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait for the child to exit *without reaping it*, so its pid (= process-group id) cannot be
    reused before we kill the group. True if it exited before `deadline`."""
    delay = 0.0005
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def run(code: str, limits: SandboxLimits = DEFAULT_LIMITS, python: str | None = None,
        drop_privileges: bool = True) -> SandboxResult:
    """Run `code` as a script in a fresh sandboxed interpreter and return what happened.

    `python` defaults to the current interpreter (only its standard library is used).
    `drop_privileges`: when root, run as `nobody` if possible (see the module docstring)."""
    python = python or sys.executable
    ids = _unprivileged_ids(python) if drop_privileges else None
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="unigrad-sandbox-"))
    try:
        Path(workdir, "snippet.py").write_text(code, encoding="utf-8")
        if ids is not None:
            os.chown(workdir, *ids)
            os.chown(Path(workdir, "snippet.py"), *ids)
        rlimits = {
            "RLIMIT_CPU": limits.cpu_seconds, "RLIMIT_AS": limits.memory_bytes, "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_NOFILE": limits.open_files, "RLIMIT_NPROC": limits.processes, "RLIMIT_CORE": 0,
        }
        config = json.dumps({"workdir": workdir, "limits": rlimits})
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        extra = {"user": ids[0], "group": ids[1], "extra_groups": []} if ids is not None else {}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-S", "-B", "-c", _CHILD_SOURCE, config], cwd=workdir, env=env,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True, start_new_session=True, **extra,
                )
            except OSError as e:  # e.g. EAGAIN under process pressure: a failed run, not a crashed training step
                log.warning("sandbox: could not start %s: %s", python, e)
                return SandboxResult(None, "", f"sandbox: could not start: {e}", False, 0.0, -1)
            exited = _wait_unreaped(proc.pid, start + limits.timeout)
            try:  # the group outlives its leader only if something escaped the fork ban; kill it regardless
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if not exited:
                proc.kill()  # in case it left its process group; its pid is still ours (not reaped yet)
            returncode = proc.wait()
            duration = time.monotonic() - start
            stdout, stderr = (_read(f, limits.output_chars) for f in (out, err))
        return SandboxResult(returncode, stdout, stderr, not exited, duration, proc.pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read(f, n: int) -> str:
    f.seek(0)
    return f.read(n).decode("utf-8", "replace")


def run_many(codes: list[str], limits: SandboxLimits = DEFAULT_LIMITS, max_workers: int | None = None,
             **kwargs) -> list[SandboxResult]:
    """`run` each snippet, several at once; results in input order."""
    if not codes:
        return []
    workers = max_workers or min(len(codes), 2 * (os.cpu_count() or 1), 8)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda c: run(c, limits, **kwargs), codes))
