"""The ASGI app (starlette): GET /v1/models, POST /v1/chat/completions, POST /v1/completions; errors as OpenAI's
bodies; `stream: true` as server-sent events."""

from __future__ import annotations

import contextlib
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from unigrad.serve.errors import ApiError, bad_request
from unigrad.serve.responses import chat_body, chat_stream, completion_body, completion_stream
from unigrad.serve.service import ServeService


def api_key(request: Request) -> str | None:
    """The bearer token of `Authorization: Bearer KEY` (None without one)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def json_body(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from None


def build_app(service: ServeService) -> Starlette:
    """The app answering with `service`; its batcher stops when the app shuts down."""

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(service.models())

    async def chat(request: Request):
        parsed, answer = await service.chat(await json_body(request), api_key(request))
        if parsed.stream:
            return StreamingResponse(chat_stream(service.tokenizer, answer, parsed), media_type="text/event-stream")
        return JSONResponse(chat_body(service.tokenizer, answer, parsed))

    async def completions(request: Request):
        parsed, answer = await service.complete(await json_body(request), api_key(request))
        if parsed.stream:
            return StreamingResponse(completion_stream(service.tokenizer, answer, parsed),
                                     media_type="text/event-stream")
        return JSONResponse(completion_body(service.tokenizer, answer, parsed))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await service.batcher.stop()

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


async def api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own errors (404 unknown route, 405 wrong method) in OpenAI's shape."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return await api_error(request, ApiError(err.status_code, message.get(err.status_code, str(err.detail)), kind))


async def server_error(request: Request, err: Exception) -> JSONResponse:
    return await api_error(request, ApiError(500, f"{type(err).__name__}: {err}", "server_error"))
