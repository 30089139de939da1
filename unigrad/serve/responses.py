"""The response bodies of the endpoints, and the chunks of a streamed response (server-sent events).

A stream is made after the whole completion is sampled: the chunks carry the same text, token by token, as the
body would (docs/serve.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from unigrad.serve.choices import Choice
from unigrad.serve.requests import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Answer:
    """A request's sampled choices: choice p * n + j is sample j of prompt p."""

    request_id: str
    created: int
    model: str
    prompt_ids: list[list[int]]
    choices: list[Choice]
    n: int

    def prompt_of(self, index: int) -> list[int]:
        return self.prompt_ids[index // self.n]

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprob_entries(tokenizer, choice: Choice, top: int) -> list[dict]:
    """OpenAI's `logprobs.content`: each sampled token, its log-prob, its bytes; `top_logprobs` lists the sampled
    token alone when alternatives are asked for (they are not computed)."""
    entries = []
    for token_id, logprob in zip(choice.token_ids, choice.logprobs, strict=True):
        text = token_text(tokenizer, token_id)
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        entries.append({**entry, "top_logprobs": [entry] if top else []})
    return entries


def chat_message(choice: Choice) -> dict:
    message = {"role": "assistant", "content": choice.content}
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    return message


def chat_body(tokenizer, answer: Answer, request: ChatRequest) -> dict:
    choices = []
    for i, choice in enumerate(answer.choices):
        entry = {"index": i, "message": chat_message(choice), "finish_reason": choice.finish_reason,
                 "logprobs": {"content": chat_logprob_entries(tokenizer, choice, request.top_logprobs)}
                 if request.logprobs else None}
        if request.return_token_ids:
            entry.update(prompt_token_ids=answer.prompt_of(i), token_ids=choice.token_ids)
        choices.append(entry)
    body = {**answer.head("chat.completion"), "choices": choices, "usage": answer.usage()}
    if request.return_token_ids:
        body["prompt_token_ids"] = answer.prompt_ids[0]
    return body


def completion_logprobs(tokenizer, choice: Choice, top: int) -> dict:
    """OpenAI's completions `logprobs`: tokens, their log-probs, their offsets in the text."""
    tokens = [token_text(tokenizer, t) for t in choice.token_ids]
    offsets, at = [], 0
    for piece in choice.pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": tokens, "token_logprobs": list(choice.logprobs), "text_offset": offsets,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, choice.logprobs, strict=True)] if top else None}


def completion_body(tokenizer, answer: Answer, request: CompletionRequest) -> dict:
    choices = []
    for i, choice in enumerate(answer.choices):
        entry = {"index": i, "text": choice.text, "finish_reason": choice.finish_reason,
                 "logprobs": completion_logprobs(tokenizer, choice, request.logprobs)
                 if request.logprobs is not None else None}
        if request.return_token_ids:
            entry.update(prompt_token_ids=answer.prompt_of(i), token_ids=choice.token_ids)
        choices.append(entry)
    return {**answer.head("text_completion"), "choices": choices, "usage": answer.usage()}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_choice_deltas(tokenizer, index: int, choice: Choice, request: ChatRequest) -> Iterator[dict]:
    """One choice's chunk choices: the role, then a token at a time (tool calls in one delta), then the finish."""
    yield {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    entries = chat_logprob_entries(tokenizer, choice, request.top_logprobs) if request.logprobs else None
    if choice.tool_calls:
        delta = {"content": choice.content, "tool_calls": [{"index": k, **call}
                                                           for k, call in enumerate(choice.tool_calls)]}
        spans = [(delta, slice(0, len(choice.token_ids)))]
    else:
        spans = [({"content": piece}, slice(k, k + 1)) for k, piece in enumerate(choice.pieces)]
    for delta, span in spans:
        out = {"index": index, "delta": delta, "finish_reason": None,
               "logprobs": {"content": entries[span]} if entries is not None else None}
        if request.return_token_ids:
            out["token_ids"] = choice.token_ids[span]
        yield out
    yield {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}


def chat_stream(tokenizer, answer: Answer, request: ChatRequest) -> Iterator[str]:
    head = answer.head("chat.completion.chunk")
    for i, choice in enumerate(answer.choices):
        for k, delta in enumerate(chat_choice_deltas(tokenizer, i, choice, request)):
            chunk = {**head, "choices": [delta]}
            if request.return_token_ids and k == 0:
                chunk["prompt_token_ids"] = answer.prompt_of(i)
            yield sse(chunk)
    if request.include_usage:
        yield sse({**head, "choices": [], "usage": answer.usage()})
    yield sse("[DONE]")


def completion_stream(tokenizer, answer: Answer, request: CompletionRequest) -> Iterator[str]:
    head = answer.head("text_completion")
    for i, choice in enumerate(answer.choices):
        logprobs = completion_logprobs(tokenizer, choice, request.logprobs) if request.logprobs is not None else None
        for k, piece in enumerate(choice.pieces):
            out = {"index": i, "text": piece, "finish_reason": None, "logprobs": None if logprobs is None else {
                key: (value[k:k + 1] if value is not None else None) for key, value in logprobs.items()}}
            if request.return_token_ids:
                out.update(token_ids=[choice.token_ids[k]], **({"prompt_token_ids": answer.prompt_of(i)} if k == 0
                                                                else {}))
            yield sse({**head, "choices": [out]})
        yield sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                        "finish_reason": choice.finish_reason}]})
    if request.include_usage:
        yield sse({**head, "choices": [], "usage": answer.usage()})
    yield sse("[DONE]")
