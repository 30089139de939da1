"""How a run stops early: the exceptions `train` raises for a stop it decided (an alarm) and for a signal, and the
handler that turns the first SIGINT or SIGTERM into a stop after the current step."""

from __future__ import annotations

import sys
from typing import Any


class RunStopped(RuntimeError):
    """The run stopped itself (an alarm in monitors.stop_on, or too many non-finite steps) after a checkpoint."""


class RunInterrupted(RuntimeError):
    """SIGINT or SIGTERM: the current step was finished and checkpointed; `signal` is the signal's number."""

    def __init__(self, message: str, signal: int) -> None:
        super().__init__(message)
        self.signal = signal


class _Interrupts:
    """While a run trains: the first SIGINT or SIGTERM asks it to stop after the current step (with a checkpoint);
    a second one ends the process at once (SIGINT: KeyboardInterrupt; SIGTERM: the default action). Only in the main
    thread, where Python delivers signals."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.received is not None:  # the second one: no more waiting
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then a checkpoint (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
