"""The request bodies of the OpenAI-compatible endpoints, validated by pydantic.

Unknown fields are accepted and ignored (clients send many); the fields listed in `UNSUPPORTED` are refused when
they ask for something the server does not do. A field sent as null takes its default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from unigrad.serve.errors import bad_request

# field -> (the value that asks for nothing, why it is refused otherwise)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "presence_penalty": (0, "presence_penalty is not supported"),
    "frequency_penalty": (0, "frequency_penalty is not supported"),
    "logit_bias": ({}, "logit_bias is not supported"),
    "echo": (False, "echo is not supported"),
    "suffix": (None, "suffix is not supported"),
}


class SamplingRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # an extension (as vLLM's): 0 or -1 keeps every token
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    return_token_ids: bool = False  # an extension (as vLLM's): the choices carry their token ids

    @model_validator(mode="before")
    @classmethod
    def _nulls_take_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for field, (harmless, why) in UNSUPPORTED.items():
            if field in extra and extra[field] not in (harmless, None) and not (harmless == {} and not extra[field]):
                raise bad_request(why, field, "unsupported_parameter")

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class ChatRequest(SamplingRequest):
    messages: list[dict] = Field(min_length=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # alternatives are not returned (docs/serve.md)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tool_choice not in (None, "auto", "none"):
            raise bad_request('tool_choice must be "auto" or "none" (forcing a tool is not supported)',
                              "tool_choice", "unsupported_parameter")


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # alternatives are not returned (docs/serve.md)

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string or token-id list, or several."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise bad_request("prompt is empty", "prompt")
        return list(self.prompt)
