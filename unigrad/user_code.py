"""Objects from the user's code, named "path/to/file.py:name" or "package.module:name": reward functions, tools,
multi-turn tasks. A file is imported once per path, as a module of its own (registered in `sys.modules`, so that
dataclasses and pickling find it)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


class UserFileMissing(FileNotFoundError, ValueError):
    """The file a spec names does not exist (a bad input like any other: also a ValueError)."""


def load_object(spec: str, what: str, kind: str = "function") -> Any:
    """The object `spec` ("path/to/file.py:NAME" or "package.module:NAME") names; a file is executed afresh on every
    call. Errors name `what` ("tool", "reward function", ...) and the spec, as ValueErrors (`UserFileMissing` for
    a missing file): a malformed spec, a module that fails to import, no `kind` of that name."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:{kind}' or 'path/to/file.py:{kind}'")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UserFileMissing(f"{what} {spec!r}: no such file {path}")
        resolved = path.resolve()
        name = "unigrad_user_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, resolved)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"{what} {spec!r}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ValueError(f"{what} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import module {where!r}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"{what} {spec!r}: {where} has no {kind} {attr!r}")
    return getattr(module, attr)
