"""A request from its body to its `Answer`, without HTTP: validation, the prompt's ids (chat template, hook),
sampling (`Batcher`), the choices, the hook's record of the call."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from unigrad.rollout.base import RolloutEngine, eos_id_list
from unigrad.serve.batcher import Batcher, SamplingKey, request_seeds
from unigrad.serve.choices import Choice, finish_choice
from unigrad.serve.errors import ApiError, bad_request, from_validation
from unigrad.serve.hooks import CompletedCall, PassThroughHook, PromptCall, RefusedCall, SampledChoice, ServeHook
from unigrad.serve.messages import render_chat
from unigrad.serve.requests import ChatRequest, CompletionRequest, SamplingRequest
from unigrad.serve.responses import Answer
from unigrad.tools.calls import tool_style

DEFAULT_MAX_TOKENS = 256


def context_length_of(tokenizer, model=None) -> int:
    """The longest prompt plus completion the model takes: its config's max_position_embeddings, else the
    tokenizer's model_max_length (when it is a real bound)."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None)
    if length:
        return int(length)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**8 else 2048


def parse(kind: type[SamplingRequest], body) -> SamplingRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as err:
        raise from_validation(err) from None
    request.refuse_unsupported()
    return request


@dataclass
class ServeService:
    """Answers requests with `engine` (its tokenizer `tokenizer`) under the name `model_name`.

    `context_length`: the longest prompt plus completion (`context_length_of`); `default_max_tokens`: the
    completion length of a request that sets none (less where the context ends first)."""

    engine: RolloutEngine
    tokenizer: object
    model_name: str
    hook: ServeHook = field(default_factory=PassThroughHook)
    context_length: int = 2048
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    batcher: Batcher | None = None

    def __post_init__(self) -> None:
        if self.hook is None:
            self.hook = PassThroughHook()
        if self.batcher is None:
            self.batcher = Batcher(self.engine)
        self.eos_ids = eos_id_list(self.tokenizer.eos_token_id)
        self.renders_tools = tool_style(self.tokenizer) == "hf"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "unigrad"}]}

    def check_model(self, request: SamplingRequest) -> None:
        if request.model != self.model_name:
            raise ApiError(400, f"the model {request.model!r} is not served here; this server serves "
                           f"{self.model_name!r}", "invalid_request_error", "model", "model_not_found")

    async def chat(self, body, api_key: str | None) -> tuple[ChatRequest, Answer]:
        request = parse(ChatRequest, body)
        self.check_model(request)
        tools = request.tools if request.tools and request.tool_choice != "none" else None
        if tools and not self.renders_tools:
            raise bad_request("this model's chat template does not render tools", "tools")
        rendered = render_chat(self.tokenizer, request.messages, tools)
        call = PromptCall(api_key, "chat.completions", request.messages, request.tools, None, rendered)
        answer = await self.answer(request, [call], tools=bool(tools))
        return request, answer

    async def complete(self, body, api_key: str | None) -> tuple[CompletionRequest, Answer]:
        request = parse(CompletionRequest, body)
        self.check_model(request)
        calls = [PromptCall(api_key, "completions", None, None, prompt, self.tokenise(prompt, f"prompt.{i}"))
                 for i, prompt in enumerate(request.prompts())]
        return request, await self.answer(request, calls, tools=False)

    def tokenise(self, prompt: str | list[int], where: str) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"{where}: token ids must be in [0, {vocab})", where)
        return list(prompt)

    def prompt_ids(self, call: PromptCall) -> list[int]:
        """The ids to sample from for `call` (the hook's answer), checked against the context."""
        try:
            ids = list(self.hook.prompt_ids(call))
        except RefusedCall as err:
            raise ApiError(400, err.message, "invalid_request_error", None, "refused_by_hook") from None
        if not ids:
            raise bad_request("the prompt is empty", "messages" if call.messages is not None else "prompt")
        if len(ids) >= self.context_length:
            raise bad_request(f"the prompt has {len(ids)} tokens; this model's context is {self.context_length} "
                              "tokens, with room for at least one to sample", "messages" if call.messages is not None
                              else "prompt", "context_length_exceeded")
        return ids

    def max_new_tokens(self, request: SamplingRequest, prompts: list[list[int]]) -> int:
        room = self.context_length - max(len(p) for p in prompts)
        asked = request.requested_tokens()
        if asked is None:
            return min(self.default_max_tokens, room)
        if asked > room:
            raise bad_request(f"max_tokens is {asked} but the prompt leaves room for {room} tokens in this model's "
                              f"context of {self.context_length}", "max_tokens", "context_length_exceeded")
        return asked

    def sampling(self, request: SamplingRequest, calls: list[PromptCall],
                 prompts: list[list[int]]) -> tuple[SamplingKey, tuple[int, ...]]:
        """How `prompts` (the ids of `calls`) are sampled: the request's settings and each prompt's random stream
        (a trainer's service overrides this to sample as the run trains)."""
        key = SamplingKey(request.n, request.temperature, request.top_p, max(request.top_k, 0),
                          self.max_new_tokens(request, prompts))
        return key, request_seeds(request.seed, len(prompts))

    async def answer(self, request: SamplingRequest, calls: list[PromptCall], tools: bool) -> Answer:
        """Sample `request.n` choices for each prompt of `calls` and tell the hook."""
        prompts = [self.prompt_ids(call) for call in calls]
        key, seeds = self.sampling(request, calls, prompts)
        try:
            samples = await self.batcher.sample(prompts, key, seeds)
        except Exception as err:  # noqa: BLE001 - the engine failed: the client gets its message, not a traceback
            raise ApiError(500, f"the engine failed: {type(err).__name__}: {err}", "server_error") from None
        choices = [finish_choice(self.tokenizer, s, request.stop_strings, tools) for row in samples for s in row]
        prefix = "chatcmpl" if calls[0].messages is not None else "cmpl"
        answer = Answer(f"{prefix}-{secrets.token_hex(12)}", int(time.time()), self.model_name, prompts, choices,
                        request.n)
        self.record(answer, calls)
        return answer

    def record(self, answer: Answer, calls: list[PromptCall]) -> None:
        for p, call in enumerate(calls):
            mine: list[Choice] = answer.choices[p * answer.n:(p + 1) * answer.n]
            done = CompletedCall(call.api_key, call.endpoint, answer.request_id, answer.prompt_ids[p],
                                 [SampledChoice(c.token_ids, c.logprobs, c.finish_reason) for c in mine])
            try:
                self.hook.completed(done)
            except RefusedCall as err:
                raise ApiError(400, err.message, "invalid_request_error", None, "refused_by_hook") from None
