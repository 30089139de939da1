"""The jail the kernel enforces around model-written code: bubblewrap namespaces, seccomp filters, an unprivileged uid.

One jail per trainer process and interpreter, started on first use: bubblewrap (`bwrap`) runs the snippet server
(`child.py --jail-server`) in new PID, network, IPC, UTS, mount (and cgroup) namespaces, over a read-only root
that holds only the interpreter, its standard library (site-packages hidden under an empty tmpfs), the shared
libraries they load (found with `ldd`), /dev/null and /dev/urandom, an empty /work and /io, a host directory where
the snippets' output files are created. No /proc, no /tmp, no home, no project files. The server keeps five
capabilities (SYS_ADMIN, SETUID, SETGID, SETPCAP, and KILL: a snippet runs as another uid, and must be killable at
its deadline) so that it can build and end a sub-jail per snippet (see child.py): its own PID, mount and
IPC namespaces, a fresh size-capped tmpfs as working directory, no capability, the unprivileged uid and the
snippets' seccomp filter.

Who the snippet is on the host: when the trainer runs as root, bwrap runs privileged (no user namespace) and the
snippet's process takes uid/gid 65534 (nobody) itself, so it is an unprivileged user on the host, not root in a
namespace. Otherwise bwrap makes a user namespace in which the server is uid 0 and the snippet keeps that uid without
any capability; on the host that is the trainer's own (unprivileged) uid, and further user namespaces are disabled.

Two seccomp filters, built here with libseccomp (through pyseccomp) for the machine's native architecture (any other
architecture's system calls kill the process): the server's (loaded by bwrap), which refuses what no part of the jail
needs (sockets, tracing, other processes' memory, kernel keys, modules, BPF, io_uring, ...), and the snippets'
(loaded by the snippet's process just before the audit hook), which refuses in addition every way to make a process
or thread, exec, signal (kill, tgkill, pidfd_*), mount or unshare, change ids or capabilities, raise rlimits, make
device nodes or memory files, allocate kernel memory outside its rlimits (SysV IPC, message queues, AIO), grow a file
with fallocate, watch files (inotify, fanotify, cachestat, fcntl's F_NOTIFY), list mounts, sync the host's disks, make
POSIX timers, or use the fcntl and ioctl commands that make the kernel signal it (F_SETOWN, F_SETSIG, O_ASYNC, ...) or
grow a pipe (F_SETPIPE_SZ). A refused call fails with EPERM (PermissionError in Python). Every name on the deny lists
is refused by number: libseccomp's, or for calls newer than the installed libseccomp, UNIFIED_NUMBERS; a name neither
knows stops the jail (JailUnavailable) rather than leave a hole.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; Fedora: `dnf install "
                "bubblewrap`; Arch: `pacman -S bubblewrap`)")
OPT_OUT_HINT = ("or run without the jail (not recommended: model-written code then runs with only an audit hook "
                "and rlimits around it) with sandbox.jail=none")
NOBODY = 65534

# Neither the server nor a snippet needs these.
SERVER_DENIED = """socket socketpair ptrace process_vm_readv process_vm_writev process_madvise kcmp pidfd_getfd bpf
    perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register keyctl add_key request_key
    init_module finit_module delete_module kexec_load kexec_file_load reboot swapon swapoff acct quotactl quotactl_fd
    syslog lookup_dcookie open_by_handle_at name_to_handle_at vhangup iopl ioperm uselib sethostname setdomainname
    settimeofday clock_settime clock_adjtime adjtimex setns pivot_root chroot""".split()
# A snippet's process also may not make processes or threads, exec, signal, (un)mount, change its ids or
# capabilities, raise limits, make device nodes or memory files.
SNIPPET_DENIED = SERVER_DENIED + """fork vfork clone execve execveat kill tkill tgkill rt_sigqueueinfo
    rt_tgsigqueueinfo pidfd_open pidfd_send_signal unshare mount umount2 open_tree open_tree_attr move_mount fsopen
    fsconfig fsmount fspick mount_setattr listmount statmount setuid setgid setreuid setregid setresuid setresgid
    setgroups setfsuid setfsgid capset setrlimit mknod mknodat memfd_create memfd_secret modify_ldt personality
    migrate_pages move_pages landlock_create_ruleset lsm_set_self_attr name_to_handle_at
    shmget shmat shmdt shmctl semget semop semtimedop semctl msgget msgsnd msgrcv msgctl mq_open mq_unlink
    mq_timedsend mq_timedreceive mq_notify mq_getsetattr io_setup io_destroy io_submit io_cancel io_getevents
    io_pgetevents fallocate inotify_init inotify_init1 inotify_add_watch fanotify_init fanotify_mark sync syncfs
    timer_create cachestat""".split()
# Why the second half: SysV IPC, POSIX message queues and AIO allocate kernel memory that RLIMIT_AS does not count
# (a fresh IPC namespace has the kernel's generous defaults); fallocate grows the output files past RLIMIT_FSIZE (it
# is only checked when the size changes); inotify would watch the host's reads of the bound standard library (and
# cachestat would tell which of its pages the host has read); sync stalls the whole host's writeback; POSIX timers
# queue signals against the (shared) uid's pending-signal limit.

# The system calls added to Linux from 5.1 on have one number on every architecture this module supports (those of
# the generic table: x86-64, aarch64, riscv64; arch/x86/entry/syscalls/syscall_64.tbl, scripts/syscall.tbl). An older
# libseccomp does not know the newest names (2.5.4 stops at 453): they are refused by these numbers.
UNIFIED_NUMBERS = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    "quotactl_fd": 443, "landlock_create_ruleset": 444, "memfd_secret": 447, "cachestat": 451, "statmount": 457,
    "listmount": 458, "lsm_set_self_attr": 460, "open_tree_attr": 467,
}
UNIFIED_ARCHES = ("X86_64", "AARCH64", "RISCV64")  # pyseccomp.Arch names

# fcntl and ioctl commands a snippet may not use (the command is an unsigned int: only its low 32 bits are compared,
# as the kernel reads them). F_NOTIFY (dnotify) would watch the host's reads of the bound standard library, as
# inotify would; F_SETOWN, F_SETOWN_EX, FIOSETOWN and SIOCSPGRP name a process to signal, F_SETSIG makes that a
# queued real-time signal (each one counts against the uid's pending-signal limit), F_SETLEASE signals the holder
# when another process opens the file; F_SETPIPE_SZ grows a pipe's buffer against the uid's pipe quota.
F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE, F_NOTIFY, F_SETPIPE_SZ, F_SETFL = 8, 10, 15, 1024, 1026, 1031, 4
FCNTL_DENIED = {"F_SETOWN": F_SETOWN, "F_SETSIG": F_SETSIG, "F_SETOWN_EX": F_SETOWN_EX, "F_SETLEASE": F_SETLEASE,
                "F_NOTIFY": F_NOTIFY, "F_SETPIPE_SZ": F_SETPIPE_SZ}
IOCTL_DENIED = {"FIOSETOWN": 0x8901, "SIOCSPGRP": 0x8902, "FIOASYNC": 0x5452}
O_ASYNC = 0o20000  # F_SETFL with O_ASYNC (signal-driven I/O) is refused as well


class JailUnavailable(RuntimeError):
    """The jail cannot be built here; the message names the cause and the fix."""


def _pyseccomp():
    try:
        import pyseccomp
    except ImportError as e:
        raise JailUnavailable(f"sandbox: {e}: `pip install pyseccomp` (a dependency of unigrad), "
                              + OPT_OUT_HINT) from None
    except OSError as e:  # pyseccomp loads libseccomp.so.2 at import
        raise JailUnavailable(f"sandbox: libseccomp cannot be loaded ({e}); install it (Debian/Ubuntu: "
                              "`apt-get install -y libseccomp2`), " + OPT_OUT_HINT) from None
    return pyseccomp


def syscall_number(pyseccomp, name: str) -> int | None:
    """The native architecture's number of the system call `name`; None if libseccomp knows the name and this
    architecture has no such call (e.g. fork on aarch64). A name libseccomp does not know is looked up in
    UNIFIED_NUMBERS; a name found in neither stops the jail (a deny list must not shrink silently)."""
    arch = pyseccomp.system_arch()
    number = pyseccomp.resolve_syscall(arch, name)
    if number >= 0:
        return number
    if number != -1:  # a pseudo-number (below -10000): a call other architectures have
        return None
    unified = arch in {getattr(pyseccomp.Arch, a) for a in UNIFIED_ARCHES}
    if unified and name in UNIFIED_NUMBERS:
        return UNIFIED_NUMBERS[name]
    raise JailUnavailable(
        f"sandbox: the installed libseccomp does not know the system call {name!r} and unigrad has no number for it "
        f"on this architecture ({arch:#x}), so it cannot be refused. Fix: upgrade libseccomp (and pyseccomp), or "
        f"remove {name!r} from the deny list if it is not a system call; " + OPT_OUT_HINT)


def seccomp_program(denied: list[str], *, snippet: bool) -> bytes:
    """A BPF program (bytes of struct sock_filter) that fails the named system calls with EPERM and allows the rest.
    Each name is refused by number (see `syscall_number`); a name nobody knows raises JailUnavailable. For snippets,
    clone3 fails with ENOSYS (so that a C library falls back to clone, also refused), prlimit64 may only read limits,
    and the fcntl and ioctl commands that watch files, signal or grow pipes fail with EPERM."""
    pyseccomp = _pyseccomp()
    eperm = pyseccomp.ERRNO(errno.EPERM)
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in dict.fromkeys(denied):
        number = syscall_number(pyseccomp, name)
        if number is not None:
            rules.add_rule(eperm, number)
    if snippet:
        rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), syscall_number(pyseccomp, "clone3"))
        rules.add_rule(eperm, "prlimit64", pyseccomp.Arg(2, pyseccomp.NE, 0))
        _refuse_commands(pyseccomp, rules, eperm)
    with tempfile.TemporaryFile() as f:
        rules.export_bpf(f)
        f.seek(0)
        return f.read()


def _refuse_commands(pyseccomp, rules, eperm) -> None:
    """fcntl's and ioctl's commands in FCNTL_DENIED and IOCTL_DENIED, and F_SETFL with O_ASYNC: EPERM."""
    def low32(index: int, value: int, mask: int = 0xFFFFFFFF):
        return pyseccomp.Arg(index, pyseccomp.MASKED_EQ, mask, value)

    for command in FCNTL_DENIED.values():
        rules.add_rule(eperm, "fcntl", low32(1, command))
    rules.add_rule(eperm, "fcntl", low32(1, F_SETFL), low32(2, O_ASYNC, O_ASYNC))
    for command in IOCTL_DENIED.values():
        rules.add_rule(eperm, "ioctl", low32(1, command))


@functools.cache
def _interpreter(python: str) -> tuple[str, list[str]]:
    """(the interpreter's real path, its module directories without site-packages), asked of the interpreter."""
    probe = "import json, sys; print(json.dumps([sys.executable, [p for p in sys.path if p]]))"
    try:
        out = subprocess.run([python, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise JailUnavailable(f"sandbox: the interpreter {python} does not start: {e}") from None
    executable, paths = json.loads(out.stdout)
    return os.path.realpath(executable or python), [os.path.realpath(p) for p in paths if os.path.isdir(p)]


def _shared_libraries(files: list[str]) -> list[str]:
    """Every shared library the interpreter and its extension modules load, as `ldd` resolves them."""
    if not shutil.which("ldd"):
        raise JailUnavailable("sandbox: `ldd` is needed to find the interpreter's shared libraries (Debian/Ubuntu: "
                              "package libc-bin), " + OPT_OUT_HINT)
    libraries: set[str] = set()
    for start in range(0, len(files), 200):
        out = subprocess.run(["ldd", *files[start:start + 200]], capture_output=True, text=True, timeout=60).stdout
        for line in out.splitlines():
            for word in line.split():
                if word.startswith("/") and not word.endswith(":") and os.path.exists(word):
                    libraries.add(word)
    return sorted(libraries)


@functools.cache
def read_only_paths(python: str) -> tuple[list[str], list[str]]:
    """(paths bound read-only at their own place in the jail, directories hidden under an empty tmpfs)."""
    executable, module_dirs = _interpreter(python)
    extensions = [str(p) for d in module_dirs for p in Path(d).glob("*.so")]
    binds = [executable, *module_dirs, *_shared_libraries([executable, *extensions])]
    hidden = [str(d / name) for d in map(Path, module_dirs) for name in ("site-packages", "dist-packages")
              if (d / name).is_dir()]
    return list(dict.fromkeys(binds)), hidden


def bwrap_command(python: str, io_dir: str, seccomp_fd: int) -> list[str]:
    """The bubblewrap command line that starts the jailed snippet server (see the module docstring)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise JailUnavailable("sandbox: bubblewrap (`bwrap`) is not installed; " + INSTALL_HINT + ", " + OPT_OUT_HINT)
    binds, hidden = read_only_paths(python)
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--chdir", "/", "--cap-drop", "ALL"]
    for cap in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL"):
        argv += ["--cap-add", cap]
    if os.geteuid() != 0:
        argv += ["--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns"]
    devices = ["/dev/null", "/dev/urandom"]
    # The directories leading to what is bound: made world-traversable (bwrap would copy /root's 0700 and the like).
    parents = {str(parent) for path in [*binds, *devices, "/work", "/io"] for parent in Path(path).parents}
    for directory in sorted(parents - {"/"}, key=lambda d: (d.count("/"), d)):
        argv += ["--perms", "0755", "--dir", directory]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for path in hidden:
        argv += ["--tmpfs", path, "--remount-ro", path]
    for device in devices:
        argv += ["--dev-bind", device, device]
    argv += ["--dir", "/work", "--bind", io_dir, "/io", "--seccomp", str(seccomp_fd), "--remount-ro", "/"]
    return argv


def snippet_ids() -> tuple[int, int]:
    """The (uid, gid) a snippet runs as, inside the jail: nobody when the trainer is root, else the namespace's 0
    (the trainer's own uid on the host)."""
    return (NOBODY, NOBODY) if os.geteuid() == 0 else (0, 0)


def explain_failure(reason: str) -> str:
    """A jail that did not start: what bwrap said, and what usually fixes it."""
    fix = INSTALL_HINT
    if "namespace" in reason.lower() or "operation not permitted" in reason.lower():
        fix = ("allow user namespaces for this user (e.g. `sysctl -w kernel.unprivileged_userns_clone=1`; on Ubuntu "
               "24.04 and later `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile "
               "for bwrap), or run the trainer as root, or inside a container that allows them")
    return f"sandbox: the jail did not start: {reason or 'no reason given'}. Fix: {fix}; {OPT_OUT_HINT}"
