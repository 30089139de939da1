"""What runs inside the sandbox; `sandbox.py` passes this file's text to `python -I -S -B -c`.

Three ways in (the last argument says which):
- `--jail-server`: a long-lived server inside the bubblewrap jail (`jail.py`). For each snippet a standby
  child of the server reads the request and builds a sub-jail (`_enter_sub_jail`): it unshares a new mount, PID and
  IPC namespace, mounts a fresh size-capped tmpfs on /work, opens the snippet's output files in /io and then hides /io
  under an empty read-only tmpfs, and forks the snippet's process, which is PID 1 of its own namespace. That process
  drops every capability (bounding set, effective, permitted), takes the unprivileged uid when the jail runs as real
  root, sets no_new_privs and its rlimits, loads the seccomp filter (built outside by `jail.py`), then does
  what `main` does.
- `--fork-server`: the same server without the jail or sub-jails, for `sandbox.jail=none`: a plain fork per snippet.
- a JSON config: one snippet in a fresh interpreter (`sandbox.jail=none` with `fork_server=False`).

Inside every snippet process, in this order: resource limits (soft = hard, so they cannot be raised again), then the
audit hook (which can never be removed from Python), then the snippet. The hook is the second layer, a tripwire:
it refuses, with PermissionError, process creation and signals, sockets and network clients, ctypes and other
dangerous C modules (under any package name or file name), sub-interpreters, deleting / renaming / chmod-ing files,
changing directory, setting rlimits, gc introspection, and file access outside the working directory and the
standard library. A few calls CPython does not audit (mkfifo, mknod, setsid, pidfd_send_signal, ...) are deleted from
their modules first. The boundary is the kernel's (namespaces, seccomp, uid, rlimits): see docs/sandbox.md.

No snippet can read another's program or tests in its own memory. A forked child inherits every byte of its parent's
heap, and Python keeps what it parsed in freed memory it never clears (the read buffer, the joined line, each
decoded string). So the server never reads a request: it forks a standby child, which reads exactly one request from
stdin (and not a byte of the next), and the snippet's process descends from that child. The alternatives were
weighed: wiping the buffers before forking cannot reach the copies Python's allocators made and freed; a fresh
interpreter per snippet is about five times slower per snippet (docs/sandbox.md). With the standby, a process's
memory holds what the server held (its own code, request ids, pids and deadlines) and its own request, nothing else.

The hook is written to survive a snippet that patches modules: everything it uses is bound as a default argument
(re-binding a function's defaults or code is itself an audited event it refuses), and path checks use only string
methods, never `os.path`. This file must not import unigrad: it runs under `-I -S` with only the standard library.
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
    gc.get_objects gc.get_referrers gc.get_referents sys._current_frames webbrowser.open
    cpython.PyInterpreterState_New cpython.run_command cpython.run_file cpython.run_module""".split()
)
BLOCKED_PREFIXES = (
    "socket.", "ctypes.", "_ctypes.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
    "nntplib.", "telnetlib.", "syslog.", "sqlite3.", "mmap.", "shutil.", "fcntl.", "os.exec", "os.spawn",
    "os.posix_spawn",
)
BLOCKED_MODULES = frozenset(
    """ctypes _ctypes socket _socket ssl _ssl subprocess _posixsubprocess multiprocessing _multiprocessing
    _posixshmem concurrent asyncio _asyncio select selectors mmap pty tty termios fcntl gc sqlite3 _sqlite3
    urllib.request http.client http.server xmlrpc.client ftplib smtplib webbrowser _testcapi _testinternalcapi
    _testbuffer _testmultiphase _testimportmultiple _testclinic _xxsubinterpreters _xxinterpchannels
    _xxtestfuzz""".split()
)
# Calls that CPython (3.11) does not audit; removed from their modules (best effort: the kernel is the boundary).
UNAUDITED = {"os": ("mkfifo", "mknod", "chroot", "setsid", "setpgid", "setuid", "setgid", "setreuid", "setregid",
                    "setresuid", "setresgid", "setgroups", "pidfd_open"),
             "signal": ("pidfd_send_signal",)}
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
            # Every part of the name (a made-up package can hold a real C module), and the file it loads from
            # (an extension loaded by path under any name): "_posixsubprocess.cpython-311-x86_64-linux-gnu.so".
            names = [_str(args[0])] + _str(args[0]).split(".")
            if _type(args[1]) is _str:
                names.append(args[1].rsplit("/", 1)[-1].split(".")[0])
            for name in names:
                if name in _modules:
                    raise _deny("sandbox: import of " + _str(args[0]) + " is not allowed")
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


def _set_limits(limits):
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _arm(root):
    """The audit hook, after deleting the unaudited calls; from here on the snippet's rules apply."""
    # The standard library (as on sys.path now, before the snippet can change it); "dir/" so that "dir-evil" does not
    # match "dir".
    readable = tuple({os.path.realpath(p) + "/" for p in sys.path if p} | {p + "/" for p in sys.path if p})
    import signal

    for module, names in ((os, UNAUDITED["os"]), (sys.modules["posix"], UNAUDITED["os"]),
                          (signal, UNAUDITED["signal"]), (sys.modules["_signal"], UNAUDITED["signal"])):
        for name in names:
            if hasattr(module, name):
                delattr(module, name)
    sys.addaudithook(_make_hook(root, readable))


def confine(config):
    """Limits, snippet, audit hook: everything between a fresh process and running the snippet. Returns its code."""
    root = config["workdir"]
    _set_limits(config["limits"])
    with open(root + "/snippet.py", encoding="utf-8") as f:
        source = f.read()
    os.remove(root + "/snippet.py")  # the snippet starts in an empty directory
    _arm(root)
    return compile(source, "snippet.py", "exec")


def main():
    code = confine(json.loads(sys.argv[1]))
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


# ---------------------------------------------------------------------------------------------------- fork server
# `python -I -S -B -c <this file> --fork-server` (or `--jail-server`, inside the jail) starts a child per request
# without ever reading a request itself. It keeps one *standby* child, and that child reads exactly one request from
# stdin (a 10-digit length line, then that many bytes of JSON; a read from a pipe never takes more than it asks for),
# so no process's memory ever holds another snippet's program or tests. The standby then starts the snippet's process
# and reports to the server on a pipe of its own: {"id", "pid", "timeout", "start"}, or {"id", "error"} if it could
# not start one (e.g. EAGAIN), or {"eof": true} when stdin closed; the server then forks the next standby. In the jail
# the standby is the sub-jail's helper (`_enter_sub_jail`): it unshares a new PID, mount and IPC namespace, mounts the
# tmpfs, opens the output files and forks the snippet's process (PID 1 of the new namespace, the server's child
# through the subreaper once the helper exits). Without the jail the standby becomes the snippet's process itself.
# That process leaves the server's code and frames (`_Forked` unwinds them), gets its output files, stdin from
# /dev/null and no other descriptor, and its own session, then becomes the snippet (`_enter`, `_drop_privileges`,
# `_run_and_exit`). The server kills a child at its deadline or once it has exited (before reaping it, so its pid
# cannot be reused in between): its process group without the jail, its whole PID namespace in it. It writes one JSON
# line per finished child: {"id", "pid", "returncode", "timed_out", "duration"} (or the standby's {"id", "error"}). It
# exits, killing what is left, when stdin closes or anything goes wrong in it. In the jail, the argument before
# `--jail-server` is the server's setup: {"uid", "gid", "seccomp" (hex of the snippets' BPF program)}.
HEADER_BYTES = 11  # b"%010d\n": the length of the request that follows


class _Forked(BaseException):
    """Raised in a freshly forked child: unwinds the server's frames; the child goes on at module level."""


class _Kernel:
    """The few system calls the jail server needs that Python 3.11's `os` lacks, through ctypes. Loaded before any
    snippet exists; the snippet's process removes every reference to it before the snippet runs."""

    CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 16384, 1 << 18
    PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 22, 24, 28, 36, 38
    SECURE_ALL_BITS_LOCKED = 0x2F  # noroot, no_setuid_fixup, keep_caps off, each locked (linux/securebits.h)

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, result, what):
        if result != 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, what + ": " + os.strerror(errno))

    def unshare(self, flags):
        self._check(self.libc.unshare(flags), "unshare")

    def mount(self, source, target, fstype, flags, data):
        c = self.ctypes.c_char_p
        self._check(self.libc.mount(c(source), c(target.encode()), c(fstype), self.ctypes.c_ulong(flags),
                                    c(data)), "mount " + target)

    def prctl(self, option, arg):
        ulong = self.ctypes.c_ulong
        self._check(self.libc.prctl(option, ulong(arg), ulong(0), ulong(0), ulong(0)), "prctl")

    def drop_capabilities(self):
        """Bounding set emptied (no exec can ever grant a capability), securebits locked, then no capability left."""
        last = 0
        while self.libc.prctl(self.PR_CAPBSET_DROP, self.ctypes.c_ulong(last), 0, 0, 0) == 0:
            last += 1
        self.prctl(self.PR_SET_SECUREBITS, self.SECURE_ALL_BITS_LOCKED)

    def clear_capabilities(self):
        u32 = self.ctypes.c_uint32
        header = (u32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (u32 * 6)()  # effective, permitted, inheritable for capabilities 0-31 and 32-63: all zero
        self._check(self.libc.capset(header, data), "capset")

    def load_seccomp(self, program):
        """Install a BPF filter (bytes of struct sock_filter); needs no_new_privs."""
        ctypes = self.ctypes

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buffer = ctypes.create_string_buffer(program, len(program))
        prog = Program(len(program) // 8, ctypes.addressof(buffer))
        self.prctl(self.PR_SET_NO_NEW_PRIVS, 1)
        self._check(self.libc.prctl(self.PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(prog), 0, 0), "seccomp")


def _open_outputs(request):
    create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    return os.open(request["stdout"], create, 0o600), os.open(request["stderr"], create, 0o600)


def _enter_sub_jail(request, kernel, setup):
    """In the jail's standby, which holds the jail's capabilities: new mount, PID and IPC namespaces (its next child
    is PID 1 of the new PID namespace), a fresh tmpfs on /work, the output files opened, then /io hidden."""
    k = kernel
    k.unshare(k.CLONE_NEWNS | k.CLONE_NEWPID | k.CLONE_NEWIPC)
    k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE, None)
    size = "size={},nr_inodes={},mode=0700,uid={},gid={}".format(
        request["disk_bytes"], request["disk_inodes"], setup["uid"], setup["gid"])
    k.mount(b"tmpfs", "/work", b"tmpfs", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC, size.encode())
    outputs = _open_outputs(request)
    k.mount(b"tmpfs", "/io", b"tmpfs", k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC, b"size=0")
    return outputs


def _read_exactly(fd, n):
    """n bytes from a pipe, and not one more (b"" if it is closed before the first)."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            if data:
                raise OSError("stdin closed inside a request")
            return b""
        data += chunk
    return data


def _report_and_exit(report_w, message):
    os.write(report_w, json.dumps(message).encode())  # one short write (below PIPE_BUF): read whole by the server
    os._exit(0)


def _standby(forked):
    """A child of the server, which never reads requests: it reads one request, starts the snippet's process and
    reports to the server. Returns only in the snippet's process, with what `_become_snippet` needs."""
    import time

    report_w, kernel, setup = forked
    forked.clear()
    try:
        header = _read_exactly(0, HEADER_BYTES)
        request = json.loads(_read_exactly(0, int(header))) if header else None
    except Exception as exc:  # the stream is out of step: the server stops
        _report_and_exit(report_w, {"fatal": "unreadable request: " + str(exc)[:1000]})
    if request is None:
        _report_and_exit(report_w, {"eof": True})
    start = time.monotonic()
    try:
        outputs = _enter_sub_jail(request, kernel, setup) if kernel else _open_outputs(request)
        pid = os.fork() if kernel else 0
    except Exception as exc:  # e.g. EAGAIN: this request fails, the server goes on
        _report_and_exit(report_w, {"id": request["id"], "error": str(exc)[:1000]})
    started = {"id": request["id"], "pid": pid or os.getpid(), "timeout": request["timeout"], "start": start}
    if pid:  # the jail's helper: its snippet's process is running
        _report_and_exit(report_w, started)
    if kernel is None:
        os.write(report_w, json.dumps(started).encode())
    os.close(report_w)
    return [request, outputs, setup, kernel]


def _enter(request, outputs):
    """In a forked child, before its privileges go: session, descriptors, environment."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDONLY)
    for fd, target in ((null, 0), (outputs[0], 1), (outputs[1], 2)):
        os.dup2(fd, target)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["-c"]


def _drop_privileges(request, setup, kernel):
    """In the jail: no capability, the unprivileged uid (when the jail runs as real root), rlimits, then the kernel's
    filter. Without the jail: the request's unprivileged ids, if any (as before), then rlimits."""
    if kernel is None:
        ids = request.get("ids")
        if ids:  # so that the snippet cannot signal the server (or the trainer) that run as another user
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
        _set_limits(request["limits"])
        return
    kernel.drop_capabilities()
    if setup["uid"] != os.getuid():
        os.setgroups([])
        os.setresgid(setup["gid"], setup["gid"], setup["gid"])
        os.setresuid(setup["uid"], setup["uid"], setup["uid"])
    kernel.clear_capabilities()
    _set_limits(request["limits"])
    kernel.load_seccomp(bytes.fromhex(setup["seccomp"]))


def _forget_the_server():
    """Nothing of the server's is left for the snippet to reach: its modules that the snippet may not import, its
    ctypes handle, and its __main__ (the snippet gets a fresh one, as a script would)."""
    for name in list(sys.modules):
        if name in BLOCKED_MODULES or name.split(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
    main_module = type(sys)("__main__")
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module
    return main_module.__dict__


def _run_and_exit(code, namespace):
    """Run the snippet, then leave as the interpreter would after `-c`, without its finalisation (about 10 ms of
    module teardown per child): the exit status of an uncaught SystemExit or exception, non-daemon threads joined,
    atexit callbacks run, output flushed (status 120 if that fails), an uncaught KeyboardInterrupt ending by SIGINT
    (by status 130 in the jail, where the process is its namespace's init and cannot signal itself)."""
    import atexit
    import signal

    status, interrupted = 0, False
    try:
        exec(code, namespace)
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
        try:
            signal.raise_signal(signal.SIGINT)
        except OSError:
            pass
        status = 130
    os._exit(status)


def fork_server(jailed):
    import select
    import signal

    kernel = setup = None
    if jailed:
        setup = json.loads(sys.argv[-2])
        kernel = _Kernel()
        kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)  # a snippet's process becomes ours when its helper exits
    # A child's exit wakes the loop: SIGCHLD writes a byte to this pipe (the handler itself does nothing).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = {}  # pid -> (request id, deadline, start)
    standby = None  # (pid, read end of its report pipe)
    stdin_open = True
    try:
        while stdin_open or children:
            if stdin_open and standby is None:
                standby = _start_standby(kernel, setup)
            wait = _next_wait(children, retry=stdin_open and standby is None)
            watched = [wake_r] if standby is None else [wake_r, standby[1]]
            readable = select.select(watched, [], [], wait)[0]
            if wake_r in readable:
                os.read(wake_r, 4096)
            if standby is not None and standby[1] in readable:
                stdin_open = _take_report(standby, children, jailed)
                standby = None
            _finish_children(children, stdin_open, jailed)
    finally:
        if not isinstance(sys.exc_info()[1], _Forked):  # the server itself is leaving, not a child through _Forked
            if standby is not None:
                os.kill(standby[0], 9)
            for pid in children:
                _kill_child(pid, jailed)


def _start_standby(kernel, setup):
    """Fork the next standby: (its pid, the read end of its report pipe), or None if it cannot be forked now."""
    import signal

    report_r, report_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # e.g. EAGAIN: the loop tries again shortly
        os.close(report_r)
        os.close(report_w)
        return None
    if pid == 0:
        os.close(report_r)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise _Forked([report_w, kernel, setup])
    os.close(report_w)
    return pid, report_r


def _next_wait(children, retry):
    """How long the loop may sleep: until the next deadline, and at most 50 ms while a standby must be retried."""
    import time

    wait = None
    if children:
        wait = max(0.0, min(d for _, d, _ in children.values()) - time.monotonic())
    if retry:
        wait = 0.05 if wait is None else min(wait, 0.05)
    return wait


def _take_report(standby, children, jailed):
    """The standby's report: a started snippet (its process joins `children`), an error reply, or the end of stdin
    (returns False). A standby that died without a report stops the server (stdin is out of step)."""
    pid, report_r = standby
    data = os.read(report_r, 1 << 16)
    os.close(report_r)
    report = json.loads(data) if data else {"fatal": "a standby process died without a report"}
    if jailed or "pid" not in report:  # the standby has exited (unjailed, a started one is the snippet's process)
        os.waitpid(pid, 0)
    if "fatal" in report:
        raise OSError(report["fatal"])
    if "eof" in report:
        return False
    if "error" in report:
        os.write(1, (json.dumps(report) + "\n").encode())
    else:
        children[report["pid"]] = (report["id"], report["start"] + report["timeout"], report["start"])
    return True


def _finish_children(children, stdin_open, jailed):
    """Kill and reap each child that has exited or passed its deadline (every child once stdin has closed), and write
    its reply line."""
    import time

    now = time.monotonic()
    for pid in list(children):
        exited = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        rid, deadline, start = children[pid]
        if stdin_open and not exited and now < deadline:
            continue
        _kill_child(pid, jailed)
        status = os.waitpid(pid, 0)[1]
        del children[pid]
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        reply = {"id": rid, "pid": pid, "returncode": returncode, "timed_out": not exited,
                 "duration": time.monotonic() - start}
        os.write(1, (json.dumps(reply) + "\n").encode())


def _kill_child(pid, jailed):
    """In the jail the child is its PID namespace's init: killing it ends every process of the namespace; if that
    fails the server stops (the jail's PID namespace, and every snippet in it, ends with it) rather than wait for a
    child it cannot end. Without the jail, its process group (which outlives its leader only if something escaped
    the fork ban)."""
    if jailed:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        return
    try:
        os.killpg(pid, 9)
    except OSError:
        pass


def _become_snippet(child):
    """The forked child, out of the server's frames: it becomes the snippet's process and never returns."""
    request, outputs, setup, kernel = child
    child.clear()  # the caller's reference to the kernel handle goes with it
    _enter(request, outputs)
    _drop_privileges(request, setup, kernel)
    del kernel
    os.chdir(request["workdir"])  # as the snippet's user: the jail's /work is its own, mode 0700
    code = compile(request["code"], "snippet.py", "exec")
    namespace = _forget_the_server()
    if request.get("audit_hook", True):  # off only where tests check the kernel's layers alone
        _arm(request["workdir"])
    _run_and_exit(code, namespace)


if sys.argv[-1] in ("--fork-server", "--jail-server"):
    try:
        fork_server(sys.argv[-1] == "--jail-server")
        _child = None
    except _Forked as forked:
        _child = forked.args[0]
    if _child is not None:  # a standby, out of the server's frames
        _become_snippet(_standby(_child))
else:
    main()
