"""Running untrusted Python (model-written code) in a jail the kernel enforces: the code task's and the `python`
tool's sandbox.

`run(code)` runs one snippet and returns a `SandboxResult`; `run_many` runs several at once; `configure` sets the
jail for the process (`sandbox.jail` in the run config); `prepare` and `check` verify, before training, that the jail
works here (`unigrad sandbox-check` runs `check` and the attacks of `attacks.py`). The modules:

- runner.py: `run`, `run_many`, the limits and the choice of jail (see its docstring);
- jail.py: the bubblewrap command line and the seccomp filters;
- server.py: the trainer's side of a long-lived snippet server;
- child.py: the server and the snippet's process (standard library only: it runs under `python -I -S`);
- attacks.py: hostile snippets each layer must contain, for `unigrad sandbox-check` and the tests.

docs/sandbox.md has the threat model and what each layer stops. Nothing here imports the rest of unigrad.
"""

from unigrad.sandbox.runner import (
    DEFAULT_LIMITS,
    JAILS,
    JailUnavailable,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    check,
    check_setting,
    configure,
    prepare,
    run,
    run_many,
)

__all__ = ["DEFAULT_LIMITS", "JAILS", "JailUnavailable", "SandboxError", "SandboxLimits", "SandboxResult", "check",
           "check_setting", "configure", "prepare", "run", "run_many"]
