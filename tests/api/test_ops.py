"""Operations: API keys, CORS, request ids, health/readiness, metrics, logs."""

from __future__ import annotations

import json
import logging

import pytest

from server.api.middleware import JsonFormatter, RequestIdFilter, request_id_var
from server.app import create_app
from tests.api.conftest import MSG, app_client, data_url, image_message, png_bytes, settings


def test_api_keys(tiny):
    with app_client(tiny, api_keys=["k1", "k2"]) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # open by default
    with app_client(tiny, api_keys=["k1"], auth_health=True, auth_metrics=True) as c:
        assert c.get("/health").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_cors(tiny):
    with app_client(tiny, cors_origins=["https://app.example"]) as c:
        pre = c.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        other = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with app_client(tiny) as c:  # no origins configured: no CORS headers at all
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "https://a.b"}).headers


def test_request_id_on_every_response(tiny):
    with app_client(tiny) as c:
        for r in [c.get("/health"), c.get("/nope"), c.post("/v1/chat/completions", json={}),
                  c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 1})]:
            assert len(r.headers["x-request-id"]) >= 16
        assert c.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        assert c.get("/health", headers={"X-Request-Id": "bad id\n"}).headers["x-request-id"] != "bad id\n"


def test_request_id_in_logs_and_json_format():
    record = logging.LogRecord("lamina.api", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = request_id_var.set("rid-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    out = json.loads(JsonFormatter().format(record))
    assert out["request_id"] == "rid-1" and out["message"] == "hello world" and out["level"] == "info"


def test_readiness_while_loading_and_liveness():
    """A model that takes a while to load: liveness 200 at once, readiness 503 until it is ready."""
    import threading

    from fastapi.testclient import TestClient

    release = threading.Event()

    def slow_load(settings, progress):
        release.wait(10)
        raise RuntimeError("no model in this test")

    import server.app as app_module

    original = app_module.load_model
    app_module.load_model = slow_load
    try:
        app = create_app(settings())
        with TestClient(app) as c:
            assert c.get("/health").status_code == 200
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
            chat = c.post("/v1/chat/completions", json={"model": "x", "messages": MSG})
            assert chat.status_code == 503 and chat.json()["error"]["code"] == "not_ready"
            release.set()
            import time

            for _ in range(100):
                if c.get("/ready").json()["status"] == "failed":
                    break
                time.sleep(0.02)
            assert c.get("/ready").json()["status"] == "failed"
            assert "no model in this test" in c.get("/ready").json()["detail"]
    finally:
        app_module.load_model = original


@pytest.mark.parametrize("name", [
    "lamina:time_to_first_token_seconds", "lamina:inter_token_latency_seconds",
    "lamina:e2e_request_latency_seconds", "lamina:request_queue_time_seconds", "lamina:num_requests_running",
    "lamina:num_requests_waiting", "lamina:kv_cache_usage_perc", "lamina:prompt_tokens_total",
    "lamina:generation_tokens_total", "lamina:stage_latency_seconds",
])
def test_metric_names(metrics_text, name):
    assert f"\n{name}" in metrics_text or metrics_text.startswith(name)


@pytest.fixture(scope="module")
def metrics_text(tiny):
    with app_client(tiny) as c:
        c.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(data_url(png_bytes())),
                                               "max_tokens": 4, "ignore_eos": True})
        # ignore_eos: the tiny model samples its end token about once in 128 tokens at the default temperature
        c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4, "stream": True,
                                               "ignore_eos": True})
        text = c.get("/metrics").text
    return text


def test_stage_metrics(metrics_text):
    for stage in ("image_decode", "visual_encode", "prefill"):
        assert f'lamina:stage_latency_seconds_count{{stage="{stage}"}}' in metrics_text, stage
    assert 'lamina:generation_tokens_total{model="tiny"} 8.0' in metrics_text
    assert 'lamina:request_queue_time_seconds_count{model="tiny"} 2.0' in metrics_text


def test_openapi_docs(tiny):
    with app_client(tiny) as c:
        spec = c.get("/openapi.json").json()
        assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]
        assert c.get("/docs").status_code == 200


def test_body_size_cap(tiny):
    with app_client(tiny, max_body_bytes=10_000) as c:
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert r.headers["x-request-id"]

        def chunks():  # no Content-Length: counted while it streams in
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(30):
                yield b"x" * 1000
            yield b'"}]}'

        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        ok = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 1})
        assert ok.status_code == 200


def test_chat_page_is_served_without_a_key(tiny):
    with app_client(tiny, api_keys=["k"]) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert c.get("/v1/models").status_code == 401


def test_weight_and_kv_bytes_are_exported(metrics_text, tiny):
    import re

    value = float(re.search(r"\nlamina:model_weight_bytes (\S+)", metrics_text).group(1))
    assert value == tiny.model.llama.weight_bytes() > 0
    assert float(re.search(r"\nlamina:kv_cache_capacity_bytes (\S+)", metrics_text).group(1)) > 0


def test_a_dead_engine_thread_ends_streams_with_an_error_and_fails_health(tiny):
    """Streams in flight get an error event and [DONE]; /health and /ready answer 503; the process is told to
    exit non-zero (on_fatal, which `lamina serve` wires to the server's exit code)."""
    import threading

    with app_client(tiny) as c:
        rt = c.app.state.runtime
        fatal = []
        rt.on_fatal = fatal.append
        engine = rt.engine
        original = engine._publish
        calls = []

        def publish_then_break(outputs):  # the first tokens go out, then the thread dies
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("injected failure")
            original(outputs)

        engine._publish = publish_then_break
        result = {}

        def stream():
            with c.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "stream": True,
                                                                "max_tokens": 60, "ignore_eos": True}) as r:
                result["lines"] = [line for line in r.iter_lines() if line]

        t = threading.Thread(target=stream)
        t.start()
        t.join(30)
        assert not t.is_alive()
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]" and any('"error"' in line for line in lines), lines[-3:]
        assert c.get("/health").status_code == 503 and c.get("/ready").status_code == 503
        assert fatal and "engine thread died" in fatal[0]
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["message"]
