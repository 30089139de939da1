"""Reading tool calls out of an assistant turn, in the two styles, and choosing the style for a tokenizer.

"hf": the convention of transformers chat templates that take `tools=` (Qwen2.5, Hermes): one or more blocks

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "3*7"}}
    </tool_call>

("arguments" may also be spelled "parameters", or be a JSON string of the object; a final block left unclosed is
still read). The tools reach the prompt through the template (`Tool.schema`).

"plain": for templates without tools (the tiny model's: printable ASCII only). A call is `@name(ARGS)`, one call per
`@name(`; ARGS runs to the matching ")" (parentheses nest; quoted strings are skipped while matching). ARGS that
starts with "{" is a JSON object of the arguments (`@calc({"expression": "3*7"})`); anything else is raw text for the
tool's first parameter (`@calculator(3*7+9)`, stripped; parsed as JSON when that parameter is not a string, e.g.
`@repeat(3)` for an integer). An `@` right after a letter, digit or "@" does not start a call (e-mail addresses).
The tools are described in a system message (`plain_tool_listing`).

A call that cannot be read is still returned, with `error` set: the model sees why (never an exception).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from unigrad.tools.base import Tool, ToolCall

STYLES = ("hf", "plain")
_HF_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_PLAIN_CALL = re.compile(r"(?<![A-Za-z0-9_@])@([A-Za-z_][A-Za-z0-9_-]*)\(")
_PROBE = "unigrad_probe_tool"


def parse_tool_calls(text: str, style: str, tools: Mapping[str, Tool] | None = None) -> list[ToolCall]:
    """The tool calls in `text`, in order (empty: the turn calls no tool). `tools` is needed by the plain style to
    map raw-text arguments to the tool's first parameter."""
    if style == "hf":
        return [_hf_call(body) for body in _HF_CALL.findall(text)]
    if style == "plain":
        return _plain_calls(text, tools or {})
    raise ValueError(f"tool style must be one of {', '.join(STYLES)}, got {style!r}")


def _hf_call(body: str) -> ToolCall:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", error=f"malformed JSON in <tool_call>: {e.msg} at character {e.pos}")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall("", error='a tool call is a JSON object {"name": ..., "arguments": {...}}')
    name = value["name"]
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments object as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name, error=f"malformed JSON arguments: {e.msg} at character {e.pos}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCall(name, error="arguments must be a JSON object of argument names and values")
    return ToolCall(name, arguments)


def _plain_calls(text: str, tools: Mapping[str, Tool]) -> list[ToolCall]:
    calls: list[ToolCall] = []
    pos = 0
    while (match := _PLAIN_CALL.search(text, pos)) is not None:
        name, start = match.group(1), match.end()
        end = _closing_paren(text, start, quotes=True)
        if end is None:
            end = _closing_paren(text, start, quotes=False)  # an unbalanced quote (an apostrophe in prose)
        if end is None:
            calls.append(ToolCall(name, error=f"unclosed '(' in @{name}(...)"))
            break
        calls.append(_plain_call(name, text[start:end], tools))
        pos = end + 1
    return calls


def _closing_paren(text: str, start: int, quotes: bool) -> int | None:
    """Index of the ")" that closes the "(" just before `start`; with `quotes`, parentheses inside '...' and "..."
    (backslash escapes honoured) do not count."""
    depth, quote, i = 1, None, start
    while i < len(text):
        char = text[i]
        if quote is not None:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif quotes and char in "\"'":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _plain_call(name: str, args: str, tools: Mapping[str, Tool]) -> ToolCall:
    raw = args.strip()
    if raw.startswith("{"):
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError as e:
            return ToolCall(name, error=f"malformed JSON arguments: {e.msg} at character {e.pos}")
        return ToolCall(name, arguments)  # a JSON text that starts with "{" is an object
    tool = tools.get(name)
    if tool is None:
        return ToolCall(name, error=f"unknown tool {name!r}")
    if not raw:
        return ToolCall(name, {})
    params = tool.parameter_names
    if not params:
        return ToolCall(name, error=f"{name} takes no arguments")
    return ToolCall(name, {params[0]: _raw_value(raw, tool.parameters["properties"][params[0]])})


def _raw_value(raw: str, schema: Any) -> Any:
    """Raw text as the value of a parameter: the text itself for a string (or untyped) parameter, else its JSON
    value when it has one (`3` for an integer); run_tool_call reports a value of the wrong type."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is None or "string" in kinds:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def tool_style(tokenizer: Any) -> str:
    """How tool calls are written for `tokenizer`: "hf" if its chat template renders a `tools=` list, else "plain"."""
    probe = {"type": "function", "function": {
        "name": _PROBE, "description": "a probe",
        "parameters": {"type": "object", "properties": {"x": {"type": "string", "description": "x"}},
                       "required": ["x"]}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[probe], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # no chat template, or one that refuses tools
        return "plain"
    return "hf" if isinstance(text, str) and _PROBE in text else "plain"


def plain_tool_listing(tools: Mapping[str, Tool]) -> str:
    """The system message that describes `tools` in the plain style: one short ASCII line, e.g.
    "tools: @calculator(expression) evaluates + - * / ( ) on numbers exactly". Empty for no tools."""
    if not tools:
        return ""
    entries = []
    for tool in tools.values():
        description = tool.description.strip().splitlines()[0].strip() if tool.description.strip() else ""
        entries.append(f"@{tool.name}({', '.join(tool.parameter_names)}) {description}".rstrip())
    return ("tools: " + "; ".join(entries)).encode("ascii", "replace").decode("ascii")
