"""Admission, cancellation and draining against a live uvicorn on 127.0.0.1 with the real engine."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx

from server.__main__ import DrainingServer
from server.app import create_app
from tests.api.conftest import MSG, LocalHTTP, image_message, live_server, png_bytes, settings


def test_burst_beyond_the_queue_gets_429_before_any_image_fetch(tiny):
    """Images that take 1 s to fetch keep the first requests in preprocessing (holding queue places); the
    rest of the burst must be refused at once, and their image URLs never requested."""
    max_waiting, burst = 3, 8
    app = create_app(settings(max_waiting=max_waiting, max_batch=1, image_allowed_hosts=["127.0.0.1"]),
                     loaded=tiny)
    image = (200, {"Content-Type": "image/png"}, png_bytes())
    with LocalHTTP({}, delay=1.0, default=image) as images, live_server(app) as base:
        async def one(i: int, client: httpx.AsyncClient):
            body = {"model": "tiny", "max_tokens": 2, "messages": image_message(images.url(f"/img{i}.png"))}
            return i, await client.post(f"{base}/v1/chat/completions", json=body)

        async def burst_all():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(one(i, client) for i in range(burst)))

        t0 = time.monotonic()
        results = asyncio.run(burst_all())
        elapsed = time.monotonic() - t0
    refused = [i for i, r in results if r.status_code == 429]
    served = [i for i, r in results if r.status_code == 200]
    assert len(served) == max_waiting and len(refused) == burst - max_waiting, [r.status_code for _, r in results]
    for i, r in results:
        if r.status_code == 429:
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert images.hits.get(f"/img{i}.png", 0) == 0  # refused before its image was fetched
    assert sorted(int(p[4:-4]) for p in images.hits) == sorted(served)
    assert elapsed < 10


def _engine_idle(app, timeout=5.0) -> bool:
    engine = app.state.runtime.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0:
            return True
        time.sleep(0.02)
    return False


def test_disconnect_mid_stream_frees_the_slot(tiny):
    app = create_app(settings(max_context=2048, max_batch=1), loaded=tiny)
    with live_server(app) as base:
        engine = app.state.runtime.engine
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                got = 0
                for line in lines:
                    if line.startswith("data: {"):
                        got += 1
                    if got >= 3:
                        break
                assert engine.stats().running == 1
            # leaving the block closes the connection mid-stream
        assert _engine_idle(app), engine.stats()
        generated = engine.stats().generation_tokens_total
        time.sleep(0.3)
        assert engine.stats().generation_tokens_total == generated < 2000  # no zombie decoding
        # the freed slot serves the next request
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200


def test_disconnect_during_a_plain_request_cancels_it(tiny):
    app = create_app(settings(max_context=2048, max_batch=1), loaded=tiny)
    with live_server(app) as base:
        engine = app.state.runtime.engine
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2000, "ignore_eos": True}

        async def leave_early():
            async with httpx.AsyncClient(timeout=30) as client:
                task = asyncio.ensure_future(client.post(f"{base}/v1/chat/completions", json=body))
                deadline = time.monotonic() + 10
                while engine.stats().running == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(leave_early())
        assert _engine_idle(app), engine.stats()
        assert engine.stats().generation_tokens_total < 2000


def test_sigterm_drains(tiny):
    """First signal: readiness and new requests 503, the in-flight stream finishes, the server exits."""
    app = create_app(settings(max_context=2048, drain_timeout=20), loaded=tiny)
    with live_server(app, lambda config: DrainingServer(config, app.state.runtime, 20)) as base:
        server = live_server.current
        body = {"model": "tiny", "messages": MSG, "max_tokens": 600, "ignore_eos": True, "stream": True}
        events: list[str] = []

        def consume():
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=consume)
        reader.start()
        deadline = time.monotonic() + 10
        while app.state.runtime.engine.stats().running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        server._loop.call_soon_threadsafe(server.handle_exit, signal.SIGTERM, None)
        time.sleep(0.1)
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": MSG}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        reader.join(60)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"  # finished, not cut off
        deadline = time.monotonic() + 20
        while not server.should_exit and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.should_exit


def test_disconnect_during_the_experts_cancels_before_the_engine(tiny):
    """A client that leaves while the experts run: nothing reaches the engine, the queue place is freed."""
    from experts.run import ExpertRunner
    from tests.api.conftest import data_url
    from tests.api.test_experts import FakeExpert

    slow = FakeExpert("slow", "Caption: a square.", delay=1.5)
    app = create_app(settings(sse_keepalive=0.1), loaded=tiny, experts=ExpertRunner([slow], timeout=10))
    with live_server(app) as base:
        engine = app.state.runtime.engine
        submitted = []
        generate = engine.generate
        engine.generate = lambda request, reservation=None: (submitted.append(request),
                                                             generate(request, reservation))[1]
        body = {"model": "tiny", "max_tokens": 3, "stream": True,
                "messages": image_message(data_url(png_bytes()))}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # (kept referenced: a dropped iterator closes the connection)
            assert next(lines) == ": keep-alive"  # the experts are running
            time.sleep(0.2)
            assert engine.stats().waiting == 1  # the request holds its queue place meanwhile
        assert _engine_idle(app)
        time.sleep(1.8)  # the abandoned expert call finishes in its thread; nothing follows it
        assert submitted == [] and slow.calls == 1
        assert engine.stats().waiting == 0


def test_request_timeout(tiny):
    from tests.api.conftest import app_client
    from tests.api.test_chat import sse_events

    with app_client(tiny, max_context=2048, request_timeout=0.3) as c:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2000, "ignore_eos": True}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        events = sse_events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
        assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
        assert _engine_idle(c.app)
