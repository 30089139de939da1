"""Running untrusted Python (model-written code): in a jail the kernel enforces, or, on request, without it.

`run(code)` runs one snippet as a script and returns what happened (`SandboxResult`); `run_many` runs several at
once. The default, `jail="bwrap"` (`sandbox.jail` in the run config, `configure` here), runs every snippet in a
sub-jail of a long-lived bubblewrap jail (jail.py, child.py): its own PID, mount and IPC namespaces
inside a jail with no network, a read-only view of the interpreter and its standard library only, a fresh tmpfs
working directory capped at `disk_bytes`, no capability, an unprivileged uid, a seccomp filter that refuses process
creation, exec, signals, sockets, tracing and namespace changes, rlimits on CPU time, address space, file size and
open files, and the audit hook as a second layer. When the snippet's process exits or is killed (at `timeout`), its
whole PID namespace goes with it. If the jail cannot be built, `run` raises `JailUnavailable` naming the cause and
the fix; nothing falls back to running code outside the jail.

`jail="none"` is the older containment, kept as an explicit opt-out: a fork server (or a fresh `python -I -S -B`
per snippet with `fork_server=False`) with the same rlimits and audit hook, a fresh working directory, a minimal
environment, its own session killed as a group, and, when the trainer runs as root and the interpreter is readable by
`nobody`, uid 65534. An audit hook is not a security boundary (PEP 578): a determined snippet gets out. As root it
is refused unless `allow_root_without_jail=True`. docs/sandbox.md has the threat model and what each layer stops.
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from unigrad.sandbox.jail import JailUnavailable
from unigrad.sandbox.server import SnippetServer

log = logging.getLogger(__name__)

_CHILD_SOURCE = (Path(__file__).parent / "child.py").read_text()
JAILS = ("bwrap", "none")
__all__ = ["JAILS", "JailUnavailable", "SandboxError", "SandboxLimits", "SandboxResult", "check", "check_setting",
           "configure", "prepare", "run", "run_many"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 5.0  # wall-clock seconds before the snippet (its PID namespace, in the jail) is killed
    cpu_seconds: int = 5  # RLIMIT_CPU
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS (address space, so generous: the interpreter maps ~30 MB)
    file_bytes: int = 2**20  # RLIMIT_FSIZE: largest file the child may write, its stdout and stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 0  # RLIMIT_NPROC: no fork at all (and the jail's seccomp filter refuses fork and clone)
    # RLIMIT_SIGPENDING: a signal queued to the snippet fails once its uid has this many pending, so a snippet adds
    # at most this many to the uid's count (the jail's seccomp filter refuses the calls that would queue more)
    pending_signals: int = 16
    output_chars: int = 65536  # how much of stdout / stderr is read back
    disk_bytes: int = 4 * 2**20  # in the jail: the working directory's tmpfs, all files together
    disk_inodes: int = 256  # in the jail: files and directories in the working directory


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
            "RLIMIT_NOFILE": limits.open_files, "RLIMIT_NPROC": limits.processes, "RLIMIT_CORE": 0,
            "RLIMIT_SIGPENDING": limits.pending_signals}


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


class SandboxError(ValueError):
    """A sandbox setting that is refused (e.g. no jail while running as root without saying so)."""


_settings = {"jail": "bwrap", "allow_root_without_jail": False}
_warned_unjailed: set[str] = set()


def configure(jail: str = "bwrap", allow_root_without_jail: bool = False) -> None:
    """Set the process-wide default of `run`'s `jail` (the run config's `sandbox` section). Refuses `jail="none"` as
    root unless `allow_root_without_jail`: a snippet that gets past the audit hook then acts as root."""
    check_setting(jail, allow_root_without_jail)
    _settings.update(jail=jail, allow_root_without_jail=allow_root_without_jail)


def check_setting(jail: str, allow_root_without_jail: bool) -> None:
    """Refuse an unknown jail, and no jail as root unless explicitly allowed."""
    if jail not in JAILS:
        raise SandboxError(f"sandbox.jail must be one of {', '.join(JAILS)}, got {jail!r}")
    if jail == "none" and os.geteuid() == 0 and not allow_root_without_jail:
        raise SandboxError(
            "sandbox.jail=none while running as root: model-written code would run as root behind only an audit "
            "hook. Install bubblewrap and keep sandbox.jail=bwrap, or say so explicitly with "
            "sandbox.allow_root_without_jail=true")


def _warn_unjailed(jail: str) -> None:
    if jail not in _warned_unjailed:
        _warned_unjailed.add(jail)
        log.warning(
            "sandbox: running model-written code WITHOUT the jail (sandbox.jail=none): no PID, mount or network "
            "namespace, no seccomp filter; only rlimits, a minimal environment and an audit hook, which a "
            "determined snippet can get past (C modules, unaudited system calls). It may read files this user can "
            "read, open sockets and signal this user's processes if it does")


def prepare(tasks: list, jail: str = "bwrap", allow_root_without_jail: bool = False) -> str | None:
    """Before training or evaluating: set the sandbox up as configured and, if any task runs model-written code,
    prove that it works (`check`); raises `JailUnavailable` or `SandboxError` otherwise. A line to print, or None."""
    configure(jail, allow_root_without_jail)
    if not any(getattr(task, "runs_code", False) for task in tasks):
        return None
    if jail == "none":
        _warn_unjailed(jail)
    return "sandbox: " + check()


def check(jail: str | None = None, python: str | None = None) -> str:
    """Raise `JailUnavailable` or `SandboxError` (naming the cause and the fix) if snippets cannot run as configured;
    else a one-line description of the containment. Runs a snippet in the jail to prove it works."""
    jail = jail or _settings["jail"]
    check_setting(jail, _settings["allow_root_without_jail"])
    if jail == "none":
        return "no jail (sandbox.jail=none): rlimits and an audit hook only"
    probe = run("import os\nprint(os.getuid(), os.getpid())", SandboxLimits(timeout=30), python=python, jail=jail)
    if not probe.ok:
        raise JailUnavailable(f"sandbox: the jail started but a test snippet failed: {probe.stderr.strip()[-500:]}")
    uid, pid = probe.stdout.split()
    where = "on the host" if os.geteuid() == 0 else "in a user namespace: this user's uid on the host"
    return f"bubblewrap jail: a test snippet ran as uid {uid} ({where}) and pid {pid} of its own PID namespace"


# ------------------------------------------------------------------------------------------------------- the jail
class _Jail:
    """A running jail: the bwrap'd snippet server and the host directory where snippets' outputs appear."""

    def __init__(self, python: str) -> None:
        from unigrad.sandbox import jail as sandbox_jail

        uid, gid = sandbox_jail.snippet_ids()
        snippet_filter = sandbox_jail.seccomp_program(sandbox_jail.SNIPPET_DENIED, snippet=True)
        server_filter = sandbox_jail.seccomp_program(sandbox_jail.SERVER_DENIED, snippet=False)
        self.io_dir = tempfile.mkdtemp(prefix="unigrad-jail-")
        setup = json.dumps({"uid": uid, "gid": gid, "seccomp": snippet_filter.hex()})
        fd = os.memfd_create("unigrad-seccomp")
        try:
            os.write(fd, server_filter)
            os.lseek(fd, 0, os.SEEK_SET)
            argv = sandbox_jail.bwrap_command(python, self.io_dir, fd)
            executable = sandbox_jail.read_only_paths(python)[0][0]
            argv += ["--", executable, "-I", "-S", "-B", "-c", _CHILD_SOURCE, setup, "--jail-server"]
            self.server = SnippetServer(argv, pass_fds=(fd,))
        except BaseException:
            shutil.rmtree(self.io_dir, ignore_errors=True)
            raise
        finally:
            os.close(fd)

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.io_dir, ignore_errors=True)


_jails: dict[str, _Jail] = {}
_jails_lock = threading.Lock()


def _jail(python: str) -> _Jail:
    """The running jail for this interpreter, started (or restarted) if needed."""
    with _jails_lock:
        jail = _jails.get(python)
        if jail is None or not jail.server.alive():
            if jail is not None:
                jail.close()
            jail = _jails[python] = _Jail(python)
        return jail


def _run_jailed(code: str, limits: SandboxLimits, python: str, audit_hook: bool) -> SandboxResult:
    from unigrad.sandbox.jail import explain_failure

    jail = _jail(python)
    name = uuid.uuid4().hex
    request = {"code": code, "workdir": "/work", "limits": _rlimits(limits), "env": _child_env("/work"),
               "timeout": limits.timeout, "disk_bytes": limits.disk_bytes, "disk_inodes": limits.disk_inodes,
               "stdout": f"/io/{name}.out", "stderr": f"/io/{name}.err", "audit_hook": audit_hook}
    outputs = [os.path.join(jail.io_dir, f"{name}.{kind}") for kind in ("out", "err")]
    try:
        try:
            reply = jail.server.submit(request).result(timeout=limits.timeout + 10)
        except RuntimeError as e:
            reason = jail.server.wait_exit(5)
            if reason is not None and jail.server.proc.returncode not in (0, -signal.SIGKILL):
                raise JailUnavailable(explain_failure(reason)) from None  # it never worked: say why
            return SandboxResult(None, "", f"sandbox: {e}", False, 0.0, -1)
        except TimeoutError:  # the server answers at the deadline; one that does not is replaced
            jail.server.kill()
            return SandboxResult(None, "", "sandbox: the jail did not answer; it was killed", True, 0.0, -1)
        if "error" in reply:  # it could not start the snippet (e.g. EAGAIN): a failed run
            log.warning("sandbox: could not start a snippet: %s", reply["error"])
            return SandboxResult(None, "", f"sandbox: could not start: {reply['error']}", False, 0.0, -1)
        stdout, stderr = (_read_output(path, limits.output_chars) for path in outputs)
        return SandboxResult(reply["returncode"], stdout, stderr, reply["timed_out"], reply["duration"], reply["pid"])
    finally:
        for path in outputs:
            try:
                os.unlink(path)
            except OSError:
                pass


# ------------------------------------------------------------------------------ without the jail (sandbox.jail=none)
_servers: dict[str, SnippetServer] = {}
_servers_lock = threading.Lock()


def _fork_server(python: str) -> SnippetServer | None:
    """The running unjailed fork server for this interpreter, started (or restarted) if needed; None if it cannot
    start (the caller then starts an interpreter per snippet)."""
    with _servers_lock:
        server = _servers.get(python)
        if server is None or not server.alive():
            try:
                server = _servers[python] = SnippetServer([python, "-I", "-S", "-B", "-c", _CHILD_SOURCE,
                                                           "--fork-server"])
            except OSError as e:
                log.warning("sandbox: could not start the fork server (%s); starting an interpreter per snippet", e)
                return None
        return server


def _close_servers() -> None:
    for server in list(_servers.values()):
        server.close()
    for jail in list(_jails.values()):
        jail.close()


atexit.register(_close_servers)


def run(code: str, limits: SandboxLimits = DEFAULT_LIMITS, python: str | None = None,
        drop_privileges: bool = True, fork_server: bool = True, jail: str | None = None,
        allow_root_without_jail: bool = False, audit_hook: bool = True) -> SandboxResult:
    """Run `code` as a script in a sandboxed process and return what happened.

    `python` defaults to the current interpreter (only its standard library is used). `jail`: "bwrap" or "none"
    (default: as `configure` set it, "bwrap" unless changed); "none" as root also needs `allow_root_without_jail`
    (here or in `configure`). Without the jail only: `drop_privileges` (when root,
    run as `nobody` if the interpreter allows) and `fork_server` (fork from the fork server rather than start a new
    interpreter). `audit_hook=False` leaves out the audit hook in the jail, for tests of the kernel's layers alone."""
    python = python or sys.executable
    jail = jail or _settings["jail"]
    if jail == "bwrap":
        return _run_jailed(code, limits, python, audit_hook)
    check_setting(jail, allow_root_without_jail or _settings["allow_root_without_jail"])
    _warn_unjailed(jail)
    ids = _unprivileged_ids(python) if drop_privileges else None
    server = _fork_server(python) if fork_server else None
    if server is not None:
        try:
            return _run_forked(server, code, limits, ids)
        except RuntimeError as e:  # the server died or hung: this snippet gets a fresh interpreter
            log.warning("sandbox: %s; running the snippet in a new interpreter", e)
    return _run_fresh(code, limits, python, ids)


def _run_fresh(code: str, limits: SandboxLimits, python: str, ids: tuple[int, int] | None) -> SandboxResult:
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


def _run_forked(server: SnippetServer, code: str, limits: SandboxLimits,
                ids: tuple[int, int] | None) -> SandboxResult:
    # base/work: the snippet's (chowned to the sandbox user); base/out: its stdout and stderr, created by the child
    # before it drops privileges, in a directory only the server's user can enter.
    base = os.path.realpath(tempfile.mkdtemp(prefix="unigrad-sandbox-"))
    try:
        workdir, outdir = os.path.join(base, "work"), os.path.join(base, "out")
        os.mkdir(workdir)
        os.mkdir(outdir, 0o700)
        if ids is not None:
            os.chmod(base, 0o711)  # the sandbox user may pass through to work/, not list base or enter out/
            os.chown(workdir, *ids)
        request = {"code": code, "workdir": workdir, "limits": _rlimits(limits), "env": _child_env(workdir),
                   "timeout": limits.timeout, "ids": ids,
                   "stdout": os.path.join(outdir, "stdout"), "stderr": os.path.join(outdir, "stderr")}
        future = server.submit(request)
        try:
            reply = future.result(timeout=limits.timeout + 5)  # the server kills the child at limits.timeout
        except TimeoutError:
            server.kill()  # stopped or stuck: it is replaced on the next call
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
