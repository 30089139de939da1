"""The server in this process: `serving(...)` starts it on a local port in a background thread (uvicorn) and stops
it on exit, for a trainer that samples through it during rollouts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from unigrad.rollout.base import RolloutEngine
from unigrad.serve.app import build_app
from unigrad.serve.hooks import ServeHook
from unigrad.serve.service import ServeService, context_length_of

START_TIMEOUT_S = 30.0


@contextlib.contextmanager
def serving(engine: RolloutEngine, tokenizer, model_name: str, hook: ServeHook | None = None,
            host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `engine` as `model_name` on `host`:`port` (0: a free port) while the block runs; yields the base URL
    ("http://127.0.0.1:PORT/v1", what `openai.OpenAI(base_url=...)` takes). The context is the tokenizer's
    model_max_length or the engine model's max_position_embeddings; use `serve_service` for other settings."""
    model = getattr(engine, "model", None)
    service = ServeService(engine, tokenizer, model_name, hook, context_length=context_length_of(tokenizer, model))
    with serve_service(service, host, port) as url:
        yield url


@contextlib.contextmanager
def serve_service(service: ServeService, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """`service`'s app on `host`:`port` in a background thread while the block runs; yields the base URL."""
    config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="unigrad-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
