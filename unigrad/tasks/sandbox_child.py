"""What runs inside a sandbox child; `sandbox.py` passes this file's text to `python -I -S -B -c`.

Order matters: resource limits first (soft = hard, so the snippet cannot raise them again), then
read (and delete) the snippet file, then install an audit hook (which can never be removed from Python), then run
the snippet. The hook refuses, with PermissionError: processes (fork, exec, spawn, system,
Popen, kill), sockets and network clients, ctypes, deleting / renaming / chmod-ing
files, changing directory, setting rlimits, gc introspection, opening files for writing outside
the working directory or for reading outside it and the standard library, and opening anything
but regular files and directories inside it. A few calls CPython does not audit (mkfifo, mknod,
setsid, ...) are deleted from `os` first.

The hook is written to survive a snippet that patches modules: everything it uses is bound as a
default argument (re-binding a function's defaults or code is itself an audited event it
refuses), and path checks use only string methods, never `os.path`. Audit hooks are still not a
security boundary against a determined attacker (see PEP 578); rlimits, the process group kill,
the minimal environment and, when running as root, an unprivileged uid are the other layers.
This file must not import unigrad: it runs under `-I -S` with only the standard library.
"""

import builtins
import json
import os
import resource
import sys

BLOCKED_EVENTS = frozenset(
    """os.system os.fork os.forkpty os.exec os.posix_spawn os.spawn os.kill os.killpg subprocess.Popen
    pty.spawn signal.pthread_kill os.remove os.rmdir os.rename os.link os.symlink
    os.truncate os.chmod os.chown os.chdir os.chroot os.chflags os.lchflags os.mkfifo os.mknod os.utime
    os.setxattr os.removexattr os.putenv os.unsetenv os.startfile resource.setrlimit resource.prlimit
    gc.get_objects gc.get_referrers gc.get_referents sys._current_frames webbrowser.open""".split()
)
BLOCKED_PREFIXES = (
    "socket.", "ctypes.", "_ctypes.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
    "nntplib.", "telnetlib.", "syslog.", "sqlite3.", "mmap.", "shutil.", "fcntl.", "os.exec", "os.spawn",
    "os.posix_spawn",
)
BLOCKED_MODULES = frozenset(
    """ctypes _ctypes socket _socket ssl _ssl subprocess _posixsubprocess multiprocessing _multiprocessing
    _posixshmem concurrent asyncio select selectors mmap pty tty termios fcntl gc sqlite3 _sqlite3
    urllib.request http.client http.server xmlrpc.client
    ftplib smtplib webbrowser _testcapi _testinternalcapi _testbuffer _xxsubinterpreters
    _xxinterpchannels""".split()
)
# File-system and process calls that CPython (3.11) does not audit; removed from os / posix.
UNAUDITED = ("mkfifo", "mknod", "chroot", "setsid", "setpgid", "setuid", "setgid", "setreuid", "setregid")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _resolve(path, cwd):
    """Absolute, normalised form of `path` using string methods only (no globals to patch)."""
    if not path.startswith("/"):
        path = cwd + "/" + path
    parts = []
    for part in path.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


FUNCTION_TYPE = type(_resolve)


def _make_hook(root, readable):
    def hook(
        event, args, _root=root, _inside=root + "/", _readable=readable, _events=BLOCKED_EVENTS,
        _prefixes=BLOCKED_PREFIXES, _modules=BLOCKED_MODULES, _write=WRITE_FLAGS, _resolve=_resolve,
        _type=type, _str=str, _bytes=bytes, _int=int, _function=FUNCTION_TYPE, _deny=PermissionError,
        _stat=os.stat, _missing=OSError,
    ):
        if event in _events or event.startswith(_prefixes):
            raise _deny("sandbox: " + event + " is not allowed")
        if event == "import":
            if args[0] in _modules or args[0].split(".")[0] in _modules:
                raise _deny("sandbox: import of " + args[0] + " is not allowed")
        elif event == "object.__setattr__":
            if _type(args[0]) is _function:  # rebinding __code__ / __defaults__ could disarm this hook
                raise _deny("sandbox: changing a function's code or defaults is not allowed")
        elif event == "open" or event == "os.listdir" or event == "os.scandir" or event == "os.mkdir":
            path = args[0]
            if path is None or _type(path) is _int:  # None = ".", an int = an already open descriptor
                return
            if _type(path) is _bytes:
                path = path.decode("utf-8", "surrogateescape")
            if _type(path) is not _str:  # a PathLike could answer differently on its next __fspath__
                raise _deny("sandbox: only str or bytes paths are allowed")
            full = _resolve(path, _root)
            inside = full == _root or full.startswith(_inside)
            flags = args[2] if event == "open" and _type(args[2]) is _int else _write if event == "os.mkdir" else 0
            if inside:  # only regular files and directories: a device node made here must stay unopenable
                try:
                    kind = _stat(full).st_mode & 0o170000
                except _missing:
                    kind = 0o100000  # about to be created
                if kind != 0o100000 and kind != 0o040000:
                    raise _deny("sandbox: only regular files can be opened")
            if not inside and event == "open":  # a directory descriptor outside would let dir_fd= paths escape,
                try:  # as the event carries the path relative to it, which the check above reads as inside
                    outside_dir = _stat(full).st_mode & 0o170000 == 0o040000
                except _missing:
                    outside_dir = False
                if outside_dir:
                    raise _deny("sandbox: opening the directory " + full + " is not allowed")
            if flags & _write:
                if not inside:
                    raise _deny("sandbox: writing outside the working directory is not allowed")
            elif not inside and full not in ("/dev/null", "/dev/urandom") and not (full + "/").startswith(_readable):
                raise _deny("sandbox: reading " + full + " is not allowed")

    return hook


def confine(config):
    """Limits, snippet, audit hook: everything between a fresh process and running the snippet. Returns its code."""
    root = config["workdir"]
    for name, value in config["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    with open(root + "/snippet.py", encoding="utf-8") as f:
        source = f.read()
    os.remove(root + "/snippet.py")  # the snippet starts in an empty directory
    # The standard library (as on sys.path now, before the snippet can change it); "dir/" so that
    # "dir-evil" does not match "dir".
    readable = tuple({os.path.realpath(p) + "/" for p in sys.path if p} | {p + "/" for p in sys.path if p})
    for name in UNAUDITED:  # best effort: a determined snippet can recover them, hence the open() check
        for module in (os, sys.modules["posix"]):
            if hasattr(module, name):
                delattr(module, name)
    sys.addaudithook(_make_hook(root, readable))
    return compile(source, "snippet.py", "exec")


def main():
    code = confine(json.loads(sys.argv[1]))
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


# ---------------------------------------------------------------------------------------------------- fork server
# `python -I -S -B -c <this file> --fork-server` reads one JSON request per line on stdin and forks a child per
# request. The child leaves the server's code and frames (`_Forked` unwinds them), enters its own session, opens its
# output files (created exclusively, never through a symlink) and points stdin at /dev/null, closes every other
# descriptor (the server's pipes included), drops to the request's unprivileged user if there is one, and then does
# what `main` does, leaving as a fresh interpreter would (`_run_and_exit`). A fork costs about a millisecond where a
# new interpreter costs tens. The server kills a child's process group at its deadline or
# once it has exited (before reaping it, so its pid cannot be reused in between) and writes one JSON line per
# finished child: {"id", "pid", "returncode", "timed_out", "duration"} (or {"id", "error"} if it could not fork).
# It exits, killing what is left, when stdin closes or anything goes wrong in it.


class _Forked(BaseException):
    """Raised in a freshly forked child: unwinds the server's frames; the child goes on at module level."""


def _enter(request):
    """In a forked child, before `confine`: session, descriptors, user, working directory, environment."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDONLY)
    create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    out = os.open(request["stdout"], create, 0o600)  # as the server's user, in a directory the snippet cannot reach
    err = os.open(request["stderr"], create, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    ids = request.get("ids")
    if ids:  # so that the snippet cannot signal the server (or the trainer) that run as another user
        os.setgroups([])
        os.setgid(ids[1])
        os.setuid(ids[0])
    os.chdir(request["workdir"])
    os.environ.clear()
    os.environ.update(request["env"])
    for name in list(sys.modules):  # the server's own imports (e.g. select) are not the snippet's to reuse
        if name in BLOCKED_MODULES or name.split(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
    sys.argv = ["-c"]


def _run_and_exit(code):
    """Run the snippet, then leave as the interpreter would after `-c`, without its finalisation (about 10 ms of
    module teardown per child): the exit status of an uncaught SystemExit or exception, non-daemon threads joined,
    atexit callbacks run, output flushed (status 120 if that fails), an uncaught KeyboardInterrupt ending by SIGINT."""
    import atexit
    import signal

    status, interrupted = 0, False
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as stop:  # None -> 0, an int -> itself, anything else is printed and gives 1
        if stop.code is None:
            status = 0
        elif isinstance(stop.code, int):
            status = stop.code & 0xFF
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        status, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            status = 120 if stream is sys.stdout else status
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
    os._exit(status)


def fork_server():
    import select
    import signal
    import time

    server = os.getpid()
    # A child's exit wakes the loop: SIGCHLD writes a byte to this pipe (the handler itself does nothing).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = {}  # pid -> (request id, deadline, start)
    pending = b""
    stdin_open = True
    try:
        while stdin_open or children:
            wait = None
            if children:
                wait = max(0.0, min(d for _, d, _ in children.values()) - time.monotonic())
            readable = select.select([0, wake_r] if stdin_open else [wake_r], [], [], wait)[0]
            if wake_r in readable:
                os.read(wake_r, 4096)
            if 0 in readable:
                chunk = os.read(0, 1 << 16)
                stdin_open = bool(chunk)
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    request = json.loads(line)
                    start = time.monotonic()
                    try:
                        pid = os.fork()
                    except OSError as exc:  # e.g. EAGAIN: this request fails, the server goes on
                        os.write(1, (json.dumps({"id": request["id"], "error": str(exc)}) + "\n").encode())
                        continue
                    if pid == 0:
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        raise _Forked(request)
                    children[pid] = (request["id"], start + request["timeout"], start)
            now = time.monotonic()
            for pid in list(children):
                exited = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                rid, deadline, start = children[pid]
                if stdin_open and not exited and now < deadline:
                    continue
                try:  # the group outlives its leader only if something escaped the fork ban; kill it regardless
                    os.killpg(pid, 9)
                except OSError:
                    pass
                status = os.waitpid(pid, 0)[1]
                del children[pid]
                returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                reply = {"id": rid, "pid": pid, "returncode": returncode, "timed_out": not exited,
                         "duration": time.monotonic() - start}
                os.write(1, (json.dumps(reply) + "\n").encode())
    finally:
        if os.getpid() == server:  # not in a child leaving through _Forked
            for pid in children:
                try:
                    os.killpg(pid, 9)
                except OSError:
                    pass


if sys.argv[1:] == ["--fork-server"]:
    try:
        fork_server()
        _request = None
    except _Forked as forked:
        _request = forked.args[0]
    if _request is not None:  # a child
        _enter(_request)
        _run_and_exit(confine(_request))
else:
    main()
