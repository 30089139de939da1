"""What a tool is (`Tool`: a function with a JSON schema of its arguments) and what a parsed call is (`ToolCall`).

A tool's `parameters` is the JSON schema of its arguments object, as chat templates and `transformers.utils.
get_json_schema` write it: {"type": "object", "properties": {name: {"type": ..., "description": ...}}, "required":
[...]}. The order of `properties` matters for the plain call style: raw text in `@name(text)` goes to the first one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # what `@name(...)` can spell


@dataclass(frozen=True)
class Tool:
    name: str
    description: str  # what it does; its first line is what the plain-style listing shows
    parameters: dict[str, Any] = field(hash=False)  # JSON schema of the arguments object
    function: Callable[..., Any]  # called with the arguments as keywords; its result is shown as str(result)
    timeout: float = 5.0  # seconds run_tool_call waits for it before answering with an error

    def __post_init__(self) -> None:
        if not TOOL_NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r}: letters, digits, '_' and '-' only, not starting with a digit")
        if self.parameters.get("type") != "object" or not isinstance(self.parameters.get("properties", {}), dict):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object' with 'properties'")
        if not callable(self.function):
            raise ValueError(f"tool {self.name!r}: function is not callable")
        if not self.timeout > 0:
            raise ValueError(f"tool {self.name!r}: timeout must be positive, got {self.timeout!r}")

    @property
    def parameter_names(self) -> list[str]:
        """The argument names, in schema order."""
        return list(self.parameters.get("properties", {}))

    def schema(self) -> dict[str, Any]:
        """The tool as `apply_chat_template(..., tools=[...])` takes it."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One call the assistant wrote. `error` says why it could not be read (malformed JSON, an unclosed
    parenthesis, ...); the call is then not run and the error is its observation."""

    name: str  # "" when not even the name could be read
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    error: str | None = None
