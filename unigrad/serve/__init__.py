"""An OpenAI-compatible HTTP server over unigrad's rollout engines (`unigrad serve`, docs/serve.md).

One concern per module:

    errors      OpenAI-shaped error bodies (`ApiError`)
    hooks       what a trainer plugs in to see and steer every call (`ServeHook`, `RefusedCall`)
    requests    the request bodies, validated by pydantic
    messages    OpenAI chat messages as chat templates take them, rendered to token ids
    batcher     concurrent requests with the same sampling settings as one `engine.generate` call
    choices     a choice's text, stop strings, tool calls and finish reason from its sampled ids
    responses   the response bodies and the server-sent-event chunks of a stream
    service     a request from its body to its response (no HTTP)
    app         the ASGI app (starlette): routes, errors, streaming
    inprocess   `serving(...)`: the app on a free local port in a background thread
    engines     the model and engine `unigrad serve MODEL` samples with
"""

from unigrad.serve.hooks import CompletedCall, PromptCall, RefusedCall, SampledChoice, ServeHook
from unigrad.serve.inprocess import serving

__all__ = ["CompletedCall", "PromptCall", "RefusedCall", "SampledChoice", "ServeHook", "serving"]
