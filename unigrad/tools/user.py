"""Tools from the user's code, and the tool table of a task: built-in names and user specs.

A user tool is a plain function with type hints and a Google-style docstring, named "path/to/file.py:function" or
"package.module:function":

    def word_count(text: str) -> int:
        \"\"\"Counts the words in a text.

        Args:
            text: the text whose words are counted
        \"\"\"
        return len(text.split())

Its name is the function's name, its description the docstring's text before "Args:", its JSON schema built from the
signature and the docstring by `transformers.utils.get_json_schema` (every argument needs a type hint and a line
under "Args:"). It is called with the arguments as keywords; it refuses an input by raising ValueError (see
running.py) and gets `Tool`'s default timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from unigrad.tools.base import Tool
from unigrad.tools.builtin import BUILTIN_TOOLS
from unigrad.user_code import load_object

SPEC_FORMS = ("path/to/file.py:function", "package.module:function")


def load_tool(spec: str) -> Tool:
    """The tool made from the function named by `spec` ("path/to/file.py:function" or "package.module:function");
    ValueError naming the spec if the file, module or function is missing or cannot make a tool."""
    function = _load_function(spec)
    from transformers.utils import get_json_schema  # in transformers since 4.42

    try:
        schema = get_json_schema(function)["function"]
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        raise ValueError(
            f"tool {spec!r}: {e}. Give every argument a type hint and describe each one in the docstring, e.g.\n"
            f'    """What the tool does.\n\n    Args:\n        x: what x is\n    """') from None
    parameters = schema.get("parameters") or {"type": "object", "properties": {}}
    return Tool(name=schema["name"], description=schema.get("description", ""), parameters=parameters,
                function=function)


def _load_function(spec: str) -> Callable[..., Any]:
    function = load_object(spec, "tool")
    if not callable(function):
        raise ValueError(f"tool {spec!r}: {spec.rpartition(':')[0]}:{spec.rpartition(':')[2]} is not callable")
    return function


def get_tools(specs: Iterable[str | Tool]) -> dict[str, Tool]:
    """The tool table for `specs`: built-in names ("calculator", "python"), user specs (`load_tool`) or `Tool`s,
    by name, in order. Two tools of the same name are refused."""
    tools: dict[str, Tool] = {}
    for spec in specs:
        if isinstance(spec, Tool):
            tool = spec
        elif spec in BUILTIN_TOOLS:
            tool = BUILTIN_TOOLS[spec]
        elif isinstance(spec, str) and ":" in spec:
            tool = load_tool(spec)
        else:
            raise ValueError(f"unknown tool {spec!r}: built-in tools are {', '.join(BUILTIN_TOOLS)}; "
                             f"user tools are named {' or '.join(SPEC_FORMS)}")
        if tool.name in tools:
            raise ValueError(f"two tools are named {tool.name!r} (from {spec!r}); tool names must be distinct")
        tools[tool.name] = tool
    return tools
