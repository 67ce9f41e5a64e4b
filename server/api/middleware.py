"""ASGI-level plumbing: request ids in every response and log record, optional JSON logs, a body-size cap.

`RequestContextMiddleware` (pure ASGI, so streaming and cancellation pass through untouched) takes a sane
incoming `X-Request-Id` or makes one, keeps it in a contextvar for the log filter, adds it to the response,
counts in-flight requests (for draining), refuses bodies over the size cap with 413 before they are read
into memory, and turns an exception that escapes the app into an OpenAI-style 500 that still carries the id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import re
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
log = logging.getLogger("lamina.api")


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", json_logs: bool = False) -> dict:
    """Configure the root, uvicorn and lamina loggers; returns the dictConfig (also for uvicorn's log_config)."""
    fmt = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {
            "plain": {"format": fmt},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json" if json_logs else "plain",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level.upper(), "propagate": True},
        },
    }
    logging.config.dictConfig(config)
    return config


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the cap; the app's HTTPException handler answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than the {limit}-byte limit")


def _error(status: int, message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, on_start: Callable[[], None] | None = None,
                 on_end: Callable[[], None] | None = None, max_body_bytes: int | None = None):
        self.app = app
        self.on_start, self.on_end = on_start, on_end
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        rid = incoming if _SANE_ID.match(incoming) else new_request_id()
        token = request_id_var.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"], state["arrival"] = rid, time.monotonic()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        async def reply(status: int, body: bytes) -> None:
            await send_with_id({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body})

        limit, received = self.max_body_bytes, 0
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"")

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        if self.on_start:
            self.on_start()
        try:
            if limit is not None and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(limit)
            await self.app(scope, receive_capped if limit is not None else receive, send_with_id)
        except BodyTooLarge as e:
            if not started:
                await reply(413, _error(413, e.detail, "invalid_request_error", "request_too_large"))
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await reply(500, _error(500, "internal server error", "server_error", "internal_error"))
        finally:
            if self.on_end:
                self.on_end()
            request_id_var.reset(token)
