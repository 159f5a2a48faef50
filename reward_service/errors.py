"""The one error envelope ``{"error": {"type", "message"}}`` and the handlers that produce it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

_MAX_LISTED_ERRORS = 5
_MAX_NAME = 40
_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "queue_full",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer: HTTP status, machine-readable type, human message, extra headers, and
    the field at fault where one is (vLLM's error shape reports it as ``param``)."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = dict(headers or {})
        self.param = param


def error_response(
    status: int, type_: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "message": message}}, status_code=status, headers=headers
    )


def format_loc(loc: Sequence[int | str]) -> str:
    """``("items", 3, "completion")`` -> ``"items[3].completion"``; ``()`` -> ``"body"``.

    Names longer than 40 characters (unknown keys come from the client) are cut, so an error
    message never echoes a large part of the body."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if len(part) <= _MAX_NAME else part[:_MAX_NAME] + "..."
            out += f".{name}" if out else name
    return out or "body"


def format_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line naming each failing field (the input values themselves are never echoed)."""
    parts = [f"{format_loc(e['loc'])}: {e['msg']}" for e in errors[:_MAX_LISTED_ERRORS]]
    if len(errors) > _MAX_LISTED_ERRORS:
        parts.append(f"(and {len(errors) - _MAX_LISTED_ERRORS} more)")
    return "; ".join(parts)


def from_validation_error(exc: ValidationError) -> ApiError:
    """400 for a body that is not JSON at all, else 422 naming the fields."""
    errors = exc.errors(include_url=False, include_input=False)
    invalid_json = [e for e in errors if e["type"] == "json_invalid"]
    if invalid_json:
        return ApiError(400, "invalid_json", f"body is not valid JSON: {invalid_json[0]['msg']}")
    message = format_validation_errors(errors)
    return ApiError(422, "validation_error", message, param=format_loc(errors[0]["loc"]))


def api_error_response(exc: ApiError, metrics: ServiceMetrics) -> JSONResponse:
    """The envelope of ``exc``, counted in the errors metric."""
    metrics.errors.labels(exc.type).inc()
    return error_response(exc.status, exc.type, exc.message, exc.headers)


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Route every error, including FastAPI's own, through the envelope and count it."""

    def respond(status: int, type_: str, message: str, headers: Mapping[str, str] | None = None):
        return api_error_response(ApiError(status, type_, message, headers), metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return api_error_response(exc, metrics)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return respond(400, "invalid_json", "body is not valid JSON")
        return respond(422, "validation_error", format_validation_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _STATUS_TYPES.get(exc.status_code, "http_error")
        return respond(exc.status_code, type_, str(exc.detail), exc.headers)
