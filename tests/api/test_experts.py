"""Experts in the request path: their findings reach the prompt (within budget), the response reports them
(JSON field and first stream chunk), slow experts get SSE keep-alives, unknown names are a 400."""

from __future__ import annotations

import time

from experts.base import ExpertResult
from experts.run import ExpertRunner
from models.prompts import format_alpaca
from tests.api.conftest import MSG, app_client, data_url, image_message, png_bytes
from tests.api.test_chat import sse_events


class FakeExpert:
    def __init__(self, name: str, text: str, delay: float = 0.0, fail: bool = False):
        self.name, self.text, self.delay, self.fail = name, text, delay, fail
        self.calls = 0

    def run(self, image, question):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return ExpertResult(self.name, self.text)


def test_findings_go_to_the_alpaca_input(tiny, spy_requests):
    runner = ExpertRunner([FakeExpert("labels", "Objects detected: a red square."),
                           FakeExpert("broken", "", fail=True)], timeout=5)
    with app_client(tiny, runner=runner, sse_keepalive=0.05) as c:
        seen = spy_requests(c)
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                  "messages": image_message(data_url(png_bytes()), "what is it?")})
        assert r.status_code == 200, r.text
        body = r.json()
        reports = {e["name"]: e for e in body["experts"]}
        assert reports["labels"]["text"] == "Objects detected: a red square." and reports["labels"]["image"] == 0
        assert reports["broken"]["status"] == "error" and "exploded" in reports["broken"]["error"]
        expected = format_alpaca("what is it?", input="Objects detected: a red square.")
        assert list(seen[0].prompt_ids) == tiny.tokenizer.encode(expected, bos=True)
        assert len(seen[0].images) == 1  # the adapter model also sees the image itself

        # experts: [] turns them off for this request → exactly the no-input template
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "experts": [],
                                                  "messages": image_message(data_url(png_bytes()), "what is it?")})
        assert r.status_code == 200 and "experts" not in r.json()
        assert list(seen[1].prompt_ids) == tiny.tokenizer.encode(format_alpaca("what is it?"), bos=True)

        # text-only requests run no expert
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "messages": MSG})
        assert "experts" not in r.json()

        r = c.post("/v1/chat/completions", json={"model": "tiny", "experts": ["nope"], "messages": MSG})
        assert r.status_code == 400 and r.json()["error"]["param"] == "experts"


def test_findings_are_truncated_to_the_budget(tiny, spy_requests):
    runner = ExpertRunner([FakeExpert("verbose", "word " * 2000)], timeout=5)
    with app_client(tiny, runner=runner, expert_budget=40) as c:
        seen = spy_requests(c)
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                  "messages": image_message(data_url(png_bytes()), "what?")})
        assert r.status_code == 200, r.text
        base = len(tiny.tokenizer.encode(format_alpaca("what?", input=""), bos=True))
        assert len(seen[0].prompt_ids) <= base + 40 + 2
        assert len(seen[0].prompt_ids) + 3 <= 256


def test_stream_reports_experts_first_and_keeps_alive(tiny):
    runner = ExpertRunner([FakeExpert("slow", "Caption: a square.", delay=0.5)], timeout=5)
    with app_client(tiny, runner=runner, sse_keepalive=0.1) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "stream": True,
                                                  "messages": image_message(data_url(png_bytes()), "what?")})
        assert r.status_code == 200
        assert r.text.startswith(": keep-alive\n\n")
        events = sse_events(r.text)
        assert events[0]["experts"][0]["text"] == "Caption: a square."
        assert all("experts" not in e for e in events[1:-1])
        assert events[-1] == "[DONE]"


def test_expert_timeouts_degrade(tiny):
    runner = ExpertRunner([FakeExpert("stuck", "never", delay=2.0)], timeout=0.2)
    with app_client(tiny, runner=runner) as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": image_message(data_url(png_bytes()))})
        assert r.status_code == 200 and r.json()["experts"][0]["status"] == "timeout"
        assert time.monotonic() - t0 < 1.5


def test_images_for_a_blind_model_need_experts(tiny):
    """Without experts, a model that cannot see would silently drop the image: refused instead."""
    from dataclasses import replace

    blind = replace(tiny, model=_Blind(tiny.model))
    with app_client(blind) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(data_url(png_bytes()))})
        assert r.status_code == 400 and r.json()["error"]["code"] == "images_unsupported"


class _Blind:
    """The tiny model, pretending to have no vision path (like the default SmolLM2)."""

    multimodal = False

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)
