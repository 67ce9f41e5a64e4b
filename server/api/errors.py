"""Typed errors → OpenAI error bodies, in one place.

Everything the API refuses becomes `{"error": {"message", "type", "param", "code"}}` with the right status:
400 invalid request (pydantic's 422 included), 401 bad key, 404 unknown model or route, 413 too large,
429 overloaded (+ Retry-After), 503 not ready or draining, 500 only for bugs. `error_body` is also what a
stream sends as `data: {"error": ...}` once it has begun.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.base import UnknownExpertError
from server.engine.types import (
    ContextLengthError,
    EngineError,
    EngineStoppedError,
    QueueFullError,
    UnknownAdapterError,
)

log = logging.getLogger("lamina.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error the API returns as it is: status, message, the parameter at fault and a code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_ready(message: str = "the server is loading the model; retry shortly") -> APIError:
    return APIError(503, message, code="not_ready", headers={"Retry-After": "5"})


class ClientDisconnected(Exception):
    """The client went away; whatever was running for it has been cancelled."""


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception the request path can raise to the APIError the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        retry = max(1, math.ceil(getattr(exc, "retry_after", 1.0)))
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc) or "the server is shutting down", code="draining",
                        headers={"Retry-After": "5"})
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, UnknownExpertError):
        return APIError(400, str(exc), param="experts", code="unknown_expert")
    if isinstance(exc, TimeoutError):
        return APIError(504, "the request took longer than the server's request timeout", code="timeout")
    return APIError(500, "internal server error", code="internal_error")


def error_body(err: APIError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_tag(part: str) -> bool:
    """Union-member labels pydantic puts in error locations (`str`, `list[str]`, `TextPart`, ...)."""
    return (part in _TYPE_TAGS or "[" in part or part[:1].isupper()
            or part.startswith(("function-", "constrained-", "nullable")))


def _loc_param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages[0].content'."""
    out = ""
    for p in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_tag(str(p)):
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    param = _loc_param(tuple(errors[0].get("loc", ())))
    # of the errors about that parameter (one per union member), the most specific: not a type mismatch
    same = [e for e in errors if _loc_param(tuple(e.get("loc", ()))) == param]
    first = next((e for e in same if not str(e.get("type", "")).endswith("_type")), same[0])
    kind, msg = first.get("type", ""), first.get("msg", "invalid value")
    cause = first.get("ctx", {}).get("error")
    if getattr(cause, "param", None):  # schemas.ParamError: a cross-field check naming its parameter
        param = f"{param}.{cause.param}" if param else cause.param
        return bad_request(str(cause), param, "invalid_value")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}",
                           None, "invalid_json")
    if kind == "missing" and param is None:  # no body at all
        return bad_request("the request body is empty: send a JSON object (model and messages, or model and "
                           "prompt)", None, "missing_body")
    if kind == "missing":
        return bad_request(f"missing required parameter: {param}", param, "missing_parameter")
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return bad_request("the request body must be a JSON object", None, "invalid_body")
    msg = msg.removeprefix("Value error, ")
    return bad_request(f"invalid value for {param}: {msg}" if param else msg, param, "invalid_value")


def install(app: FastAPI, on_error: Callable[[int], None] | None = None) -> None:
    """Register the handlers that turn every refusal into an OpenAI error body (`on_error(status)` counts)."""

    def error_response(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err.status)
        return _response(err)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(UnknownExpertError)
    async def _expert(request: Request, exc: UnknownExpertError) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed"}.get(
            exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(APIError(499, "client disconnected"))

    @app.exception_handler(TimeoutError)
    async def _timeout(request: Request, exc: TimeoutError) -> JSONResponse:
        return error_response(to_api_error(exc))
    # anything else is a bug: RequestContextMiddleware logs it and answers 500 with the request id
