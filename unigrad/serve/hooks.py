"""What a trainer plugs into the server to see and steer every call (`ServeHook`).

The server calls the hook twice per prompt of a request, on its event-loop thread (one call at a time; keep them
quick, hand heavy work to another thread):

1. `prompt_ids(PromptCall)` before sampling: the request's API key (`Authorization: Bearer KEY`), its messages and
   tools as the client sent them (chat) or its prompt (completions), and the token ids the chat template rendered
   (or the prompt's ids). It returns the ids to sample from: the rendered ids by default, or e.g. the ids of the
   episode so far, so that a multi-turn agent's context is the exact tokens the policy wrote, never re-tokenised.
2. `completed(CompletedCall)` after sampling: the key, the prompt ids sampled from, and for each choice the sampled
   token ids exactly (the end-of-turn token included; cut after the token that completed a stop string), the
   engine's log-prob of each (`Rollout.infer_logprobs`: under the distribution actually sampled from) and the finish
   reason.

Either method may raise `RefusedCall(message)`: the client gets a 400 error with that message (and, raised by
`prompt_ids`, nothing is sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class RefusedCall(Exception):
    """Raised by a hook to refuse a call: the client gets HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class PromptCall:
    """One prompt of a request, before sampling."""

    api_key: str | None  # the bearer token of the request (None: no Authorization header)
    endpoint: str  # "chat.completions" or "completions"
    messages: list[dict] | None  # chat: the messages as sent (OpenAI shape); completions: None
    tools: list[dict] | None  # chat: the tools as sent; else None
    prompt: str | list[int] | None  # completions: the prompt as sent; chat: None
    rendered_ids: list[int]  # the template-rendered (chat) or tokenised (completions) prompt


@dataclass(frozen=True)
class SampledChoice:
    token_ids: list[int]  # the sampled ids, exactly
    logprobs: list[float]  # the engine's log-prob of each sampled id
    finish_reason: str  # "stop", "length" or "tool_calls"


@dataclass(frozen=True)
class CompletedCall:
    """One prompt of a request, after sampling: its n choices."""

    api_key: str | None
    endpoint: str
    request_id: str  # the response's "id"
    prompt_ids: list[int]  # the ids sampled from (what `prompt_ids` returned)
    choices: list[SampledChoice]


@runtime_checkable
class ServeHook(Protocol):
    def prompt_ids(self, call: PromptCall) -> list[int]:
        """The token ids to sample from for `call` (default: `call.rendered_ids`); may raise `RefusedCall`."""
        ...

    def completed(self, call: CompletedCall) -> None:
        """Called once the prompt's choices are sampled; may raise `RefusedCall`."""
        ...


class PassThroughHook:
    """The hook of a server that has none: samples from the rendered ids, records nothing."""

    def prompt_ids(self, call: PromptCall) -> list[int]:
        return list(call.rendered_ids)

    def completed(self, call: CompletedCall) -> None:
        return None
