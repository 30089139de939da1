"""`unigrad serve`'s app, driven by the real `openai` client against a running server on the embedded tiny model
(char tokenizer), and, for tool calls, a small char Llama taught to call a tool under a tools chat template."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from step_helpers import small_char_llama, teach_texts

from unigrad.models.loading import load_model_and_tokenizer
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.episodes import encode_messages
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.serve import CompletedCall, PromptCall, RefusedCall, serving
from unigrad.serve.inprocess import serve_service
from unigrad.serve.service import ServeService, context_length_of

MODEL = "unigrad-tiny"
QUESTION = [{"role": "user", "content": "What is 12+7?"}]


class RecordingHook:
    """Records every call; `extra` ids are appended to the rendered prompt; `refuse` refuses every call."""

    def __init__(self, extra=(), refuse=None):
        self.prompts, self.done, self.extra, self.refuse = [], [], list(extra), refuse

    def prompt_ids(self, call: PromptCall) -> list[int]:
        if self.refuse:
            raise RefusedCall(self.refuse)
        self.prompts.append(call)
        return list(call.rendered_ids) + self.extra

    def completed(self, call: CompletedCall) -> None:
        self.done.append(call)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer(MODEL)
    return model, tok, TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)


@pytest.fixture(scope="module")
def server(tiny):
    """(base url, the service, its recording hook) of a server on the tiny model."""
    model, tok, engine = tiny
    hook = RecordingHook()
    service = ServeService(engine, tok, MODEL, hook, context_length=context_length_of(tok, model))
    with serve_service(service) as url:
        yield url, service, hook


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="key-1", max_retries=0)


def chat(client, **kwargs):
    args = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "seed": 7, **kwargs}
    return client.chat.completions.create(**args)


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def recomputed_logprobs(model, prompt: list[int], sampled: list[int], temperature: float) -> list[float]:
    """The log-prob of each sampled token under softmax(logits / temperature), from one forward pass."""
    ids = torch.tensor([prompt + sampled])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(sampled).unsqueeze(-1)).squeeze(-1).tolist()


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_round_trip_records_the_template_ids_and_the_sampled_ids(client, tiny):
    _, tok, _ = tiny
    reply = chat(client, extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    assert choice.model_extra["prompt_token_ids"] == encode_messages(tok, QUESTION)
    assert tok.decode(ids_of(choice), skip_special_tokens=True) == choice.message.content
    ended = ids_of(choice)[-1] == tok.eos_token_id
    assert choice.finish_reason == ("stop" if ended else "length")
    assert reply.usage.prompt_tokens == len(encode_messages(tok, QUESTION))
    assert reply.usage.completion_tokens == len(ids_of(choice))


def test_completions_take_a_string_or_token_ids_alike(client, tiny):
    _, tok, _ = tiny
    text = client.completions.create(model=MODEL, prompt="12+7=", max_tokens=12, seed=3,
                                     extra_body={"return_token_ids": True})
    ids = client.completions.create(model=MODEL, prompt=tok("12+7=")["input_ids"], max_tokens=12, seed=3)
    assert text.choices[0].text == ids.choices[0].text
    assert text.choices[0].model_extra["prompt_token_ids"] == tok("12+7=")["input_ids"]


def test_n_choices_differ_and_a_seed_repeats_them(client):
    first = chat(client, n=4, temperature=1.0)
    again = chat(client, n=4, temperature=1.0)
    other = chat(client, n=4, temperature=1.0, seed=8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert len(set(texts)) > 1
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_sampling_distributions(client, tiny, temperature):
    model, _, _ = tiny
    reply = chat(client, temperature=temperature, logprobs=True, extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    served = [entry.logprob for entry in choice.logprobs.content]
    expected = recomputed_logprobs(model, choice.model_extra["prompt_token_ids"], ids_of(choice), temperature)
    assert len(served) == len(ids_of(choice)) > 0
    assert served == pytest.approx(expected, abs=1e-4)


def test_completion_logprobs_match_the_tokens(client, tiny):
    model, tok, _ = tiny
    reply = client.completions.create(model=MODEL, prompt="7*6=", max_tokens=10, seed=2, logprobs=0,
                                      extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    prompt = tok("7*6=")["input_ids"]
    assert choice.logprobs.token_logprobs == pytest.approx(
        recomputed_logprobs(model, prompt, choice.model_extra["token_ids"], 1.0), abs=1e-4)
    assert "".join(choice.logprobs.tokens).replace(tok.eos_token, "") == choice.text


def test_a_stop_string_cuts_the_text_and_the_ids_after_it(client, tiny):
    _, tok, _ = tiny
    args = {"messages": [{"role": "user", "content": "Count the letters in banana"}], "max_tokens": 40,
            "extra_body": {"return_token_ids": True}}
    seed = next(s for s in range(20) if len(chat(client, seed=s, **args).choices[0].message.content) > 4)
    full = chat(client, seed=seed, **args).choices[0]
    text = full.message.content
    stop = text[2:4]
    cut = chat(client, seed=seed, stop=[stop, "never"], **args).choices[0]
    start = text.index(stop)
    assert cut.message.content == text[:start]
    assert cut.finish_reason == "stop"
    assert ids_of(cut) == ids_of(full)[:start + len(stop)]  # char tokens: through the stop string's last one


def test_streaming_reassembles_to_the_same_text(client):
    whole = chat(client, n=2, logprobs=True, extra_body={"return_token_ids": True})
    stream = chat(client, n=2, logprobs=True, stream=True, stream_options={"include_usage": True},
                  extra_body={"return_token_ids": True})
    texts, ids, finish, usage = ["", ""], [[], []], [None, None], None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            ids[c.index] += c.model_extra.get("token_ids") or []
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert ids == [ids_of(c) for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completion_streaming_reassembles_to_the_same_text(client):
    args = {"model": MODEL, "prompt": "3+4=", "max_tokens": 16, "seed": 5}
    whole = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_64_concurrent_requests_are_answered_in_few_engine_calls(server, client):
    url, service, _ = server
    alone = [chat(client, seed=s, max_tokens=16).choices[0].message.content for s in (1, 2)]
    before, rows_before = service.batcher.engine_calls, len(service.batcher.call_rows)

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=url, api_key="key-2", max_retries=0) as aclient:
            asks = [aclient.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, seed=s % 2 + 1)
                    for s in range(64)]
            return await asyncio.gather(*asks)

    replies = asyncio.run(ask_all())
    calls = service.batcher.engine_calls - before
    assert len(replies) == 64 and 1 <= calls <= 8, calls
    assert sum(service.batcher.call_rows[rows_before:]) == 64
    # each request keeps its own random stream: the same answer as when it was sampled alone
    assert [r.choices[0].message.content for r in replies] == [alone[s % 2] for s in range(64)]


@pytest.mark.parametrize(("expected", "sent", "calls"), [
    (None, 3, 2),  # the window alone: requests 50 ms apart are not one call (two or three: a loaded machine's
                   # engine call may outlast the gap, and the last two then share the next call)
    (3, 3, 1),     # waiting for the three expected requests: one call
    (4, 3, 1),     # one never comes: the call goes out after max_wait_s, not never
])
def test_the_batcher_waits_for_the_expected_requests(tiny, expected, sent, calls):
    """Agents' threads send their requests over a few milliseconds; the trainer says how many are coming, and the
    batcher waits (at most max_wait_s) until they are all there."""
    from unigrad.serve.batcher import Batcher, SamplingKey

    _, tok, engine = tiny
    batcher = Batcher(engine, window_s=0.005, max_wait_s=0.3,
                      expected=None if expected is None else (lambda: expected))
    prompt = tok("12+7=")["input_ids"]
    key = SamplingKey(1, 1.0, 1.0, 0, 4)

    async def send_spread():
        async def one(i):
            await asyncio.sleep(0.05 * i)
            return await batcher.sample([prompt], key, (i,))
        started = time.perf_counter()
        samples = await asyncio.gather(*(one(i) for i in range(sent)))
        await batcher.stop()
        return samples, time.perf_counter() - started

    samples, took = asyncio.run(send_spread())
    assert len(samples) == sent and all(len(s[0][0].token_ids) >= 1 for s in samples)
    assert sum(batcher.call_rows) == sent, batcher.call_rows
    assert (batcher.engine_calls >= calls) if expected is None else (batcher.engine_calls == calls), batcher.call_rows
    if expected == 4:
        assert took >= 0.3  # waited the whole max_wait_s for the request that never came


def test_the_hook_sees_every_call_with_the_exact_ids(server, client, tiny):
    _, tok, _ = tiny
    _, _, hook = server
    hook.prompts.clear()
    hook.done.clear()
    reply = chat(client, n=2, extra_body={"return_token_ids": True})
    assert len(hook.prompts) == len(hook.done) == 1
    asked, done = hook.prompts[0], hook.done[0]
    assert (asked.api_key, asked.messages, asked.rendered_ids) == ("key-1", QUESTION, encode_messages(tok, QUESTION))
    assert done.request_id == reply.id and done.prompt_ids == encode_messages(tok, QUESTION)
    assert [c.token_ids for c in done.choices] == [ids_of(c) for c in reply.choices]
    assert [c.finish_reason for c in done.choices] == [c.finish_reason for c in reply.choices]
    assert all(len(c.logprobs) == len(c.token_ids) for c in done.choices)


def test_the_hook_chooses_the_prompt_ids_and_may_refuse(tiny):
    model, tok, engine = tiny
    extra = tok("Sure", add_special_tokens=False)["input_ids"]
    with serving(engine, tok, MODEL, hook=RecordingHook(extra=extra)) as url:
        reply = chat(openai.OpenAI(base_url=url, api_key="k"), extra_body={"return_token_ids": True})
    assert reply.choices[0].model_extra["prompt_token_ids"] == encode_messages(tok, QUESTION) + extra
    with serving(engine, tok, MODEL, hook=RecordingHook(refuse="episode is over")) as url:
        with pytest.raises(openai.BadRequestError, match="episode is over"):
            chat(openai.OpenAI(base_url=url, api_key="k", max_retries=0))


@pytest.mark.parametrize("change, param", [
    ({"n": 0}, "n"), ({"temperature": -1}, "temperature"), ({"model": "other"}, "model"),
    ({"messages": []}, "messages"), ({"max_tokens": 5000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_bad_requests_are_400_with_openai_error_bodies(client, change, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, **change)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert set(error) >= {"message", "type", "param", "code"} and error["param"] == param, error


def test_bad_json_unknown_routes_and_engine_failures(server, tiny):
    url, _, _ = server
    _, tok, engine = tiny
    bad = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    missing = httpx.get(f"{url}/nowhere")
    assert (bad.status_code, bad.json()["error"]["type"]) == (400, "invalid_request_error")
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "not_found_error")
    # a hook that hands the engine a token id past the vocabulary: the model's embedding fails, the client gets 500
    with serving(engine, tok, MODEL, hook=RecordingHook(extra=[len(tok) + 50])) as url:
        with pytest.raises(openai.InternalServerError) as caught:
            chat(openai.OpenAI(base_url=url, api_key="k", max_retries=0))
    assert "engine failed" in caught.value.body["message"] and "Traceback" not in caught.value.body["message"]


# A chat template that renders tools (their names), assistant tool calls as <tool_call> blocks with the arguments as
# an object, and tool results: the shape of hf templates that take `tools=`, in the char tokenizer's alphabet.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}{% elif m['role'] == 'tool' %}<|user|>result {{ m['name'] }}: {{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
ADD = {"type": "function", "function": {"name": "add", "description": "adds two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
ASK = [{"role": "user", "content": "What is 2+3?"}]
RESULT = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
    "name": "add", "arguments": {"a": 2, "b": 3}}}]}, {"role": "tool", "name": "add", "content": "5"}]


def tool_calling_model(tok, steps: int = 150):
    """A small char Llama taught (Adam) to answer ASK with CALL and the tool's result with "the sum is 5"."""
    texts = [tok.apply_chat_template(ASK, tools=[ADD], tokenize=False, add_generation_prompt=True) + CALL,
             tok.apply_chat_template(ASK + RESULT, tools=[ADD], tokenize=False, add_generation_prompt=True)
             + "the sum is 5"]
    return teach_texts(small_char_llama(tok, seed=1), tok, [t + tok.eos_token for t in texts], steps)


def test_tool_calls_round_trip_through_the_template():
    tok = build_char_tokenizer(model_max_length=256)
    tok.chat_template = TOOLS_TEMPLATE
    model = tool_calling_model(tok)
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)
    with serving(engine, tok, "tool-model") as url:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        args = {"model": "tool-model", "tools": [ADD], "temperature": 0, "max_tokens": 80,
                "extra_body": {"return_token_ids": True}}
        first = client.chat.completions.create(messages=ASK, **args).choices[0]
        assert first.finish_reason == "tool_calls", first.message.content
        call = first.message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 2, "b": 3})
        assert first.message.content is None
        follow = [*ASK, first.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "5"}]
        second = client.chat.completions.create(messages=follow, **args).choices[0]
    rendered = tok.decode(second.model_extra["prompt_token_ids"])
    assert CALL in rendered and "result add: 5" in rendered  # arguments as an object, the tool named by its call
    assert rendered == tok.apply_chat_template(ASK + RESULT, tools=[ADD], tokenize=False, add_generation_prompt=True)
    assert (second.message.content, second.finish_reason) == ("the sum is 5", "stop")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_serves_a_model_under_the_given_name():
    port = free_port()
    command = [sys.executable, "-m", "unigrad.cli", "serve", MODEL, "--port", str(port), "--engine", "transformers",
               "--served-model-name", "mine"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = next(line for line in server.stdout if "unigrad serve" in line or server.poll() is not None)
        assert f"mine on http://127.0.0.1:{port}/v1 (engine: transformers" in first, first
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=5)
        for _ in range(100):  # the line is printed just before uvicorn binds the port
            try:
                assert [m.id for m in client.models.list().data] == ["mine"]
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        reply = client.chat.completions.create(model="mine", messages=QUESTION, max_tokens=8, seed=1)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        server.wait(timeout=30)
