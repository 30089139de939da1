"""Running one parsed tool call: the observation text the model sees next, and whether the call worked.

Every failure is an observation, never an exception, so that a model under training learns from it:

    error: unknown tool 'calc'; tools: calculator
    error: could not read the call: malformed JSON arguments: Expecting value at character 15
    error: calculator got unexpected argument 'x'; it takes: expression
    error: calculator is missing argument 'expression'
    error: argument 'expression' of calculator must be string, got integer
    error: division by zero                                  (the tool raised ValueError: its message)
    error: lookup raised KeyError: 'x'                       (any other exception)
    error: slow timed out after 5 s
    error: the result of f is not text: ValueError: ...

A tool refuses an input by raising ValueError with a short message (the built-ins do). A tool runs in a daemon thread
and is waited for `Tool.timeout` seconds; one that runs past it is left running in the background (a thread cannot be
stopped), so tools that may run long must bound themselves (the python tool's sandbox kills its snippet). Results
and errors longer than `MAX_OBSERVATION_CHARS` keep their first `MAX_OBSERVATION_CHARS` characters followed by
"... [truncated]".
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from unigrad.tools.base import Tool, ToolCall

MAX_OBSERVATION_CHARS = 400
TRUNCATED = "... [truncated]"
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool, "array": (list, tuple), "object": dict,
    "null": type(None),
}


def run_tool_call(tools: Mapping[str, Tool], call: ToolCall) -> tuple[str, bool]:
    """(observation text, ok) for `call` against the tool table `tools`. Never raises."""
    try:
        text, ok = _run(tools, call)
    except Exception as e:  # a bug here must not end an episode either
        text, ok = f"error: {type(e).__name__}: {e}", False
    return truncate(text), ok


def truncate(text: str, limit: int = MAX_OBSERVATION_CHARS) -> str:
    """`text` cut to its first `limit` characters, marked, if it is longer."""
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def _run(tools: Mapping[str, Tool], call: ToolCall) -> tuple[str, bool]:
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(tools) or "none"
        name = f"unknown tool {call.name!r}" if call.name else f"could not read the call: {call.error}"
        return f"error: {name}; tools: {known}", False
    if call.error is not None:
        return f"error: could not read the call: {call.error}", False
    problem = check_arguments(tool, call.arguments)
    if problem is not None:
        return f"error: {problem}", False
    return _call_with_timeout(tool, call.arguments)


def check_arguments(tool: Tool, arguments: Mapping[str, Any]) -> str | None:
    """What is wrong with `arguments` for `tool` (unexpected, missing, of the wrong JSON type or not one of an
    enum), or None. Only the top level is checked, not the items of arrays or objects."""
    properties = tool.parameters.get("properties", {})
    unexpected = [name for name in arguments if name not in properties]
    if unexpected:
        takes = ", ".join(properties) or "no arguments"
        listed = ", ".join(repr(name) for name in unexpected)
        return f"{tool.name} got unexpected argument{'s' if len(unexpected) > 1 else ''} {listed}; it takes: {takes}"
    missing = [name for name in tool.parameters.get("required", []) if name not in arguments]
    if missing:
        listed = ", ".join(repr(name) for name in missing)
        return f"{tool.name} is missing argument{'s' if len(missing) > 1 else ''} {listed}"
    for name, value in arguments.items():
        schema = properties[name] if isinstance(properties[name], dict) else {}
        expected = _type_mismatch(value, schema)
        if expected is not None:
            return f"argument {name!r} of {tool.name} must be {expected}, got {_json_type(value)}"
        if "enum" in schema and value not in schema["enum"]:
            return f"argument {name!r} of {tool.name} must be one of {', '.join(map(repr, schema['enum']))}"
    return None


def _type_mismatch(value: Any, schema: dict[str, Any]) -> str | None:
    """The expected JSON type(s), as text, if `value` has none of them; None if it fits (or the type is unknown)."""
    kinds = schema.get("type")
    if kinds is None or (value is None and schema.get("nullable")):
        return None
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        python_type = _JSON_TYPES.get(kind)
        if python_type is None:
            return None  # a type this check does not know: let the tool judge
        if isinstance(value, bool) and kind in ("integer", "number"):
            continue  # JSON true is not a number
        if isinstance(value, python_type):
            return None
    return " or ".join(kinds)


def _json_type(value: Any) -> str:
    for kind in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if isinstance(value, _JSON_TYPES[kind]):
            return kind
    return type(value).__name__


def _call_with_timeout(tool: Tool, arguments: Mapping[str, Any]) -> tuple[str, bool]:
    """Call the tool in a daemon thread (the result turned into text there too) and wait `tool.timeout` seconds."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            result = tool.function(**arguments)
        except BaseException as e:  # SystemExit from a user tool included
            outcome["raised"] = e
            return
        try:
            outcome["text"] = result if isinstance(result, str) else str(result)
        except BaseException as e:
            outcome["unprintable"] = e

    worker = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout)
    if worker.is_alive():
        return f"error: {tool.name} timed out after {tool.timeout:g} s", False
    if "raised" in outcome:
        e = outcome["raised"]
        if isinstance(e, ValueError) and str(e):  # the tool's own refusal: its message is the observation
            return f"error: {e}", False
        return f"error: {tool.name} raised {type(e).__name__}: {e}", False
    if "unprintable" in outcome:
        e = outcome["unprintable"]
        return f"error: the result of {tool.name} is not text: {type(e).__name__}: {e}", False
    return outcome["text"], True
