"""OpenAI chat messages as transformers chat templates take them, rendered to token ids.

OpenAI's shape differs from the templates' in three places: content may be a list of parts (only text parts are
taken, joined); an assistant message's `tool_calls` carry `arguments` as a JSON string (hf templates take the
object); a "tool" message names its call by `tool_call_id` (templates often want the tool's `name`, filled in from
the call it answers).
"""

from __future__ import annotations

import json

from unigrad.rollout.episodes import encode_messages
from unigrad.serve.errors import bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")


def text_content(content, where: str) -> str:
    """A message's content as one string: a string, None (empty), or a list of text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}: content must be a string or a list of text parts", where)


def template_tool_call(call, where: str) -> dict:
    """An OpenAI tool call ({"id", "type", "function": {"name", "arguments": JSON string}}) as hf templates take it
    (arguments as an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f'{where}: a tool call is {{"type": "function", "function": {{"name", "arguments"}}}}',
                          where)
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise bad_request(f"{where}: arguments are not JSON ({err.msg})", where) from None
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """`messages` (OpenAI shape) as chat templates take them (module docstring)."""
    out, names_by_call = [], {}
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        converted = {"role": "system" if role == "developer" else role,
                     "content": text_content(message.get("content"), f"{where}.content")}
        if role == "assistant" and message.get("tool_calls"):
            converted["tool_calls"] = [template_tool_call(c, f"{where}.tool_calls.{j}")
                                       for j, c in enumerate(message["tool_calls"])]
            names_by_call.update({c.get("id"): c["function"]["name"] for c in converted["tool_calls"]})
        if role == "tool":
            call_id = message.get("tool_call_id")
            converted["tool_call_id"] = call_id
            converted["name"] = message.get("name") or names_by_call.get(call_id, "")
        out.append(converted)
    return out


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The token ids the tokenizer's chat template renders for `messages` (OpenAI shape) and `tools`, with the
    assistant's generation prompt. A template that refuses them (e.g. a role it has no place for) is a 400."""
    converted = template_messages(messages)
    try:
        return encode_messages(tokenizer, converted, tools)
    except Exception as err:  # noqa: BLE001 - jinja's TemplateError and whatever a template raises
        raise bad_request(f"the model's chat template cannot render these messages: {err}", "messages") from None
