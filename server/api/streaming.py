"""Streaming and cancellation plumbing: SSE framing, keep-alive comments, and cancel-on-disconnect.

Starlette cancels a streaming response's iterator when the client disconnects; `cancel_on_disconnect` gives
plain (non-streaming) work the same behaviour by watching the ASGI `receive` channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from server.api.errors import ClientDisconnected

log = logging.getLogger("lamina.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = ": keep-alive\n\n"


async def cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        log.info("client disconnected; request cancelled")
        raise ClientDisconnected()
    return task.result()


async def with_keepalive(events: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """`events`, plus an SSE comment whenever nothing came for `interval` s (experts, queue, long prefill),
    so proxies and clients do not time the stream out. Closing this closes `events` (aborting its work)."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await events.aclose()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """`text/event-stream` with anti-buffering headers; `cleanup` runs however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(content, headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()  # e.g. the stream never started because the client left at once
