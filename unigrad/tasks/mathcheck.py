"""Mathematical equivalence of a completion and a reference answer, via math-verify, with a timeout.

math-verify bounds its sympy work with `signal.alarm`, which only works on the main thread (off
it, `parse`/`verify` raise). So: on the main thread we use math-verify's own timeouts; on any
other thread (a verifier pool, a data loader) the check runs in one long-lived helper process
(started on first use) and is abandoned -- the helper killed and later respawned -- if it takes
longer than the timeout. Either way a pathological completion costs at most ~timeout seconds and
scores 0. Inputs are capped in length for the same reason.

The reference is parsed as LaTeX (wrapped in $...$ unless it already has $ or \\boxed), falling
back to plain text; the completion is parsed as a whole, so math-verify's own extraction
(\\boxed{}, "final answer is", "Answer:", last number) applies.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

MAX_CHARS = 2000  # of a completion (its tail: the answer is at the end) and of a reference


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> list:
    from math_verify import parse

    gold = gold.strip()[:MAX_CHARS]
    wrapped = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
    return parse(wrapped, parsing_timeout=timeout) or parse(gold, parsing_timeout=timeout)


def _equal_here(gold: str, pred: str, timeout: int | None) -> bool:
    """The check itself; `timeout` must be None off the main thread."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    if not isinstance(gold, str) or not isinstance(pred, str) or not gold.strip() or not pred.strip():
        return False
    try:
        target = _parse_gold(gold, timeout)
        answer = parse(pred[-MAX_CHARS:], parsing_timeout=timeout)
        return bool(target and answer and verify(target, answer, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException, not an Exception
        log.debug("math check failed for %r vs %r", gold, pred, exc_info=True)
        return False


def looks_like_math(text: str) -> bool:
    """Whether a reference answer is mathematical: it has a digit, a LaTeX command or only
    one-letter names ("x+1"), and parses to a math object. "Paris" is not (LaTeX would read P*a*r*i*s)."""
    if not isinstance(text, str) or not text.strip():
        return False
    if not re.search(r"\d|\\", text) and re.search(r"[A-Za-z]{2}", text):
        return False
    from math_verify.errors import TimeoutException

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return any(not isinstance(x, str) for x in _parse_gold(text, timeout))
    except (Exception, TimeoutException):
        return False


def math_equal(gold: str, pred: str, timeout: int = 5) -> bool:
    """True iff `pred` (a completion) states an answer mathematically equal to `gold`.

    Never raises; at most ~`timeout` seconds per call (plus a one-off helper start off the main thread)."""
    if threading.current_thread() is threading.main_thread():
        return _equal_here(gold, pred, timeout)
    return _HELPER.call(gold, pred, timeout)


def _serve() -> None:
    """Helper-process loop over JSON lines on stdin; it is its own main thread, so alarms work."""
    for line in sys.stdin:
        gold, pred, timeout = json.loads(line)
        print(json.dumps(_equal_here(gold, pred, timeout)), flush=True)


class _Helper:
    """One helper process (started with subprocess, not multiprocessing, so the user's main
    module is never re-imported), shared by all non-main threads; calls are serialised."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._warm = False  # the first call also waits for the helper to import sympy and math-verify

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from unigrad.tasks.mathcheck import _serve; _serve()"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._proc, self._warm = None, False

    def call(self, gold: str, pred: str, timeout: int) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps([gold, pred, timeout]) + "\n")
                self._proc.stdin.flush()
                ready, _, _ = select.select([self._proc.stdout], [], [], timeout + 1 if self._warm else timeout + 60)
                line = self._proc.stdout.readline() if ready else ""
                if line:
                    self._warm = True
                    return bool(json.loads(line))
            except (OSError, ValueError):
                pass
            log.warning("math check timed out or failed off the main thread; scoring 0 and restarting the helper")
            self._stop()
            return False


_HELPER = _Helper()
