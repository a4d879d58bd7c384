"""The one place where agentd's errors become HTTP status codes and the error shape.

Everything else raises `ApiError` (or a subclass) and never picks a status code itself.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    status = 400
    code = "bad_request"
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None
                 ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = {**type(self).headers, **(headers or {})}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}, **self.extra}


class BadJson(ApiError):
    status, code = 400, "bad_json"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ApiError):
    status, code = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class ValidationFailed(ApiError):
    status, code = 422, "validation_error"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"


class Unavailable(ApiError):
    """503 with Retry-After: draining, overloaded, a dependency down."""

    status, code = 503, "unavailable"

    def __init__(self, message: str, *, code: str = "unavailable", retry_after: int = 5,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)},
                         extra=extra)


# Chat outcomes (API.md): a run that did not complete, with what was saved.
OUTCOME_STATUS = {"server_shutdown": 503, "timeout": 504, "error": 502, "cancelled": 409}
OUTCOME_CODE = {"server_shutdown": "server_shutdown", "timeout": "timeout", "error": "llm_error",
                "cancelled": "cancelled"}


def outcome_error(reason: str, message: str, extra: dict[str, Any]) -> ApiError:
    headers = {"Retry-After": "5"} if reason == "server_shutdown" else None
    return ApiError(message, code=OUTCOME_CODE.get(reason, "run_failed"),
                    status=OUTCOME_STATUS.get(reason, 502), headers=headers, extra=extra)


def error_json(error: ApiError) -> bytes:
    return json.dumps(error.body()).encode()


OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}


def openai_error_json(error: ApiError) -> bytes:
    """OpenAI's error shape for /v1 (API.md): message, type, code (a string), param."""
    body = {"error": {"message": error.message,
                      "type": OPENAI_TYPES.get(error.status, "server_error"),
                      "code": error.code, "param": error.extra.get("param")}}
    extra = {k: v for k, v in error.extra.items() if k != "param"}
    return json.dumps({**body, **extra}).encode()
