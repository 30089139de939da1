"""Errors a request can meet, as OpenAI's API reports them: an HTTP status and the body
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from pydantic import ValidationError


class ApiError(Exception):
    """An error answered to the client: `status` (400 bad request, 404 unknown route, 500 the engine failed) and
    OpenAI's error fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def from_validation(err: ValidationError) -> ApiError:
    """The first problem pydantic found in a request body, as a 400 naming the parameter."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return bad_request(f"{param}: {first['msg']}" if param else first["msg"], param)
