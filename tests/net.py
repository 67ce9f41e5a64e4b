"""Local network helpers shared by the test packages: a free port, and a uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app, make_server=uvicorn.Server, *, ready_path: str = "/ready", ready_statuses=(200,),
                headers: dict | None = None, timeout: float = 60.0, log_level: str | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL once `ready_path`
    answers one of `ready_statuses`. Fails fast if the app reports a failed start or the server thread dies.
    `live_server.current` is the running server (tests that drive shutdown use it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=2,
                            **({"log_level": log_level} if log_level else {}))
    server = make_server(config)
    live_server.current = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                r = httpx.get(base + ready_path, headers=headers or {}, timeout=5)
                if r.status_code in ready_statuses:
                    break
                if r.status_code == 503 and "failed" in r.text:
                    raise RuntimeError(f"the app failed to start: {r.text}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise TimeoutError(f"the live server never became ready at {base}{ready_path}")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
