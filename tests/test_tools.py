"""Tools for multi-turn episodes: reading calls in both styles, the built-in tools, running calls (every failure an
observation), user tools from a file, and a tool-use episode by hand."""

from __future__ import annotations

import time

import pytest

from unigrad.environments.base import Environment, MultiTurnTask
from unigrad.environments.tool_use import ToolUseEnvironment, ToolUseTask, countdown_with_calculator
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.tasks.base import Example
from unigrad.tasks.countdown import CountdownTask
from unigrad.tools import (
    BUILTIN_TOOLS,
    Tool,
    ToolCall,
    calculator,
    get_tools,
    load_tool,
    parse_tool_calls,
    plain_tool_listing,
    run_tool_call,
    tool_style,
)

TOOLS = {"calculator": BUILTIN_TOOLS["calculator"]}


def make_tool(function, name: str = "f", timeout: float = 5.0, **properties) -> Tool:
    props = properties or {"x": {"type": "string"}}
    return Tool(name, "a test tool", {"type": "object", "properties": props, "required": list(props)}, function,
                timeout)


# ------------------------------------------------------------------------------------------------------- parsing
def test_plain_calls_raw_nested_json_and_several():
    text = 'first @calculator((3+4)*(2-(1))) then @calculator({"expression": "3*7"}) and @calculator( 1/3 ).'
    assert parse_tool_calls(text, "plain", TOOLS) == [
        ToolCall("calculator", {"expression": "(3+4)*(2-(1))"}),
        ToolCall("calculator", {"expression": "3*7"}),
        ToolCall("calculator", {"expression": "1/3"}),
    ]
    assert parse_tool_calls("Answer: 3*7+9", "plain", TOOLS) == []
    assert parse_tool_calls("mail me at a@calculator(3)", "plain", TOOLS) == []  # not after a word character


def test_plain_calls_quotes_unknown_tools_and_errors():
    python = {"python": BUILTIN_TOOLS["python"]}
    assert parse_tool_calls('@python(print(")"))', "plain", python) == [ToolCall("python", {"code": 'print(")")'})]
    # an apostrophe in prose does not swallow the call's closing parenthesis
    assert parse_tool_calls("@calculator(2*(3+4)) isn't it", "plain", TOOLS)[0].arguments == {"expression": "2*(3+4)"}
    [bad_json] = parse_tool_calls('@calculator({"expression": 3*7})', "plain", TOOLS)
    assert bad_json.name == "calculator" and "malformed JSON" in bad_json.error
    [unclosed] = parse_tool_calls("@calculator(3*(7+9)", "plain", TOOLS)
    assert unclosed.error == "unclosed '(' in @calculator(...)"
    [unknown] = parse_tool_calls("@calc(3*7)", "plain", TOOLS)
    assert unknown.name == "calc" and unknown.error is not None
    ints = {"rep": make_tool(lambda n: "x" * n, "rep", n={"type": "integer"})}
    assert parse_tool_calls("@rep(3)", "plain", ints)[0].arguments == {"n": 3}  # raw text parsed for a non-string



def test_plain_calls_honour_backslash_escapes_inside_quoted_arguments():
    """An escaped quote does not end its string, so a ")" after it is still inside the string, in raw text and in
    JSON arguments alike; the call runs to the parenthesis that really closes it."""
    python = {"python": BUILTIN_TOOLS["python"]}
    raw = r'@python(print("say \"hi:)\" now")) then @python(1)'
    assert parse_tool_calls(raw, "plain", python) == [ToolCall("python", {"code": r'print("say \"hi:)\" now")'}),
                                                      ToolCall("python", {"code": "1"})]
    assert parse_tool_calls(r"@python(print('it\'s :)')) ok", "plain", python) == [
        ToolCall("python", {"code": r"print('it\'s :)')"})]
    as_json = r'@python({"code": "print(\")\")"}) done'
    assert parse_tool_calls(as_json, "plain", python) == [ToolCall("python", {"code": 'print(")")'})]

def test_hf_calls_several_string_arguments_and_malformed():
    text = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*7"}}\n</tool_call>\n'
            '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1/3\\"}"}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>'
            '<tool_call>["calculator"]</tool_call>'
            '<tool_call>{"name": "python", "parameters": {"code": "print(1)"}}')  # unclosed at the end: still read
    calls = parse_tool_calls(text, "hf")
    assert calls[:2] == [ToolCall("calculator", {"expression": "3*7"}), ToolCall("calculator", {"expression": "1/3"})]
    assert calls[2].name == "" and calls[2].error.startswith("malformed JSON in <tool_call>")
    assert calls[3].error is not None
    assert calls[4] == ToolCall("python", {"code": "print(1)"})
    assert parse_tool_calls("The answer is 30.", "hf") == []
    with pytest.raises(ValueError, match="tool style"):
        parse_tool_calls("x", "json")


def test_tool_style_and_listing():
    tok = build_char_tokenizer()
    assert tool_style(tok) == "plain"
    tok.chat_template = ("{% for t in tools %}{{ t.function.name }}{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tool_style(tok) == "hf"
    listing = plain_tool_listing(get_tools(["calculator", "python"]))
    assert listing.startswith("tools: @calculator(expression) ") and "; @python(code) " in listing
    assert listing.isascii() and "\n" not in listing and len(listing) < 150


# ---------------------------------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expression, value", [
    ("3*7+9", "30"), ("7/2", "3.5"), ("2/6", "1/3"), ("0.1+0.2", "0.3"), ("-(1/8)", "-0.125"),
    ("(2+3)*(4-1)/6", "2.5"), (" 12 - 20 ", "-8"), ("10/4*2", "5"),
])
def test_calculator_is_exact(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("1/(3-3)", "division by zero"), ("10**10**10", "not \\*\\*"), ("__import__('os')", "function calls"),
    ("(1).__class__", "attributes"), ("x+1", "names"), ("1e300", "integer and decimal"), ("3*7=21", "cannot read"),
    ("1+" * 101 + "1", "too long"), ("", "empty"),
])
def test_calculator_refuses(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


# ------------------------------------------------------------------------------------------------ run_tool_call
def test_run_tool_call_results_and_argument_errors():
    assert run_tool_call(TOOLS, ToolCall("calculator", {"expression": "3*7+9"})) == ("30", True)
    cases = [
        (ToolCall("calc", {"expression": "1"}), "error: unknown tool 'calc'; tools: calculator"),
        (ToolCall("calculator", error="unclosed '(' in @calculator(...)"),
         "error: could not read the call: unclosed '(' in @calculator(...)"),
        (ToolCall("", error="malformed JSON in <tool_call>: x"),
         "error: could not read the call: malformed JSON in <tool_call>: x; tools: calculator"),
        (ToolCall("calculator", {}), "error: calculator is missing argument 'expression'"),
        (ToolCall("calculator", {"expression": "1", "x": 2}),
         "error: calculator got unexpected argument 'x'; it takes: expression"),
        (ToolCall("calculator", {"expression": 21}),
         "error: argument 'expression' of calculator must be string, got integer"),
        (ToolCall("calculator", {"expression": "1/0"}), "error: division by zero"),
    ]
    for call, expected in cases:
        assert run_tool_call(TOOLS, call) == (expected, False), call


def test_run_tool_call_tool_failures_never_raise():
    def boom(x: str) -> str:
        raise KeyError(x)

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    tools = {"boom": make_tool(boom, "boom"), "odd": make_tool(lambda x: Unprintable(), "odd"),
             "long": make_tool(lambda x: x * 1000, "long"), "num": make_tool(lambda x: 42, "num"),
             "flag": make_tool(lambda b: "ok", "flag", b={"type": "integer"})}
    assert run_tool_call(tools, ToolCall("boom", {"x": "k"})) == ("error: boom raised KeyError: 'k'", False)
    text, ok = run_tool_call(tools, ToolCall("odd", {"x": ""}))
    assert not ok and text == "error: the result of odd is not text: RuntimeError: no text"
    text, ok = run_tool_call(tools, ToolCall("long", {"x": "ab"}))
    assert ok and text == "ab" * 200 + "... [truncated]"
    assert run_tool_call(tools, ToolCall("num", {"x": ""})) == ("42", True)
    assert run_tool_call(tools, ToolCall("flag", {"b": True}))[1] is False  # JSON true is not an integer


def test_run_tool_call_stops_waiting_at_the_timeout():
    slow = {"slow": make_tool(lambda x: time.sleep(3) or "late", "slow", timeout=0.2)}
    start = time.monotonic()
    text, ok = run_tool_call(slow, ToolCall("slow", {"x": ""}))
    assert time.monotonic() - start < 1.5
    assert (text, ok) == ("error: slow timed out after 0.2 s", False)


# --------------------------------------------------------------------------------------------------- user tools
USER_TOOLS = '''
def word_count(text: str, minimum: int = 1) -> int:
    """Counts the words of a text.

    Args:
        text: the text whose words are counted
        minimum: the shortest word length that counts
    """
    return sum(len(word) >= minimum for word in text.split())


def undocumented(text: str) -> int:
    """Counts something."""
    return 0


NOT_A_FUNCTION = 3
'''


def test_user_tool_from_a_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(USER_TOOLS)
    tool = load_tool(f"{path}:word_count")
    assert tool.name == "word_count" and tool.description == "Counts the words of a text."
    assert tool.parameters == {"type": "object", "required": ["text"], "properties": {
        "text": {"type": "string", "description": "the text whose words are counted"},
        "minimum": {"type": "integer", "description": "the shortest word length that counts"}}}
    assert tool.schema()["function"]["name"] == "word_count"
    tools = get_tools(["calculator", f"{path}:word_count"])
    assert run_tool_call(tools, ToolCall("word_count", {"text": "a bb ccc", "minimum": 2})) == ("2", True)
    assert parse_tool_calls("@word_count(a b c)", "plain", tools) == [ToolCall("word_count", {"text": "a b c"})]
    with pytest.raises(ValueError, match=r"(?s)no description for the argument 'text'.*Args:"):
        load_tool(f"{path}:undocumented")
    for spec, message in [(f"{path}:missing", "has no function 'missing'"), (f"{path}:NOT_A_FUNCTION", "not callable"),
                          (f"{tmp_path}/absent.py:f", "no such file"), ("no_such_module_xyz:f", "cannot import")]:
        with pytest.raises(ValueError, match=message) as raised:
            load_tool(spec)
        assert spec in str(raised.value)
    with pytest.raises(ValueError, match="two tools are named 'word_count'"):
        get_tools([f"{path}:word_count", f"{path}:word_count"])
    with pytest.raises(ValueError, match="unknown tool 'calc'"):
        get_tools(["calc"])


# ------------------------------------------------------------------------------------------------------- python
def test_python_tool_runs_in_the_sandbox():
    from unigrad import sandbox

    try:
        sandbox.check()
    except Exception as e:  # JailUnavailable, SandboxError: no jail on this machine
        pytest.skip(f"the sandbox cannot run here: {e}")
    tools = get_tools(["python"])
    assert run_tool_call(tools, ToolCall("python", {"code": "print(6*7)"})) == ("42", True)
    text, ok = run_tool_call(tools, ToolCall("python", {"code": "print('before')\n1/0"}))
    assert not ok and text == "error: before\nexit status 1: ZeroDivisionError: division by zero"
    text, ok = run_tool_call(tools, ToolCall("python", {"code": "open('/etc/passwd').read()"}))
    assert not ok and text.startswith("error: ") and "exit status" in text


# ------------------------------------------------------------------------------------------------------ episodes
def test_tool_use_episode_by_hand():
    task = countdown_with_calculator()
    assert isinstance(task, MultiTurnTask) and task.multi_turn and task.name == "countdown_calc"
    assert task.tools == ("calculator",) and task.max_turns == 4 and not task.runs_code
    assert [s["function"]["name"] for s in task.tool_schemas()] == ["calculator"]
    example = task.examples("train", 1)[0]
    assert example.task == "countdown_calc"
    env = task.environment("plain")
    assert isinstance(env, Environment)
    messages = env.reset(example)
    assert messages == [{"role": "system", "content": plain_tool_listing(task.tool_table)},
                        {"role": "user", "content": example.prompt}]
    a, b = example.demonstration, "1+1"
    step = env.step(f"try @calculator({a}) and @calc({b})")
    assert not step.done and step.reward is None and (step.tool_calls, step.tool_errors) == (2, 1)
    unknown = "error: unknown tool 'calc'; tools: calculator"
    assert step.observation == [{"role": "tool", "name": "calculator", "content": example.answer},
                                {"role": "tool", "name": "calc", "content": unknown}]
    final = env.step(f"Answer: {example.demonstration}")
    assert final.done and final.reward == 1.0 and final.tool_calls == 0
    with pytest.raises(RuntimeError):
        env.step("again")


def test_episode_ends_with_zero_reward_when_the_last_turn_calls_a_tool():
    example = Example("use 3 7 9 to make 30", "30", "3*7+9", "countdown", {"numbers": [3, 7, 9], "target": 30})
    env = ToolUseEnvironment(CountdownTask(), get_tools(["calculator"]), style="hf", max_turns=2)
    assert env.reset(example) == [{"role": "user", "content": example.prompt}]  # hf: tools go through the template
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "3*7+9"}}</tool_call>'
    first = env.step(call)
    assert first.observation == [{"role": "tool", "name": "calculator", "content": "30"}] and not first.done
    last = env.step(call + " Answer: 3*7+9")  # a turn with calls is not an answer
    assert last.done and last.reward == 0.0 and last.tool_calls == 1 and last.observation == []
    env.reset(example)
    assert env.step("3*7+8").reward == 0.0  # a wrong final answer
    wrapped = ToolUseTask(CountdownTask(), ["calculator", "python"], max_turns=3)
    assert wrapped.name == "countdown+tools" and wrapped.runs_code and wrapped.environment("hf").max_turns == 3
