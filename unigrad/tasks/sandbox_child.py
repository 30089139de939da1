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
            if flags & _write:
                if not inside:
                    raise _deny("sandbox: writing outside the working directory is not allowed")
            elif not inside and full not in ("/dev/null", "/dev/urandom") and not (full + "/").startswith(_readable):
                raise _deny("sandbox: reading " + full + " is not allowed")

    return hook


def main():
    config = json.loads(sys.argv[1])
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
    code = compile(source, "snippet.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


main()
