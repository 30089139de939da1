"""Hostile snippets, each trying one way out of the sandbox and printing "ESCAPED: ..." if it got there.

Used by `unigrad sandbox-check` (on any machine: is the jail holding here?) and by tests/test_sandbox.py, which also
checks each attack from outside (marker files, bystander processes, a listening socket). `check_attacks` runs every
attack twice: with the audit hook and without it, so that the kernel's layers (namespaces, seccomp, uid, rlimits)
are shown to hold on their own. Each snippet catches its own errors: a contained attack exits 0 or 1 quietly.
"""

from __future__ import annotations

from dataclasses import dataclass


def memory_search(pattern: str) -> str:
    """A snippet that searches its own memory for the regular expression `pattern` (of bytes) and leaves the matches
    in `found` and the number of pages it could read in `pages`. Without /proc it finds its memory around three
    anchors (the heap's end, a small and a large object), with mincore for what is mapped and a pipe to copy each page
    (an unreadable one fails the write instead of crashing the process). Needs ctypes: the audit hook refuses it."""
    return f"""
import ctypes, os, re
found, pages = set(), 0
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.write.restype, libc.write.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    PAGE, SPAN, seen = 4096, 64 << 20, set()
    r, w = os.pipe()
    vector, regex = ctypes.create_string_buffer(1), re.compile({pattern.encode()!r})
    for anchor in (libc.sbrk(0), id(object()), id(bytes(1 << 18))):
        tail = b''
        for address in range(max(PAGE, (anchor & -PAGE) - SPAN), (anchor & -PAGE) + SPAN, PAGE):
            data = b''
            if address not in seen and libc.mincore(address, PAGE, vector) == 0:
                if libc.write(w, address, PAGE) == PAGE:
                    data, pages = os.read(r, PAGE), pages + 1
            seen.add(address)
            found.update(m.decode() for m in regex.findall(tail + data))
            tail = data[-256:]
except Exception as e:
    print(type(e).__name__, e)
"""


# The C modules and system calls below are the ones a snippet would reach for; the numbers are x86-64's.
ATTACKS: dict[str, str] = {
    "spawn a shell (os.system, fork, posix_spawn)": """
import os
for attempt in (lambda: os.system('true') == 0, lambda: os.fork() >= 0,
                lambda: os.posix_spawn('/bin/sh', ['sh', '-c', 'true'], {}) > 0):
    try:
        if attempt():
            print('ESCAPED: made a process')
    except Exception:
        pass
""",
    "a stdlib C module under a made-up package name": """
import importlib.util, os, sys, types
dynload = [p for p in sys.path if p.endswith('lib-dynload')][0]
pkg = types.ModuleType('zz'); pkg.__path__ = [dynload]; sys.modules['zz'] = pkg
try:
    import zz._posixsubprocess as ps
    print('loaded', ps)
    name = [f for f in os.listdir(dynload) if f.startswith('_posixsubprocess')][0]
    spec = importlib.util.spec_from_file_location('_posixsubprocess', os.path.join(dynload, name))
    mod = importlib.util.module_from_spec(spec)
    r, w = os.pipe()
    pid = mod.fork_exec([b'/bin/sh', b'-c', b'true'], [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1,
                        r, w, True, False, None, None, None, -1, None, False)
    print('ESCAPED: spawned pid', pid)
except Exception as e:
    print(type(e).__name__, e)
""",
    "a sub-interpreter (no audit hook inside)": """
import os
try:
    import _xxsubinterpreters as interpreters
    interp = interpreters.create()
    interpreters.run_string(interp, "import os\\n"
                                    "if os.system('true') == 0: print('ESCAPED: system in a sub-interpreter')")
except Exception as e:
    print(type(e).__name__, e)
""",
    "signal or freeze another process (kill, pidfd_send_signal)": """
import os, signal
for pid in list(range(-1, 300)):
    if pid in (0, os.getpid()):
        continue
    try:
        os.kill(pid, 0)
        print('ESCAPED: could signal pid', pid)
        break
    except Exception:
        pass
    try:
        fd = os.pidfd_open(pid)
        print('ESCAPED: pidfd of pid', pid, fd)
        break
    except Exception:
        pass
""",
    "raw system calls through ctypes (fork, socket, ptrace, unshare, mount, x32 ABI)": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for name, number, args in (('fork', 57, ()), ('socket', 41, (2, 1, 0)), ('ptrace attach 1', 101, (16, 1, 0, 0)),
                           ('unshare user', 272, (0x10000000,)), ('umount2 /io', 166, (b'/io', 2)),
                           ('memfd_create', 319, (b'x', 0))):
    if libc.syscall(number, *args) >= 0:
        print('ESCAPED: syscall', name)
print('x32 fork returned', libc.syscall(0x40000000 | 57))
""",
    "kernel memory outside the rlimits (SysV IPC, message queues, AIO, POSIX timers)": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ctx = ctypes.c_ulong(0)
for name, result in (('shmget', lambda: libc.shmget(0, 1 << 20, 0o1600)),
                     ('semget', lambda: libc.semget(0, 8, 0o1600)), ('msgget', lambda: libc.msgget(0, 0o1600)),
                     ('mq_open', lambda: libc.syscall(240, b'q', 0o100, 0o600, None)),
                     ('io_setup', lambda: libc.syscall(206, 64, ctypes.byref(ctx))),
                     ('timer_create', lambda: libc.syscall(222, 1, None, ctypes.byref(ctx)))):
    if result() >= 0:
        print('ESCAPED:', name)
""",
    "grow a file past its limit, watch files, sync the host (fallocate, inotify, sync)": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
if libc.fallocate(1, 1, ctypes.c_long(0), ctypes.c_long(1 << 30)) == 0:
    print('ESCAPED: fallocate on stdout')
if libc.inotify_init1(0) >= 0:
    print('ESCAPED: inotify')
if libc.syscall(162) == 0:
    print('ESCAPED: sync')
""",
    "open a network connection": """
import socket
for family, address in ((socket.AF_INET, ('127.0.0.1', 9)), (socket.AF_INET, ('10.0.0.1', 80)),
                        (socket.AF_UNIX, '/run/systemd/private')):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        print('ESCAPED: opened a socket', family)
        s.connect(address)
        print('ESCAPED: connected to', address)
    except Exception:
        pass
""",
    "read files outside (passwd, the trainer's environment and memory, the project)": """
import os
for path in ('/etc/passwd', '/etc/shadow', '/proc/1/environ', '/proc/self/status', '/proc/1/mem', '/root/.bashrc',
             '/home', '/tmp', '/usr/bin/sh', '/bin/sh'):
    try:
        if os.path.exists(path) or os.access(path, os.R_OK):
            print('ESCAPED: can see', path)
    except Exception:
        pass
""",
    "stat, access and readlink of other processes and files": """
import os
for path in ('/proc/1/cwd', '/proc/1/exe', '/proc/self/exe', '/etc/hostname', '/var/log'):
    for probe in (os.stat, os.readlink, lambda p: os.access(p, os.F_OK) or (_ for _ in ()).throw(OSError())):
        try:
            probe(path)
            print('ESCAPED:', getattr(probe, '__name__', 'access'), path)
        except Exception:
            pass
""",
    "write outside the working directory": """
import os
for path in ('/x', '/dev/x', '/root/x', '/tmp/x', '/io/x', '../x'):
    try:
        with open(path, 'w') as f:
            f.write('x')
        print('ESCAPED: wrote', path)
    except Exception:
        pass
""",
    "write more than the disk cap (many files)": """
written = 0
try:
    for i in range(64):
        with open(f'f{i}', 'wb') as f:
            f.write(b'x' * (1 << 20))
        written += 1 << 20
except OSError:
    pass
if written > 8 << 20:
    print('ESCAPED: wrote', written, 'bytes')
""",
    "a thread or a daemon that outlives the snippet": """
import os, threading
try:
    threading.Thread(target=lambda: None).start()
    print('ESCAPED: started a thread')
except Exception:
    pass
try:
    if os.fork() == 0:
        os.setsid()
    else:
        print('ESCAPED: forked a daemon')
except Exception:
    pass
""",
    "raise its limits or change its ids": """
import os, resource
try:
    resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print('ESCAPED: raised RLIMIT_CPU')
except Exception:
    pass
for call in ('setuid', 'setgid'):
    try:
        getattr(os, call)(0)
        if os.getuid() == 0 and call == 'setuid':
            print('ESCAPED: became uid 0')
    except Exception:
        pass
""",
    "the trainer's environment variables": """
import os
leaked = set(os.environ) - {'PATH', 'LANG', 'LC_ALL', 'HOME', 'TMPDIR'}
if leaked:
    print('ESCAPED: environment has', sorted(leaked))
""",
    "watch the host's file reads or queue signals (fcntl F_NOTIFY, F_SETOWN, F_SETSIG, O_ASYNC, leases, ioctl)": """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
long = ctypes.c_long
stdlib = os.open([p for p in sys.path if p.endswith('lib-dynload')][0], os.O_RDONLY)  # the host's, bound read-only
r, w = os.pipe()
with open('leased', 'w'):
    pass
leased = os.open('leased', os.O_RDONLY)
owner = (ctypes.c_int * 2)(1, os.getpid())  # struct f_owner_ex: F_OWNER_PID, this process
for name, fd, command, arg in (('F_NOTIFY', stdlib, 1026, 0x80000001), ('F_NOTIFY, high bits', stdlib, 1026 | 1 << 32,
                               0x80000001), ('F_SETOWN', r, 8, os.getpid()), ('F_SETOWN_EX', r, 15,
                               ctypes.addressof(owner)), ('F_SETSIG', r, 10, 34), ('F_SETFL O_ASYNC', r, 4,
                               os.O_ASYNC), ('F_SETLEASE', leased, 1024, 0), ('F_SETPIPE_SZ', r, 1031, 1 << 18)):
    if libc.syscall(72, fd, long(command), long(arg)) >= 0 or ctypes.get_errno() != 1:
        print('ESCAPED: fcntl', name)
pid = ctypes.c_int(os.getpid())
for name, request in (('FIOSETOWN', 0x8901), ('SIOCSPGRP', 0x8902), ('FIOASYNC', 0x5452)):
    if libc.syscall(16, r, long(request), ctypes.byref(pid)) >= 0 or ctypes.get_errno() != 1:
        print('ESCAPED: ioctl', name)
""",
    "hold pipe buffers against the uid's quota (many pipes, F_SETPIPE_SZ)": """
import fcntl, os
held = 0
try:
    while True:
        r, w = os.pipe()
        try:
            fcntl.fcntl(r, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
        held += fcntl.fcntl(r, 1032)  # F_GETPIPE_SZ
except OSError:
    pass
if held > 2 << 20:  # 30 pipes of 64 KiB fit in 64 descriptors; 8 such snippets hold 15 MiB of the 64 MiB soft quota
    print('ESCAPED: holds', held >> 20, 'MiB of pipe buffers')
""",
    "list the host's mounts (listmount, statmount: calls libseccomp may not know by name)": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
request = (ctypes.c_uint64 * 3)(24, 0xFFFFFFFFFFFFFFFF, 0)  # struct mnt_id_req: size, the root, no offset
ids = (ctypes.c_uint64 * 512)()
if libc.syscall(458, request, ids, 512, 0) >= 0 or ctypes.get_errno() != 1:
    print('ESCAPED: listmount')
request[1], info = 0x1, ctypes.create_string_buffer(1 << 16)
if libc.syscall(457, request, info, 1 << 16, 0) >= 0 or ctypes.get_errno() != 1:
    print('ESCAPED: statmount')
""",
    # Runs right after the attack above in check_attacks, and looks for its program (a pattern that does not match its
    # own source: the backslashes).
    "read the previous snippet's program in this one's memory": memory_search(r"libc\.syscall\(458, request")
    + """
if found:
    print('ESCAPED: the previous snippet is in this one', sorted(found))
""",
}


@dataclass(frozen=True)
class AttackResult:
    name: str
    audit_hook: bool
    contained: bool
    evidence: str  # the "ESCAPED" lines, or why it could not be judged


def check_attacks(audit_hook_modes: tuple[bool, ...] = (True, False), **run_kwargs) -> list[AttackResult]:
    """Run every attack through `sandbox.run` in each audit-hook mode; an attack is contained when its snippet
    printed no "ESCAPED" line and did not time out."""
    from unigrad.sandbox import SandboxLimits, run

    limits = SandboxLimits(timeout=10, cpu_seconds=5)
    results = []
    for hook in audit_hook_modes:
        for name, code in ATTACKS.items():
            result = run(code, limits, audit_hook=hook, **run_kwargs)
            escaped = [line for line in result.stdout.splitlines() if line.startswith("ESCAPED")]
            evidence = "; ".join(escaped) or ("timed out" if result.timed_out else "")
            results.append(AttackResult(name, hook, not escaped and not result.timed_out, evidence))
    return results
