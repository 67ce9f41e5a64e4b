"""Fixtures for the API tests: the tiny LLaMA-Adapter reference model, apps built around it (real engine or
a scripted fake), a ready TestClient, a live uvicorn on 127.0.0.1 and small local HTTP servers."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.settings import Settings
from tests.models.conftest import REF, load_reference
from tests.net import live_server  # noqa: F401 - the API tests' live server

MSG = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="session")
def tiny():
    """The tiny LLaMA-Adapter V2 reference (adapter id "tiny"; vocabulary of 128: text is gibberish)."""
    return load_reference()


@pytest.fixture(scope="session")
def golden():
    import torch

    return torch.load(REF / "golden.pt", weights_only=True)


def settings(**kw) -> Settings:
    base = {"experts": [], "max_context": 256, "max_batch": 2, "max_waiting": 4, "sse_keepalive": 0.2}
    return Settings(**{**base, **kw})


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    keys = client.app.state.runtime.settings.api_keys
    auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/ready", headers=auth)
        if r.status_code == 200:
            return
        if r.json().get("status") == "failed":
            raise RuntimeError(r.json())
        time.sleep(0.02)
    raise TimeoutError("app never became ready")


@contextmanager
def app_client(loaded=None, *, engine=None, runner=None, headers=None, **kw) -> Iterator[TestClient]:
    """A ready TestClient; `kw` are Settings fields, `runner` an ExpertRunner to inject."""
    app = create_app(settings(**kw), loaded=loaded, engine=engine, experts=runner)
    with TestClient(app, headers=headers or {}) as client:
        wait_ready(client)
        yield client


def png_bytes(size=(32, 24), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What is in this image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


class LocalHTTP:
    """A tiny threaded HTTP server on 127.0.0.1 with programmable routes; counts requests per path."""

    def __init__(self, routes: dict[str, tuple[int, dict, bytes]], delay: float = 0.0, default=None):
        self.routes, self.hits, self.delay, self.default = routes, {}, delay, default
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if outer.delay:
                    time.sleep(outer.delay)
                status, headers, body = outer.routes.get(self.path, outer.default or (404, {}, b"missing"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def spy_requests():
    """Install a spy on an app's engine: returns the list the GenerateRequests it receives are appended to."""
    def install(client):
        seen = []
        engine = client.app.state.runtime.engine
        generate = engine.generate

        def spy(request, reservation=None):
            seen.append(request)
            return generate(request, reservation)

        engine.generate = spy
        return seen
    return install
