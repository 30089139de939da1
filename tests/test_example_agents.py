"""The example agents of examples/agents/ played as a run plays them (unigrad.agents.runner.run_agent_episodes, the
real `openai` client against the in-process endpoint): draft_revise on the embedded tiny model; countdown_tools on a
small char Llama taught to call the calculator under a tools template (fast, deterministic) and on unigrad-chat."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from step_helpers import small_char_llama, teach_texts

from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.tasks import get_task

AGENTS = Path(__file__).resolve().parent.parent / "examples" / "agents"
TOOLS = AGENTS / "countdown_tools.py"
DRAFT = AGENTS / "draft_revise.py"


def load_example(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def play(model_name: str, tokenizer, engine, spec: str, prompts: int = 2, n: int = 2, **sampling):
    """(task, examples, rows, episodes) of `prompts` x `n` episodes of the agent task `spec`."""
    task = get_task(spec)
    examples = task.examples("train", prompts, seed=5)
    fallback = [tokenizer(e.prompt)["input_ids"] for e in examples]
    batch = AgentBatch([task] * prompts, examples, fallback, n, tuple(range(40, 40 + prompts)))
    params = SamplingParams(**{"temperature": 1.0, "max_new_tokens": 16, **sampling})
    rows, episodes = run_agent_episodes(engine, tokenizer, batch, params, AgentSettings(model_name, 120.0))
    return task, examples, rows, episodes


def observations(tokenizer, rows, r: int) -> str:
    return tokenizer.decode(rows.completion_ids[r][rows.observation_mask[r]].tolist())


# --- the safe evaluator -------------------------------------------------------------------------------------------

def test_the_calculator_computes_arithmetic_exactly_and_refuses_everything_else():
    tools = load_example(TOOLS)
    computed = ("3*7+9", "7/2", "1/3", "(1+2)*-3", "0.1+0.2")
    assert [tools.run_calculator(json.dumps({"expression": e})) for e in computed] == ["30", "3.5", "1/3", "-9", "0.3"]
    refused = ["2**10", "__import__('os').system('true')", "x+1", "(1).__class__", "'a'*3", "[1,2]", "1 if 2 else 3",
               "1/0", "9" * 300, "True+1", "1e999", "lambda: 1"]
    for expression in refused:
        with pytest.raises(ValueError):
            tools.arithmetic(expression)
        assert tools.run_calculator(json.dumps({"expression": expression})).startswith("error: ")
    assert tools.run_calculator("not json").startswith("error: ")
    assert tools.run_calculator(json.dumps({"expr": "1+1"})).startswith("error: ")


# --- draft_revise on unigrad-tiny ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer("unigrad-tiny")
    return tok, TransformersEngine(model.eval(), tok.pad_token_id, tok.eos_token_id)


def test_draft_revise_makes_two_calls_with_the_feedback_between_them(tiny):
    tok, engine = tiny
    feedback = load_example(DRAFT).FEEDBACK
    _, _, rows, episodes = play("unigrad-tiny", tok, engine, f"agent:{DRAFT}:solve@arithmetic")
    assert episodes.failures == {} and torch.isfinite(episodes.rewards).all()
    assert episodes.turns.tolist() == [2, 2, 2, 2] and episodes.splits == 0 and rows.num_sequences == 4
    for r in range(4):
        assert feedback in observations(tok, rows, r)  # the feedback sits between draft and revision, untrained
        assert not (rows.completion_mask[r] & rows.observation_mask[r]).any()


# --- countdown_tools on a char model taught to call the calculator ------------------------------------------------

TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}{% elif m['role'] == 'tool' %}<|user|>result {{ m['name'] }}: {{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CALL = {"name": "calculator", "arguments": {"expression": "2+3*4"}}


def calculator_caller(tok, prompts: list[str], steps: int = 120):
    """A small char Llama taught (Adam) to answer each of `prompts` with a calculator call on "2+3*4" and the
    calculator's result with "2+3*4"."""
    tools = [load_example(TOOLS).CALCULATOR]
    call_message = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]}
    texts = []
    for prompt in prompts:
        ask = [{"role": "user", "content": prompt}]
        texts.append(tok.apply_chat_template(ask, tools=tools, tokenize=False, add_generation_prompt=True)
                     + f"<tool_call>{json.dumps(CALL)}</tool_call>")
        follow = [*ask, call_message, {"role": "tool", "name": "calculator", "content": "14"}]
        texts.append(tok.apply_chat_template(follow, tools=tools, tokenize=False, add_generation_prompt=True) + "2+3*4")
    return teach_texts(small_char_llama(tok, seed=2), tok, [t + tok.eos_token for t in texts], steps)


def test_countdown_tools_calls_the_calculator_and_reads_its_result():
    tok = build_char_tokenizer(model_max_length=256)
    tok.chat_template = TOOLS_TEMPLATE
    spec = f"agent:{TOOLS}:solve@countdown"
    prompts = [e.prompt for e in get_task(spec).examples("train", 2, seed=5)]
    engine = TransformersEngine(calculator_caller(tok, prompts), tok.pad_token_id, tok.eos_token_id)
    _, examples, rows, episodes = play("tool-model", tok, engine, spec, temperature=0.0, max_new_tokens=120)
    assert episodes.failures == {}, episodes.failures
    assert episodes.turns.tolist() == [2, 2, 2, 2] and episodes.tool_calls.tolist() == [1, 1, 1, 1]
    assert episodes.splits == 0 and rows.num_sequences == 4
    for r in range(4):
        assert observations(tok, rows, r).startswith("<|user|>result calculator: 14")  # the tool message, untrained
        assert "<tool_call>" in tok.decode(rows.completion_ids[r][rows.completion_mask[r]].tolist())
    expected = [float(get_task("countdown").verify(["2+3*4"], [e])[0]) for e in examples]
    assert episodes.rewards.tolist() == [expected[r // 2] for r in range(4)]


@pytest.mark.slow
def test_countdown_tools_on_unigrad_chat():
    """unigrad-chat (built on first use, minutes): its template renders the calculator, the model calls it, and every
    episode ends with a reward."""
    model, tok = load_model_and_tokenizer("unigrad-chat")
    engine = TransformersEngine(model.eval(), tok.pad_token_id, tok.eos_token_id)
    spec = f"agent:{TOOLS}:solve@countdown"
    _, _, rows, episodes = play("unigrad-chat", tok, engine, spec, prompts=4, n=2, max_new_tokens=48)
    assert episodes.failures == {} and torch.isfinite(episodes.rewards).all()
    assert (episodes.turns >= 1).all() and (episodes.turns <= 4).all() and episodes.splits == 0
    assert episodes.tool_calls.sum() >= 4 and (episodes.turns == episodes.tool_calls + 1).sum() >= 4
    called = [r for r in range(rows.num_sequences) if episodes.tool_calls[r] > 0]
    assert all("<tool_response>" in observations(tok, rows, r) for r in called)
