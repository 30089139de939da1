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

Each snippet runs in its own process. By default that process is forked from a fork server: one long-lived
`python -I -S -B` process per interpreter, started on first use as the trainer's user, that forks a child per
snippet. The child leaves the server's frames, enters its own session, opens its output files in a directory only the
server's user can reach, closes every descriptor it inherited, drops to the unprivileged user (as above, where the
interpreter allows it), and then sets the same limits and hook as a freshly started interpreter would
(`sandbox_child.py`). A fork costs about a millisecond; starting an interpreter costs tens, which was most of the
code task's reward time. `fork_server=False` starts a new interpreter per snippet instead; so does `run` when the
server cannot be started, does not answer in time (it is then killed) or dies.

Differences from a fresh interpreter that remain: every forked child has the server's hash seed (set and dict
orders of strings are the same from one snippet to the next), and its address-space layout.

`run_many` runs snippets in parallel from a small thread pool (subprocess creation without
`preexec_fn` is thread-safe).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    """The rlimits a child sets on itself (soft = hard), by resource name."""
    return {"RLIMIT_CPU": limits.cpu_seconds, "RLIMIT_AS": limits.memory_bytes, "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_NOFILE": limits.open_files, "RLIMIT_NPROC": limits.processes, "RLIMIT_CORE": 0}


def _child_env(workdir: str) -> dict[str, str]:
    """A child's whole environment: nothing of the parent's."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


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


class ForkServer:
    """A `sandbox_child.py --fork-server` process: `submit` sends it one snippet's request, whose future gets the
    server's reply (see sandbox_child.py) when the child has finished or been killed."""

    def __init__(self, python: str) -> None:
        self._errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [python, "-I", "-S", "-B", "-c", _CHILD_SOURCE, "--fork-server"], cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._errors, close_fds=True, start_new_session=True,
        )
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._next = 0
        threading.Thread(target=self._read_replies, name="sandbox-fork-server", daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, request: dict) -> Future:
        future: Future = Future()
        with self._lock:
            if not self.alive():
                raise RuntimeError("sandbox fork server is not running")
            rid, self._next = self._next, self._next + 1
            self._waiting[rid] = future
            try:
                self.proc.stdin.write((json.dumps({**request, "id": rid}) + "\n").encode())
                self.proc.stdin.flush()
            except OSError as e:  # it died since alive() (e.g. broken pipe)
                self._waiting.pop(rid, None)
                raise RuntimeError(f"sandbox fork server is not running: {e}") from e
        return future

    def _read_replies(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self._lock:
                future = self._waiting.pop(reply["id"])
            future.set_result(reply)
        self.proc.wait()
        self._errors.seek(0)
        reason = self._errors.read(4000).decode("utf-8", "replace").strip()
        with self._lock:  # the server is gone: nobody will answer the rest
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.set_exception(RuntimeError(f"sandbox fork server exited ({self.proc.returncode}): {reason}"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the server kills what is left and exits
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


_servers: dict[str, ForkServer] = {}
_servers_lock = threading.Lock()


def _fork_server(python: str) -> ForkServer | None:
    """The running fork server for this interpreter, started (or restarted) if needed; None if it cannot start (the
    caller then starts an interpreter per snippet)."""
    with _servers_lock:
        server = _servers.get(python)
        if server is None or not server.alive():
            try:
                server = _servers[python] = ForkServer(python)
            except OSError as e:
                log.warning("sandbox: could not start the fork server (%s); starting an interpreter per snippet", e)
                return None
        return server


def _close_servers() -> None:
    for server in list(_servers.values()):
        server.close()


atexit.register(_close_servers)


def run(code: str, limits: SandboxLimits = DEFAULT_LIMITS, python: str | None = None,
        drop_privileges: bool = True, fork_server: bool = True) -> SandboxResult:
    """Run `code` as a script in a sandboxed process and return what happened.

    `python` defaults to the current interpreter (only its standard library is used).
    `drop_privileges`: when root, run as `nobody` if possible (see the module docstring).
    `fork_server`: fork the process from the fork server (default) rather than start a new interpreter."""
    python = python or sys.executable
    ids = _unprivileged_ids(python) if drop_privileges else None
    server = _fork_server(python) if fork_server else None
    if server is not None:
        try:
            return _run_forked(server, code, limits, ids)
        except RuntimeError as e:  # the server died or hung: this snippet gets a fresh interpreter
            log.warning("sandbox: %s; running the snippet in a new interpreter", e)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="unigrad-sandbox-"))
    try:
        Path(workdir, "snippet.py").write_text(code, encoding="utf-8")
        if ids is not None:
            os.chown(workdir, *ids)
            os.chown(Path(workdir, "snippet.py"), *ids)
        rlimits = _rlimits(limits)
        config = json.dumps({"workdir": workdir, "limits": rlimits})
        env = _child_env(workdir)
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


def _run_forked(server: ForkServer, code: str, limits: SandboxLimits, ids: tuple[int, int] | None) -> SandboxResult:
    # base/work: the snippet's (chowned to the sandbox user); base/out: its stdout and stderr, created by the child
    # before it drops privileges, in a directory only the server's user can enter.
    base = os.path.realpath(tempfile.mkdtemp(prefix="unigrad-sandbox-"))
    try:
        workdir, outdir = os.path.join(base, "work"), os.path.join(base, "out")
        os.mkdir(workdir)
        os.mkdir(outdir, 0o700)
        Path(workdir, "snippet.py").write_text(code, encoding="utf-8")
        if ids is not None:
            os.chmod(base, 0o711)  # the sandbox user may pass through to work/, not list base or enter out/
            for path in (workdir, os.path.join(workdir, "snippet.py")):
                os.chown(path, *ids)
        rlimits = _rlimits(limits)
        env = _child_env(workdir)
        request = {"workdir": workdir, "limits": rlimits, "env": env, "timeout": limits.timeout, "ids": ids,
                   "stdout": os.path.join(outdir, "stdout"), "stderr": os.path.join(outdir, "stderr")}
        future = server.submit(request)
        try:
            reply = future.result(timeout=limits.timeout + 5)  # the server kills the child at limits.timeout
        except TimeoutError:
            server.proc.kill()  # stopped or stuck: it is replaced on the next call
            raise RuntimeError(f"sandbox fork server did not answer within {limits.timeout + 5:.0f} s") from None
        if "error" in reply:  # it could not fork (e.g. EAGAIN): a failed run, as when an interpreter cannot start
            log.warning("sandbox: could not fork: %s", reply["error"])
            return SandboxResult(None, "", f"sandbox: could not start: {reply['error']}", False, 0.0, -1)
        stdout, stderr = (_read_output(os.path.join(outdir, name), limits.output_chars)
                          for name in ("stdout", "stderr"))
        return SandboxResult(reply["returncode"], stdout, stderr, reply["timed_out"], reply["duration"], reply["pid"])
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _read_output(path: str, n: int) -> str:
    """The first n bytes of a child's output file, decoded; "" if it never made one. Never follows a symlink or
    blocks on a FIFO, and reads regular files only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return _read(f, n)


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
