"""The chat page against the real app (`server.app.create_app`) on a live uvicorn: the tiny LLaMA-Adapter
reference model (vocabulary of 128, so its text is gibberish) with the real default experts (OCR, detection,
grounded caption) and an API key; and stopping a long generation cancels it in the engine."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

import server.ui
from server.app import create_app
from server.settings import Settings
from tests.models.conftest import load_reference
from tests.ui.conftest import IMAGES, live_server, poll, screenshot, wait_until

PHOTO = IMAGES / "ocr" / "photo-overlay.jpg"  # a dog, a bicycle, a car and the text "Max, 3 years old"
KEY = "sk-real-ui"


@pytest.fixture(scope="module")
def tiny():
    return load_reference()


def make_app(**kw):
    base = {"max_context": 256, "max_batch": 2, "max_waiting": 4, "sse_keepalive": 0.2, "api_keys": [KEY]}
    loaded, engine = kw.pop("loaded", None), kw.pop("engine", None)
    app = create_app(Settings(**{**base, **kw}), loaded=loaded, engine=engine)
    if not any(getattr(r, "path", None) == "/" for r in app.routes):  # until the app includes the page itself
        app.include_router(server.ui.router)
    return app


def _open(probe):
    page = probe.page
    page.goto(probe.base + "/")
    page.wait_for_selector("#api-key:visible")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    page.wait_for_selector("#model option:not([value=''])", state="attached")
    page.click("#settings-toggle")  # (it closed once the key worked) for temperature and max tokens
    page.wait_for_selector("#settings:visible")
    return page


def _state(page, n: int = 1):
    return page.evaluate("(n) => document.querySelectorAll('.msg.assistant')[n - 1]?.dataset.state", n)


def test_real_app_streams_an_answer_and_shows_the_real_experts(tiny, open_page):
    app = make_app(loaded=tiny, experts=["ocr", "detection", "caption"])
    auth = {"Authorization": f"Bearer {KEY}"}
    with live_server(app, ready_path="/ready", headers=auth) as base:
        probe = open_page(base)
        page = _open(probe)
        assert page.locator("#model option").all_inner_texts() == ["tiny"]
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        page.press("#max-tokens", "Tab")
        page.set_input_files("#file", str(PHOTO))
        page.wait_for_selector("#attachment:not([hidden])")
        page.fill("#prompt", "What is the dog's name?")
        page.press("#prompt", "Enter")
        poll(page, "() => ['done', 'error', 'stopped'].includes("
                   "document.querySelector('.msg.assistant')?.dataset.state)", timeout=120)
        answer = page.locator(".msg.assistant").first
        assert _state(page) == "done", answer.inner_text()
        assert answer.locator(".text").inner_text().strip(), "no text streamed"
        assert "tokens" in answer.locator(".meta").inner_text()

        reports = {n: answer.locator(f".report[data-expert={n}]") for n in ("ocr", "detection", "caption")}
        assert all(r.count() == 1 for r in reports.values()), answer.inner_text()
        assert "Max, 3 years old" in reports["ocr"].inner_text()
        assert "dog" in reports["detection"].inner_text()
        assert "dog" in reports["caption"].inner_text()
        assert "ms" in reports["ocr"].locator(".report-time").inner_text() or \
            " s" in reports["ocr"].locator(".report-time").inner_text()
        screenshot(page, "chat-real-app.png")
        assert probe.external == []
        assert probe.console_errors(allow=("status of 401",)) == []

        # boxes need the structured `data` of each expert in the server's report
        body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "?"},
            {"type": "image_url", "image_url": {"url": page.evaluate(
                "() => document.querySelector('.msg.user img').src")}}]}]}
        report = httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=60).json()["experts"]
        detection = next(r for r in report if r["name"] == "detection")
        assert detection["data"], detection  # the boxes the page draws come from here
        boxes = answer.locator(".figure .box:not(.text-box)")
        assert boxes.count() == len(detection["data"]) and answer.locator(".box[data-label=dog]").count() >= 1


def test_stop_cancels_the_generation_on_the_server(tiny, open_page):
    """The real engine, paced (0.1 s per token, end-of-sequence ignored) by a wrapper around its generate():
    after Stop, the server must close the generation at once instead of running to max_tokens."""
    app = make_app(loaded=tiny, experts=[])
    progress = {"active": 0, "yielded": 0, "requests": []}

    def pace(engine):
        generate = engine.generate

        async def paced(request, reservation=None):
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, ignore_eos=True))
            progress["requests"].append(request)
            progress["active"] += 1
            try:
                async for out in generate(request, reservation):
                    progress["yielded"] += 1
                    yield out
                    await asyncio.sleep(0.1)
            finally:
                progress["active"] -= 1

        engine.generate = paced

    with live_server(app, ready_path="/ready") as base:
        pace(app.state.runtime.engine)
        probe = open_page(base)
        page = _open(probe)
        page.fill("#max-tokens", "100")  # 10 s if it ran to the end
        page.press("#max-tokens", "Tab")
        page.fill("#prompt", "Talk for a long time.")
        page.press("#prompt", "Enter")
        poll(page, "() => (document.querySelector('.msg.assistant .text')?.textContent || '').length > 5")
        assert progress["active"] == 1
        page.click("#stop")
        poll(page, "() => document.querySelector('.msg.assistant').dataset.state === 'stopped'")
        wait_until(lambda: progress["active"] == 0, 3, message="the server to close the cancelled generation")
        (request,) = progress["requests"]
        assert request.sampling.max_tokens == 100 and progress["yielded"] < 60, progress
        assert page.locator("#send").is_visible()
        assert probe.console_errors(allow=("status of 401",)) == []
