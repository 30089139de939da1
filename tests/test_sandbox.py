"""The sandbox against hostile snippets: each must be contained (proved from outside where it can be) and score 0.

Most tests run in the jail (the default); the attacks also run with the audit hook left out, so that the kernel's
layers are shown to hold alone. The older unjailed containment (`jail="none"`) is the parity baseline for honest
snippets and keeps its own tests at the end."""

from __future__ import annotations

import ast
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from unigrad.sandbox import JailUnavailable, SandboxError, SandboxLimits, run, run_many
from unigrad.sandbox import runner as sandbox_module
from unigrad.sandbox.attacks import ATTACKS, check_attacks, memory_search
from unigrad.tasks import Example, get_task

FAST = SandboxLimits(timeout=1.5, cpu_seconds=2)
UNJAILED = {"jail": "none", "allow_root_without_jail": True}
REPO = Path(__file__).resolve().parents[1]


def jailed_processes() -> list[int]:
    """Host pids of live snippet processes of this process's jails: descendants of the bwrap we started that are two
    PID namespaces below the host's (in a sub-jail). Other test runs' jails on the machine are not counted."""
    children: dict[int, list[int]] = {}
    depth: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if "Z" in fields.get("State", ""):
                continue
            children.setdefault(int(fields["PPid"]), []).append(int(entry.name))
            depth[int(entry.name)] = len(fields.get("NSpid", "").split())
    found, todo = [], [jail.server.proc.pid for jail in sandbox_module._jails.values()]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            if depth.get(child, 0) >= 3:
                found.append(child)
    return found


def contained_run(code: str, limits: SandboxLimits = FAST, max_seconds: float = 5.0, **kwargs):
    start = time.monotonic()
    result = run(code, limits, **kwargs)
    assert time.monotonic() - start < max_seconds
    assert jailed_processes() == []  # nothing of any snippet outlives its run
    return result


def test_the_process_census_sees_a_running_snippet():
    # jailed_processes() is what proves that nothing outlives a run: it must see a snippet while one runs.
    import threading

    run("print(0)", FAST)  # the jail is up
    seen: list[list[int]] = []
    worker = threading.Thread(target=run, args=("import time\ntime.sleep(1.0)", FAST))
    worker.start()
    deadline = time.monotonic() + 0.9
    while time.monotonic() < deadline and not seen:
        seen = [found for found in [jailed_processes()] if found]
        time.sleep(0.05)
    worker.join()
    assert len(seen) == 1 and len(seen[0]) == 1
    assert jailed_processes() == []


# ------------------------------------------------------------------------------------------- honest snippets
def test_a_correct_snippet_runs_and_prints():
    result = contained_run("import json, math, re, fractions\nprint(json.dumps([math.factorial(5), 6 * 7]))")
    assert result.ok and result.stdout == "[120, 42]\n"


def test_the_snippet_is_pid_1_of_its_namespace_and_an_unprivileged_user():
    result = contained_run("import os\nprint(os.getpid(), os.getuid(), os.getgid(), os.getgroups())")
    pid, uid, gid, groups = result.stdout.split(" ", 3)
    assert result.ok and pid == "1" and groups.strip() == "[]"
    if os.geteuid() == 0:
        assert (uid, gid) == ("65534", "65534")  # nobody on the host, not root in a namespace


def test_writing_inside_the_working_directory_is_allowed_and_starts_empty():
    code = "import os\nassert os.listdir('.') == []\nopen('f', 'w').write('ok')\nprint(open('f').read(), os.getcwd())"
    assert contained_run(code).stdout == "ok /work\n"
    assert contained_run("import os\nprint(os.listdir('.'))").stdout == "[]\n"  # a fresh tmpfs for every snippet


def test_resource_limits_are_set_in_the_child():
    names = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_NOFILE",
             "RLIMIT_SIGPENDING"]
    code = f"import resource\nprint([resource.getrlimit(getattr(resource, n)) for n in {names}])"
    result = contained_run(code)
    expected = [FAST.cpu_seconds, FAST.memory_bytes, FAST.file_bytes, FAST.processes, 0, FAST.open_files, 16]
    assert result.ok and ast.literal_eval(result.stdout) == [(v, v) for v in expected]


def test_run_many_runs_in_parallel_and_keeps_order():
    start = time.monotonic()
    results = run_many([f"import time\ntime.sleep(1)\nprint({i})" for i in range(6)], FAST, max_workers=6)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - start < 4  # six 1 s sleeps side by side, not one after another


PARITY = [
    "print('hi')",
    "import sys\nsys.exit(3)",
    "import sys\nsys.exit('bye')",
    "raise ValueError('boom')",
    "import os\nprint(sorted(os.environ))",
    "import os\nprint(os.listdir('.'), os.getcwd() == os.environ['HOME'])",
    "import sys\nprint(sys.stdin.read() == '')",
    "def f(:",  # a syntax error: the same traceback
    "import atexit\natexit.register(print, 'at exit')",
    "import json\nprint(json.dumps({'a': [1, 2.5, None]}), __name__)",
]


@pytest.mark.parametrize("code", PARITY)
def test_a_jailed_snippet_behaves_as_a_fresh_interpreter(code):
    jailed = contained_run(code)
    fresh = contained_run(code, fork_server=False, **UNJAILED)
    assert (jailed.returncode, jailed.stdout, jailed.timed_out) == (fresh.returncode, fresh.stdout, fresh.timed_out)
    assert jailed.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]  # the same error line, if any


def test_where_a_jailed_snippet_differs_from_a_fresh_interpreter():
    # No threads (the seccomp filter refuses clone), and the namespace's init cannot signal itself, so an uncaught
    # KeyboardInterrupt ends with status 130 instead of SIGINT; output past RLIMIT_FSIZE fails the write (EFBIG)
    # instead of killing the process with SIGXFSZ.
    thread = contained_run("import threading\nthreading.Thread(target=print).start()")
    assert not thread.ok and "can't start new thread" in thread.stderr
    assert contained_run("raise KeyboardInterrupt").returncode == 130
    flood = contained_run("print('x' * 3000000)")
    assert not flood.ok and len(flood.stdout) <= FAST.output_chars and "File too large" in flood.stderr


def test_honest_code_task_completions_score_as_without_the_jail():
    task = get_task("code:difficulty=2")
    examples = task.examples("test", 12, seed=3)
    completions = [e.answer if i % 3 else e.answer + "+1" for i, e in enumerate(examples)]
    completions += ["x +", "sorted(", "len(x) if x else 0", "max([])"]
    examples = examples + examples[:4]
    jailed = task.verify(completions, examples)
    sandbox_module.configure(**UNJAILED)
    try:
        unjailed = task.verify(completions, examples)
    finally:
        sandbox_module.configure()
    assert jailed == unjailed and sum(jailed) == 8.0


# ------------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
def test_every_attack_of_sandbox_check_is_contained(audit_hook):
    results = check_attacks((audit_hook,))
    assert [r.name for r in results] == list(ATTACKS)
    assert [(r.name, r.evidence) for r in results if not r.contained] == []
    assert jailed_processes() == []


def test_sandbox_check_reports_an_escape_when_there_is_one():
    # The same attacks, without the jail: the check must be able to fail (the unjailed sandbox lets some through).
    results = check_attacks((True,), **UNJAILED)
    escaped = {r.name for r in results if not r.contained}
    assert "read files outside (passwd, the trainer's environment and memory, the project)" in escaped


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
@pytest.mark.parametrize("code", [
    "import os\nos.system('touch {marker}')",
    "import subprocess\nsubprocess.run(['touch', '{marker}'])",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
    "import pty\npty.spawn(['touch', '{marker}'])",
    "open('{marker}', 'w').write('escaped')",
    "import os\nos.symlink('{marker}', 'link')\nopen('link', 'w').write('escaped')",
    "open('../../../../..{marker}', 'a').write('escaped')",
    "import os.path, posixpath\nos.path.realpath = posixpath.abspath = lambda p: '.'\nopen('{marker}', 'w').write('x')",
])
def test_no_process_or_file_outside_can_be_made(code, audit_hook):
    marker = Path(f"/tmp/unigrad_escape_{uuid.uuid4().hex}")
    result = contained_run(code.format(marker=marker), audit_hook=audit_hook)
    assert not result.ok or not audit_hook  # os.system reports a failed start by its status, without raising
    assert not marker.exists()


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
def test_no_process_outside_can_be_killed_or_frozen(audit_hook):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        code = (f"import os, signal\nfor pid in ({bystander.pid}, {os.getpid()}, 1, -1):\n"
                "    for act in (lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGKILL),\n"
                "                lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)):\n"
                "        try:\n            act()\n            print('sent', pid)\n"
                "        except Exception as e:\n            print(type(e).__name__)")
        result = contained_run(code, audit_hook=audit_hook)
        assert "sent" not in result.stdout
        time.sleep(0.1)
        assert bystander.poll() is None  # still alive, and the trainer (this process) too
        assert Path(f"/proc/{bystander.pid}/stat").read_text().split(")")[1].split()[0] != "T"  # not stopped
    finally:
        bystander.kill()
        bystander.wait()


def test_concurrent_snippets_cannot_touch_each_other():
    # One snippet tries to kill every pid it might name and to read or write the others' files; its neighbours in
    # the same batch finish normally and see only their own working directory.
    killer = ("import os\nfor pid in range(-1, 400):\n    try:\n        os.kill(pid, 9)\n    except Exception:\n"
              "        pass\nprint('done')")
    neighbour = ("import os, time\nopen('mine', 'w').write('{i}')\ntime.sleep(0.8)\n"
                 "print(os.listdir('.'), open('mine').read())")
    for audit_hook in (True, False):
        results = run_many([killer] + [neighbour.format(i=i) for i in range(5)], FAST, max_workers=6,
                           audit_hook=audit_hook)
        assert [r.stdout for r in results[1:]] == [f"['mine'] {i}\n" for i in range(5)]
    assert jailed_processes() == []


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
def test_no_network_connection_is_made(audit_hook):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        port = listener.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"    print('connected')\nexcept Exception as e:\n    print(type(e).__name__)")
        result = contained_run(code, audit_hook=audit_hook)
        assert "connected" not in result.stdout
        readable, _, _ = select.select([listener], [], [], 0.3)
        assert readable == []  # no connection ever arrived
    finally:
        listener.close()


def test_memory_bomb_fails_fast_with_memory_error():
    result = contained_run("x = ' ' * 10**10")
    assert not result.ok and not result.timed_out and "MemoryError" in result.stderr


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    result = contained_run("while True:\n    pass")
    assert result.timed_out and not result.ok and result.returncode == -9
    assert result.duration < 3


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
def test_a_sleeping_snippet_is_killed_at_the_wall_clock_timeout(audit_hook):
    # CPU time would never stop it: only the wall clock does (the jail's server must be able to kill a snippet that
    # runs as another uid).
    limits = SandboxLimits(timeout=1.0, cpu_seconds=60)
    results = run_many(["import time\ntime.sleep(30)"] + ["print('ok')"] * 3, limits, max_workers=2,
                       audit_hook=audit_hook)
    assert results[0].timed_out and results[0].returncode == -9 and results[0].duration < 2.5
    assert [r.stdout for r in results[1:]] == ["ok\n"] * 3  # its neighbours are unharmed
    assert jailed_processes() == []


def test_the_total_bytes_written_are_capped():
    code = ("n = 0\ntry:\n    for i in range(100):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * 500_000)\n        n += 500_000\nexcept OSError as e:\n    print(n, e.errno)")
    limits = SandboxLimits(timeout=5, disk_bytes=2 * 2**20)
    result = contained_run(code, limits, audit_hook=False)
    written, errno = result.stdout.split()
    assert int(written) <= limits.disk_bytes and errno == "28"  # ENOSPC


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
def test_files_outside_the_jail_cannot_be_read_or_seen(audit_hook, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    paths = [str(secret), str(REPO / "README.md"), str(REPO / "unigrad" / "tasks" / "code_task.py"), "/etc/passwd",
             f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/mem", "/proc/self/status"]
    code = ("import os\nfor p in " + repr(paths) + ":\n"
            "    seen = []\n    for probe in (os.stat, os.readlink, lambda q: open(q).read()):\n"
            "        try:\n            probe(p)\n            seen.append(probe.__name__)\n        except Exception:\n"
            "            pass\n    print(p, seen)")
    result = contained_run(code, audit_hook=audit_hook)
    assert result.ok and all(line.endswith(" []") for line in result.stdout.splitlines()), result.stdout


def test_parent_environment_secrets_are_invisible():
    # The parent holds the secret in its *initial* environment (as a real API key would be), so that
    # /proc/<parent>/environ would reveal it: run the sandbox from a fresh Python process.
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    snippet = (
        "import os\nprint(dict(os.environ))\n"
        "for p in ('/proc/self/environ', f'/proc/{os.getppid()}/environ', '/proc/1/environ'):\n"
        "    try:\n        print(open(p, 'rb').read())\n    except Exception as e:\n        print(type(e).__name__)\n"
    )
    driver = (f"from unigrad.sandbox import run\nfor hook in (True, False):\n"
              f"    r = run({snippet!r}, audit_hook=hook)\n    print(r.ok, r.stdout, r.stderr)")
    env = {**os.environ, "UNIGRAD_TEST_SECRET": secret}
    out = subprocess.run([sys.executable, "-c", driver], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.count("True ") == 2 and "PermissionError" in out.stdout and "FileNotFoundError" in out.stdout
    assert "UNIGRAD_TEST_SECRET" not in out.stdout and secret not in out.stdout


def test_the_audit_hook_cannot_be_disarmed():
    result = contained_run("f = lambda: 0\nf.__defaults__ = ()")
    assert not result.ok and "PermissionError" in result.stderr
    result = contained_run("import gc\nprint(len(gc.get_objects()))")
    assert not result.ok


@pytest.mark.parametrize("code", [
    # a C module of the standard library under a made-up package name, or loaded by path under any name
    "import sys, types\npkg = types.ModuleType('zz')\npkg.__path__ = [p for p in sys.path if 'dynload' in p]\n"
    "sys.modules['zz'] = pkg\nimport zz._posixsubprocess",
    "import importlib.util, os, sys\nd = [p for p in sys.path if 'dynload' in p][0]\n"
    "f = [n for n in os.listdir(d) if n.startswith('_socket')][0]\n"
    "importlib.util.module_from_spec(importlib.util.spec_from_file_location('harmless', os.path.join(d, f)))",
    # a sub-interpreter, where no audit hook runs
    "import sys, types\npkg = types.ModuleType('zz')\npkg.__path__ = [p for p in sys.path if 'dynload' in p]\n"
    "sys.modules['zz'] = pkg\nimport zz._xxsubinterpreters as s\ns.create()",
    "import signal\nsignal.pidfd_send_signal",
])
def test_the_audit_hook_closes_the_holes_found_in_it(code):
    result = contained_run(code)
    assert not result.ok and ("PermissionError: sandbox:" in result.stderr or "AttributeError" in result.stderr)


def test_the_jails_frames_and_handles_are_out_of_the_snippets_reach():
    code = ("import sys\nf = sys._getframe()\nnames = []\nwhile f:\n    names.append(f.f_code.co_name)\n"
            "    g = f.f_globals\n    f = f.f_back\nprint(names, '_kernel' in g, 'ctypes' in sys.modules,"
            " sys.modules['__main__'].__dict__ is globals())")
    result = contained_run(code)
    assert result.ok, result.stderr
    assert result.stdout.strip() == "['<module>', '_run_and_exit', '_become_snippet', '<module>'] False False True"


def test_the_snippet_inherits_no_descriptor():
    code = ("import os\nopen_fds = []\nfor fd in range(3, 64):\n    try:\n        os.fstat(fd)\n"
            "        open_fds.append(fd)\n    except OSError:\n        pass\nprint(open_fds)")
    result = contained_run(code)
    assert result.ok and result.stdout.strip() == "[]", result.stderr


def test_a_snippet_finds_no_earlier_request_in_its_own_memory():
    # Earlier requests plant a secret: in a program, and in another example's hidden test inputs (the code task's
    # path). The next snippet searches its own memory (mincore and a pipe, no /proc in the jail); it must find the
    # string it made itself (the search works) and nothing planted before it.
    secret = f"PLANTED-{uuid.uuid4().hex}"
    assert contained_run(f"SECRET = {secret!r}\nprint(len(SECRET))").stdout == "40\n"
    example = Example("def f(s): return # s", "s", "s", "code", {"params": "s", "tests": [{"args": [secret],
                                                                                        "expected": secret}]})
    assert get_task("code").verify(["s"], [example]) == [1.0]
    search = memory_search(r"PLANTED-[0-9a-f]{32}")
    code = "mine = 'PLANTED-' + 'ab' * 16\n" + search + "print(pages, sorted(found))"
    result = contained_run(code, SandboxLimits(timeout=20, cpu_seconds=15), max_seconds=20, audit_hook=False)
    pages, found = result.stdout.split(" ", 1)
    assert result.ok and int(pages) > 100, result.stdout + result.stderr
    assert ast.literal_eval(found) == ["PLANTED-" + "ab" * 16]


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-audit-hook", "kernel-alone"])
def test_fcntl_and_ioctl_commands_that_watch_or_signal_are_refused_and_the_rest_work(audit_hook):
    # Each refused command fails with EPERM (1) from the seccomp filter, also with bits above the 32 the kernel reads;
    # the commands honest code uses (flags, non-blocking, duplicating, close-on-exec) still work.
    refused = {"F_NOTIFY": (1026, 0x80000001), "F_NOTIFY+2**32": (1026 + 2**32, 0x80000001), "F_SETOWN": (8, 1),
               "F_SETSIG": (10, 34), "F_SETOWN_EX": (15, 0), "F_SETLEASE": (1024, 0), "F_SETFL O_ASYNC": (4, 0o20000),
               "F_SETPIPE_SZ": (1031, 1 << 18)}
    code = ("import fcntl, os\nr, w = os.pipe()\n"
            "os.set_blocking(r, False)\nprint(os.get_blocking(r), fcntl.fcntl(r, fcntl.F_DUPFD, 10),"
            " fcntl.fcntl(w, fcntl.F_SETFD, fcntl.FD_CLOEXEC), fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK > 0)\n"
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nerrors = {}\n"
            f"for name, (command, arg) in {refused!r}.items():\n"
            "    result = libc.syscall(72, r, ctypes.c_long(command), ctypes.c_long(arg))\n"
            "    errors[name] = ctypes.get_errno() if result < 0 else 'allowed'\n"
            "for name, request in (('FIOSETOWN', 0x8901), ('FIOASYNC', 0x5452)):\n"
            "    result = libc.syscall(16, r, ctypes.c_long(request), ctypes.byref(ctypes.c_int(1)))\n"
            "    errors[name] = ctypes.get_errno() if result < 0 else 'allowed'\n"
            "print(errors)")
    result = contained_run(code, audit_hook=audit_hook)
    if audit_hook:  # the tripwire stops it at the first import
        assert not result.ok and "import of fcntl is not allowed" in result.stderr
        return
    assert result.ok, result.stderr
    works, errors = result.stdout.splitlines()
    assert works == "False 10 0 True"
    assert ast.literal_eval(errors) == {name: 1 for name in [*refused, "FIOSETOWN", "FIOASYNC"]}


def test_system_calls_libseccomp_does_not_know_are_refused_by_number():
    # The installed libseccomp may not know listmount (458), statmount (457) or open_tree_attr (467): the filter
    # refuses them by number (EPERM = 1), where without a rule the kernel answers EFAULT (14), EINVAL or ENOSYS.
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nerrors = []\n"
            "for number in (458, 457, 467):\n"
            "    result = libc.syscall(number, None, None, 0, 0)\n"
            "    errors.append(ctypes.get_errno() if result < 0 else 'allowed')\nprint(errors)")
    result = contained_run(code, audit_hook=False)
    assert result.ok and result.stdout == "[1, 1, 1]\n", result.stdout + result.stderr


def test_the_numbers_kept_for_new_system_calls_agree_with_libseccomp():
    # Where the installed libseccomp knows a name, its number (an independent table) must be the one kept here.
    import pyseccomp

    from unigrad.sandbox import jail as sandbox_jail

    arch = pyseccomp.system_arch()
    known = {name: pyseccomp.resolve_syscall(arch, name) for name in sandbox_jail.UNIFIED_NUMBERS}
    known = {name: number for name, number in known.items() if number >= 0}
    assert len(known) >= 15  # 2.5 knows the calls up to 5.x at least
    assert known == {name: sandbox_jail.UNIFIED_NUMBERS[name] for name in known}


def test_a_filter_with_a_system_call_nobody_knows_is_refused_loudly():
    # A name neither libseccomp nor unigrad's table knows must stop the jail, not leave a hole in the deny list:
    # a made-up name, and a real call newer than this libseccomp (file_setattr, Linux 6.17) that the table lacks.
    import pyseccomp

    from unigrad.sandbox import jail as sandbox_jail

    with pytest.raises(JailUnavailable, match="does not know the system call 'no_such_call'.*upgrade libseccomp"):
        sandbox_jail.seccomp_program(["no_such_call"], snippet=False)
    if pyseccomp.resolve_syscall(pyseccomp.system_arch(), "file_setattr") == -1:
        with pytest.raises(JailUnavailable, match="'file_setattr'"):
            sandbox_jail.seccomp_program(["getpid", "file_setattr"], snippet=True)
    assert sandbox_jail.seccomp_program(["getpid", "listmount"], snippet=False)  # known by number here


def test_hostile_code_task_completions_score_zero_and_a_correct_one_scores_one(tmp_path, monkeypatch):
    task = get_task("code")
    tests = [{"args": [x], "expected": x * x + 1} for x in (-3, 0, 2, 5, 11)]
    example = Example("def f(x): return # x squared plus 1", "x*x+1", "x*x+1", "code", {"params": "x", "tests": tests})
    victim, marker = tmp_path / "keep.txt", Path(f"/tmp/unigrad_escape_{uuid.uuid4().hex}.txt")
    victim.write_text("keep")
    monkeypatch.setenv("UNIGRAD_TEST_SECRET", "hunter2")
    hostile = [
        "[0 for _ in iter(int, 1)]",
        "[__import__('os').fork() for _ in iter(int, 1)]",
        "' ' * 10**10",
        f"open('{marker}', 'w').write('x')",
        f"__import__('os').remove('{victim}')",
        "__import__('socket').create_connection(('127.0.0.1', 9))",
        "len(__import__('os').environ.get('UNIGRAD_TEST_SECRET', '')) + x*x+1 - 7",
        "__import__('sys').exit(0)",
        "print('@@unigrad-result@@' + '[[\"ok\", \"2\"]]') or __import__('os')._exit(0)",  # a forged report
        # the right value, after trying to start a shell through a C module under a made-up name
        "(__import__('sys').modules.__setitem__('zz', type(__import__('sys'))('zz')), setattr(__import__('sys')"
        ".modules['zz'], '__path__', [p for p in __import__('sys').path if 'dynload' in p]), __import__("
        f"'zz._posixsubprocess'), __import__('os').system('touch {marker}'), x*x+1)[-1]",
    ]
    start = time.monotonic()
    scores = task.verify(hostile + ["x*x+1", "1+x**2"], [example] * (len(hostile) + 2))
    assert scores == [0.0] * len(hostile) + [1.0, 1.0]
    assert time.monotonic() - start < 15
    assert not marker.exists() and victim.read_text() == "keep"
    assert jailed_processes() == []


def test_a_training_step_on_the_code_task_survives_hostile_demonstrations():
    # LUFFY scores each prompt's demonstration with the task's verifier inside a real step: here the demonstrations
    # are hostile programs, some returning the right value after trying to escape.
    from step_helpers import step_context

    from unigrad.data.samplers import TaskSampler
    from unigrad.train.learning.batching import encode_prompt
    from unigrad.train.producing.routing import TrainingMode
    from unigrad.train.step import train_step

    task = get_task("code")
    marker = Path(f"/tmp/unigrad_escape_{uuid.uuid4().hex}")
    attacks = [f"(__import__('os').system('touch {marker}'), {{answer}})[1]",
               "[__import__('os').fork() for _ in iter(int, 1)]",
               "(__import__('signal').pidfd_send_signal(__import__('os').pidfd_open(1), 9), {answer})[1]",
               f"(open('{marker}', 'w').write('x'), {{answer}})[1]"]
    pool = [Example(e.prompt, e.answer, attacks[i % len(attacks)].format(answer=e.answer), "code", e.meta)
            for i, e in enumerate(task.examples("train", 8, seed=0))]
    tok = step_context().tokenizer
    ctx = step_context(objective="luffy", mode=TrainingMode("in_group"), tasks=[task], pools=[pool],
                       pool_prompt_ids=[[encode_prompt(tok, e.prompt) for e in pool]],
                       sampler=TaskSampler([len(pool)], seed=1, names=["code"]))
    metrics, _ = train_step(ctx, 0)
    assert metrics["guidance/reward"] == 0.0 and not marker.exists()  # the demonstration rows, run and scored
    assert jailed_processes() == []
    assert task.verify([pool[0].answer], [pool[0]]) == [1.0]  # the same prompt, answered honestly


# ----------------------------------------------------------------------------------- the jail's own life cycle
def test_a_killed_jail_is_replaced_and_nothing_runs_unjailed():
    import signal as signals

    assert contained_run("print(1)").stdout == "1\n"
    jail = sandbox_module._jails[sys.executable]
    jail.server.kill()
    jail.server.proc.wait()
    result = contained_run("import os\nprint(os.getpid())")
    assert result.stdout == "1\n"  # in a new jail, in its own namespace
    assert sandbox_module._jails[sys.executable] is not jail
    assert jail.server.proc.returncode == -signals.SIGKILL


def test_no_jail_as_root_is_refused_unless_said_twice():
    if os.geteuid() != 0:
        pytest.skip("the refusal is for root")
    with pytest.raises(SandboxError, match="allow_root_without_jail"):
        run("print(1)", jail="none")
    from unigrad.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="allow_root_without_jail"):
        load_config(None, ["sandbox.jail=none"])
    assert load_config(None, ["sandbox.jail=none", "sandbox.allow_root_without_jail=true"]).sandbox.jail == "none"


@pytest.mark.slow  # 12 s (timed at load average 5-9 on 2 cores)
def test_without_bubblewrap_the_cli_stops_and_names_the_fix(tmp_path):
    # A PATH without bwrap: `unigrad sandbox-check` and `unigrad train` on the code task stop before anything else.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ldd").symlink_to(shutil.which("ldd"))
    env = {**os.environ, "PATH": str(bin_dir)}
    check = subprocess.run([sys.executable, "-m", "unigrad.cli", "sandbox-check"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 2 and "apt-get install -y bubblewrap" in check.stderr
    assert "sandbox.jail=none" in check.stderr and "Traceback" not in check.stderr
    train = subprocess.run([sys.executable, "-m", "unigrad.cli", "train", "tasks=[code]", "max_steps=1",
                            "--output-dir", str(tmp_path / "run")], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert train.returncode == 2 and "apt-get install -y bubblewrap" in train.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root and a system Python")
def test_the_jail_holds_for_a_trainer_that_is_not_root():
    # The other way into the jail: bwrap makes a user namespace. The sandbox's modules (stdlib and pyseccomp only)
    # are copied where uid 65534 can read them (pytest's tmp_path is not), driven by the system's Python as that user.
    import tempfile

    import pyseccomp

    tmp_path = Path(tempfile.mkdtemp(prefix="unigrad-test-"))
    try:
        _check_a_non_root_trainer(tmp_path, pyseccomp.__file__)
    finally:
        shutil.rmtree(tmp_path)


def _check_a_non_root_trainer(tmp_path: Path, pyseccomp_file: str) -> None:
    package = tmp_path / "unigrad" / "sandbox"
    package.mkdir(parents=True)
    (tmp_path / "unigrad" / "__init__.py").touch()
    for module in (REPO / "unigrad" / "sandbox").glob("*.py"):
        shutil.copy(module, package)
    shutil.copy(pyseccomp_file, tmp_path)
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    driver = ("import os\nfrom unigrad import sandbox\nfrom unigrad.sandbox.attacks import check_attacks\n"
              "print(os.getuid(), sandbox.check())\n"
              "print(sum(not r.contained for r in check_attacks()), 'escaped')\n"
              "print(sandbox.run('import os\\nprint(os.getuid(), os.getpid())', audit_hook=False).stdout)")
    out = subprocess.run(["/usr/bin/python3", "-c", driver], user=65534, group=65534, extra_groups=[], cwd="/",
                         env={"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("65534 bubblewrap jail") and "in a user namespace" in lines[0]
    assert lines[1:] == ["0 escaped", "0 1"]  # uid 0 of the namespace (65534 on the host), pid 1 of its own


def test_sandbox_check_passes_here():
    out = subprocess.run([sys.executable, "-m", "unigrad.cli", "sandbox-check"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{2 * len(ATTACKS)} of {2 * len(ATTACKS)} attacks contained" in out.stdout


def test_jail_unavailable_is_raised_not_swallowed(monkeypatch):
    from unigrad.sandbox import jail as sandbox_jail

    monkeypatch.setattr(sandbox_jail.shutil, "which", lambda name: None)  # as if nothing were installed
    with pytest.raises(JailUnavailable, match="bubblewrap"):
        run("print(1)", python="/nonexistent/python-for-a-new-jail")


# ----------------------------------------------------------------------- without the jail (sandbox.jail=none)
def test_unjailed_fork_server_child_behaves_as_a_fresh_interpreter():
    for code in [*PARITY, "raise KeyboardInterrupt", "print('x' * 3000000)"]:
        forked = run(code, FAST, **UNJAILED)
        fresh = run(code, FAST, fork_server=False, **UNJAILED)
        assert (forked.returncode, forked.stdout, forked.timed_out) == (fresh.returncode, fresh.stdout,
                                                                        fresh.timed_out)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("python3", path="/usr/bin"), reason="needs root")
def test_unjailed_as_root_the_child_drops_to_nobody_when_the_interpreter_allows():
    result = run("import os\nprint(os.getuid())", FAST, python="/usr/bin/python3", **UNJAILED)
    assert result.ok and result.stdout.strip() == "65534"


@pytest.mark.parametrize("fork_server", [True, False])
def test_unjailed_a_directory_descriptor_cannot_carry_a_write_outside(fork_server, tmp_path):
    code = (f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
            "os.open('planted', os.O_WRONLY | os.O_CREAT, dir_fd=d)")
    result = run(code, FAST, fork_server=fork_server, **UNJAILED)
    assert not result.ok and "opening the directory" in result.stderr
    assert not (tmp_path / "planted").exists()
