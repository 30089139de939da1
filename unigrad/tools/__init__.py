"""Tools for multi-turn episodes: what a tool is (base.py), reading calls out of a turn (calls.py), running them
(running.py), the built-ins (builtin.py: calculator, python) and user tools (user.py).

    tools = get_tools(["calculator", "my_tools.py:word_count"])
    for call in parse_tool_calls(turn, tool_style(tokenizer), tools):
        text, ok = run_tool_call(tools, call)
"""

from unigrad.tools.base import Tool, ToolCall
from unigrad.tools.builtin import BUILTIN_TOOLS, calculator, python
from unigrad.tools.calls import STYLES, parse_tool_calls, plain_tool_listing, tool_style
from unigrad.tools.running import MAX_OBSERVATION_CHARS, check_arguments, run_tool_call
from unigrad.tools.user import get_tools, load_tool

__all__ = ["BUILTIN_TOOLS", "MAX_OBSERVATION_CHARS", "STYLES", "Tool", "ToolCall", "calculator", "check_arguments",
           "get_tools", "load_tool", "parse_tool_calls", "plain_tool_listing", "python", "run_tool_call",
           "tool_style"]
