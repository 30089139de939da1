"""The sandbox against hostile snippets: each must be contained (proved from outside) and score 0."""

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

from unigrad.tasks import Example, get_task
from unigrad.tasks.sandbox import SandboxLimits, run, run_many

FAST = SandboxLimits(timeout=1.5, cpu_seconds=2)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def contained_run(code: str, limits: SandboxLimits = FAST, max_seconds: float = 5.0, **kwargs):
    start = time.monotonic()
    result = run(code, limits, **kwargs)
    assert time.monotonic() - start < max_seconds
    assert group_members(result.pid) == []  # nothing the snippet started survives it
    return result


def test_a_correct_snippet_runs_and_prints():
    result = contained_run("import json, math, re, fractions\nprint(json.dumps([math.factorial(5), 6 * 7]))")
    assert result.ok and result.stdout == "[120, 42]\n"


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    result = contained_run("while True:\n    pass")
    assert result.timed_out and not result.ok and result.returncode == -9
    assert result.duration < 3


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nos.system('touch {marker}')",
    "import subprocess\nsubprocess.run(['touch', '{marker}'])",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
    "import pty\npty.spawn(['touch', '{marker}'])",
])
def test_no_process_can_be_created_or_signalled(code):
    marker = Path(f"/tmp/unigrad_escape_{uuid.uuid4().hex}")
    result = contained_run(code.format(marker=marker))
    assert not result.ok
    assert not marker.exists()


def test_no_process_outside_can_be_killed():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        result = contained_run(f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)")
        assert not result.ok and "PermissionError" in result.stderr
        assert bystander.poll() is None  # still alive
    finally:
        bystander.kill()
        bystander.wait()


def test_memory_bomb_fails_fast_with_memory_error():
    result = contained_run("x = ' ' * 10**10")
    assert not result.ok and not result.timed_out and "MemoryError" in result.stderr


def test_output_flood_is_cut_off():
    result = contained_run("while True:\n    print('x' * 10000)")
    assert not result.ok and len(result.stdout) <= FAST.output_chars  # RLIMIT_FSIZE killed it at 1 MB


@pytest.mark.parametrize("code", [
    "open('{path}', 'w').write('escaped')",
    "import os\nos.close(os.open('{path}', os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path('{path}').write_text('escaped')",
    "open('../../../../..{path}', 'a').write('escaped')",
    "import os.path, posixpath\nos.path.realpath = posixpath.abspath = lambda p: '.'\nopen('{path}', 'w').write('x')",
    "import os\nos.symlink('{path}', 'link')\nopen('link', 'w').write('escaped')",
    "import os\nos.mkdir('{path}')",
    "import os\nos.mkfifo('{path}')",
])
def test_writing_outside_the_working_directory_is_blocked(code):
    path = Path(f"/tmp/unigrad_escape_{uuid.uuid4().hex}.txt")
    result = contained_run(code.format(path=path))
    assert not result.ok and ("PermissionError" in result.stderr or "AttributeError" in result.stderr)
    assert not path.exists()


def test_a_device_node_cannot_be_opened_even_if_one_is_made():
    # mknod is not audited and deleted from os only on a best-effort basis; _imp can bring it back.
    code = (
        "import _imp, importlib.machinery, os\n"
        "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))\n"
        "posix.mknod('disk', 0o600 | 0o060000, os.makedev(7, 0))\n"  # a block device: loop0
        "open('disk', 'r+b')"
    )
    result = contained_run(code)
    assert not result.ok and "PermissionError" in result.stderr


def test_writing_inside_the_working_directory_is_allowed_and_cleaned_up():
    code = "import os\nassert os.listdir('.') == []\nopen('f', 'w').write('ok')\nprint(open('f').read(), os.getcwd())"
    result = contained_run(code)
    assert result.ok and result.stdout.startswith("ok ")  # it started in an empty directory and could write there
    assert not Path(result.stdout.split()[1]).exists()  # the working directory is deleted afterwards


@pytest.mark.parametrize("code", [
    "import os\nos.remove('{path}')",
    "import os\nos.unlink('{path}')",
    "import shutil\nshutil.rmtree('{dir}')",
    "import os\nos.rename('{path}', '{path}.moved')",
    "import pathlib\npathlib.Path('{path}').unlink()",
    "import os\nos.truncate('{path}', 0)",
    "open('{path}', 'w').close()",
])
def test_deleting_or_clobbering_files_is_blocked(code, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    result = contained_run(code.format(path=victim, dir=tmp_path))
    assert not result.ok
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "_socket = __import__('_socket')\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
    "import ctypes\nctypes.CDLL(None).connect",
])
def test_no_network_connection_is_made(code):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        result = contained_run(code.format(port=listener.getsockname()[1]))
        assert not result.ok
        readable, _, _ = select.select([listener], [], [], 0.3)
        assert readable == []  # no connection ever arrived
    finally:
        listener.close()


def test_parent_environment_secrets_are_invisible():
    # The parent must hold the secret in its *initial* environment (as a real API key would be), so
    # that /proc/<parent>/environ would reveal it: run the sandbox from a fresh Python process.
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    snippet = (
        "import os\nprint(dict(os.environ))\n"
        "for p in ('/proc/self/environ', f'/proc/{os.getppid()}/environ', '/proc/1/environ'):\n"
        "    try:\n        print(open(p, 'rb').read())\n    except Exception as e:\n        print(type(e).__name__)\n"
    )
    driver = f"from unigrad.tasks.sandbox import run\nr = run({snippet!r})\nprint(r.ok, r.stdout, r.stderr)"
    env = {**os.environ, "UNIGRAD_TEST_SECRET": secret}
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", driver], env=env, cwd=repo, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("True ") and "PermissionError" in out.stdout  # it ran, and /proc was refused
    assert "UNIGRAD_TEST_SECRET" not in out.stdout and secret not in out.stdout


def test_reading_outside_the_sandbox_is_blocked():
    result = contained_run("print(open('/etc/hostname').read())")
    assert not result.ok and "PermissionError" in result.stderr


def test_the_audit_hook_cannot_be_disarmed():
    result = contained_run("f = lambda: 0\nf.__defaults__ = ()")
    assert not result.ok and "PermissionError" in result.stderr
    result = contained_run("import gc\nprint(len(gc.get_objects()))")
    assert not result.ok


def test_resource_limits_are_set_in_the_child():
    names = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_NOFILE"]
    code = f"import resource\nprint([resource.getrlimit(getattr(resource, n)) for n in {names}])"
    result = contained_run(code)
    expected = [FAST.cpu_seconds, FAST.memory_bytes, FAST.file_bytes, FAST.processes, 0, FAST.open_files]
    assert result.ok and ast.literal_eval(result.stdout) == [(v, v) for v in expected]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("python3", path="/usr/bin"), reason="needs root")
def test_as_root_the_child_drops_to_nobody_when_the_interpreter_allows():
    result = contained_run("import os\nprint(os.getuid())", python="/usr/bin/python3")
    assert result.ok and result.stdout.strip() == "65534"


def test_run_many_runs_in_parallel_and_keeps_order():
    start = time.monotonic()
    results = run_many([f"import time\ntime.sleep(1)\nprint({i})" for i in range(6)], FAST, max_workers=6)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - start < 4  # six 1 s sleeps side by side, not one after another


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
    ]
    start = time.monotonic()
    scores = task.verify(hostile + ["x*x+1", "1+x**2"], [example] * (len(hostile) + 2))
    assert scores == [0.0] * len(hostile) + [1.0, 1.0]
    assert time.monotonic() - start < 15
    assert not marker.exists() and victim.read_text() == "keep"


@pytest.mark.parametrize("code", [
    "print('hi')",
    "import sys\nsys.exit(3)",
    "import sys\nsys.exit('bye')",
    "raise ValueError('boom')",
    "import os\nprint(sorted(os.environ))",
    "import os\nprint(os.listdir('.'), os.getcwd() == os.environ['HOME'])",
    "import sys\nprint(sys.stdin.read() == '')",
    "def f(:",  # a syntax error: the same traceback
    "import atexit\natexit.register(print, 'at exit')",
    "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()",
    "raise KeyboardInterrupt",
    "print('x' * 3000000)",  # more than RLIMIT_FSIZE, written at exit
])
def test_the_fork_server_child_behaves_as_a_fresh_interpreter(code):
    forked = contained_run(code)
    fresh = contained_run(code, fork_server=False)
    assert (forked.returncode, forked.stdout, forked.timed_out) == (fresh.returncode, fresh.stdout, fresh.timed_out)
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]  # the same error line, if any


def test_the_fork_server_child_inherits_no_descriptor_and_no_blocked_module():
    code = ("import os, sys\nopen_fds = []\nfor fd in range(3, 64):\n    try:\n        os.fstat(fd)\n"
            "        open_fds.append(fd)\n    except OSError:\n        pass\n"
            "print(open_fds, 'select' in sys.modules)")
    result = contained_run(code)
    assert result.ok and result.stdout.split() == ["[]", "False"], result.stderr  # the server's pipes stay its own


def test_a_killed_fork_server_is_replaced():
    import signal as signals

    from unigrad.tasks import sandbox

    assert contained_run("print(1)").stdout == "1\n"
    key = sys.executable
    server = sandbox._servers[key]
    assert server.alive()
    os.kill(server.proc.pid, signals.SIGKILL)
    server.proc.wait()
    assert contained_run("print(2)").stdout == "2\n"
    assert sandbox._servers[key] is not server and sandbox._servers[key].alive()


def test_a_stopped_fork_server_is_killed_and_the_snippet_still_runs():
    import signal as signals

    from unigrad.tasks import sandbox

    assert contained_run("print(1)").stdout == "1\n"
    server = sandbox._servers[sys.executable]
    os.kill(server.proc.pid, signals.SIGSTOP)  # alive but deaf, as a snippet with its uid could make it
    result = contained_run("print(2)", max_seconds=FAST.timeout + 10)
    assert result.ok and result.stdout == "2\n"  # answered by a fresh interpreter after the wait
    assert server.proc.wait(timeout=5) == -signals.SIGKILL
    with pytest.raises(RuntimeError, match="not running"):
        server.submit({})
    assert contained_run("print(3)").stdout == "3\n" and sandbox._servers[sys.executable] is not server


@pytest.mark.parametrize("fork_server", [True, False])
def test_a_directory_descriptor_cannot_carry_a_write_outside(fork_server, tmp_path):
    # The open event of os.open(name, dir_fd=d) names the path relative to d, which the hook would resolve inside
    # the working directory: directories outside it cannot be opened at all.
    code = (f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
            "os.open('planted', os.O_WRONLY | os.O_CREAT, dir_fd=d)")
    result = contained_run(code.replace(repr(str(tmp_path)), "os.path.dirname(os.__file__)"), fork_server=fork_server)
    assert not result.ok and "opening the directory" in result.stderr
    result = contained_run(code, fork_server=fork_server)
    assert not result.ok and not (tmp_path / "planted").exists()


def test_the_fork_server_frames_are_out_of_the_snippets_reach():
    code = ("import sys\nf = sys._getframe()\nnames = []\nwhile f:\n    names.append(f.f_code.co_name)\n"
            "    f = f.f_back\nprint(names)")
    result = contained_run(code)
    assert result.ok and result.stdout.strip() == "['<module>', '_run_and_exit', '<module>']"  # the child's own only
