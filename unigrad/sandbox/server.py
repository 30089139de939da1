"""The trainer's side of a snippet server (`child.py --fork-server` or `--jail-server`): one long-lived
process that starts a child per snippet. `submit` sends it one snippet's request (a 10-digit length line, then the
JSON, so that the server's standby child can read exactly one request and nothing of the next); the returned future
gets the server's reply (see child.py) when the child has finished or been killed, or a RuntimeError when the
server died first."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from concurrent.futures import Future


class SnippetServer:
    def __init__(self, argv: list[str], pass_fds: tuple[int, ...] = (), **popen) -> None:
        self._errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors, close_fds=True, pass_fds=pass_fds,
            start_new_session=True, **popen,
        )
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._next = 0
        self.exit_reason: str | None = None
        self._done = threading.Event()
        threading.Thread(target=self._read_replies, name="sandbox-server", daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, request: dict) -> Future:
        future: Future = Future()
        with self._write_lock:  # one request after another on the pipe; replies are read meanwhile
            with self._lock:
                if not self.alive():
                    raise RuntimeError("sandbox server is not running")
                rid, self._next = self._next, self._next + 1
                self._waiting[rid] = future
            body = json.dumps({**request, "id": rid}).encode()
            try:  # a length line, then the request: the server's standby reads exactly this much
                self.proc.stdin.write(b"%010d\n" % len(body) + body)
                self.proc.stdin.flush()
            except OSError as e:  # it died since alive() (e.g. broken pipe)
                with self._lock:
                    self._waiting.pop(rid, None)
                raise RuntimeError(f"sandbox server is not running: {e}") from e
        return future

    def _read_replies(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self._lock:
                future = self._waiting.pop(reply["id"])
            future.set_result(reply)
        self.proc.wait()
        self._errors.seek(0)
        self.exit_reason = self._errors.read(4000).decode("utf-8", "replace").strip()
        self._close_files()
        with self._lock:  # the server is gone: nobody will answer the rest
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.set_exception(RuntimeError(f"sandbox server exited ({self.proc.returncode}): {self.exit_reason}"))
        self._done.set()

    def _close_files(self) -> None:
        """The server is gone: its pipes and its error file are closed here, once (not left to the collector)."""
        self._errors.close()
        self.proc.stdout.close()
        with self._write_lock:  # no submit is writing
            try:
                self.proc.stdin.close()
            except OSError:  # a broken pipe's buffered bytes cannot be flushed: the pipe closes anyway
                pass

    def wait_exit(self, timeout: float) -> str | None:
        """Wait for the server to exit; what it printed on the way out (None if it is still running)."""
        return self.exit_reason if self._done.wait(timeout) else None

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the server kills what is left and exits
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """The whole server at once: its session (without the jail) or the jail's PID namespace (its first process
        is in this session, and the namespace dies with it)."""
        import os
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.kill()
