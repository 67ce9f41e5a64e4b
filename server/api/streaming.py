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
    so proxies and clients do not time the stream out. Closing this closes `events` (aborting its work).

    One task drives `events` into a queue and one ticks for the keep-alives, per stream: an event costs a queue
    hand-off, where waiting on each next event with a timeout (a task and `asyncio.wait` per event) was a fifth
    of the event loop's time per streamed token at batch 1."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()
    last = loop.time()  # when the consumer last got something

    async def pump() -> None:
        try:
            async for item in events:
                queue.put_nowait(item)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(_Failed(e))
        else:
            queue.put_nowait(end)

    async def tick() -> None:
        while True:
            wait = last + interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if queue.empty():  # else the consumer has something already (or is blocked sending)
                queue.put_nowait(KEEPALIVE)
            await asyncio.sleep(interval)

    tasks = (asyncio.create_task(pump()), asyncio.create_task(tick()))
    try:
        while True:
            item = await queue.get()
            last = loop.time()
            if item is end:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await events.aclose()


class _Failed:
    def __init__(self, error: Exception):
        self.error = error


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class TextEvents:
    """`sse(make(index, text))` for the common event of a stream (a delta of text, nothing else varying) at the
    cost of encoding `text` alone: the rest of the event is encoded once per index and kept around it. The same
    bytes as `sse` (a JSON string's encoding does not depend on where it stands; tested)."""

    _MARK = "\x00lamina-text\x00"

    def __init__(self, make: Callable[[int, str], Any]):
        self._make = make
        self._around: dict[int, tuple[str, str] | None] = {}

    def __call__(self, index: int, text: str) -> str:
        if index not in self._around:
            parts = sse(self._make(index, self._MARK)).split(json.dumps(self._MARK, ensure_ascii=False))
            self._around[index] = (parts[0], parts[1]) if len(parts) == 2 else None
        around = self._around[index]
        if around is None:  # the mark stands elsewhere in the event too: encode it whole
            return sse(self._make(index, text))
        return around[0] + json.dumps(text, ensure_ascii=False) + around[1]


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
