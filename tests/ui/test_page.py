"""The chat page at `/`, in a real headless browser (Debian's chromium via Playwright), against a stand-in API
(`fake_api.py`) that gives exact control over the stream, the experts' report and errors.
The same page against the real app and the tiny reference model: `test_real_app.py`."""

from __future__ import annotations

import base64
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import server.ui
from tests.ui.conftest import IMAGES, live_server, poll, screenshot, wait_until
from tests.ui.fake_api import ANSWER, DETECTIONS, OCR, REF_SIZE, create_fake_app

PHOTO = IMAGES / "ocr" / "photo-overlay.jpg"  # 768×576: a dog, a bicycle, a car and the text "Max, 3 years old"
KEY = "sk-test-ui"


def test_page_and_assets_are_self_contained():
    app = FastAPI()
    app.include_router(server.ui.router)
    with TestClient(app) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert refs and all(r.startswith("/ui/") for r in refs), refs
        types = {"/ui/app.js": "text/javascript", "/ui/app.css": "text/css", "/ui/icon.svg": "image/svg+xml"}
        for path, media in types.items():
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
            # nothing from elsewhere: no absolute URL in any asset (fonts, scripts, styles, images)
            assert not re.search(r"https?://|url\(\s*['\"]?//", r.text.replace("http://www.w3.org/2000/svg", "")), path
            assert "@import" not in r.text and "@font-face" not in r.text
        assert c.get("/ui/nope.js").status_code == 404
        assert c.get("/ui/..%2f__init__.py").status_code == 404
        assert c.get("/ui/index.html").status_code == 404  # only the listed assets


@pytest.fixture
def fake():
    app, rec = create_fake_app(api_key=KEY)
    with live_server(app) as base:
        yield base, rec


def _ready(probe, key: str | None = KEY):
    """Open the page; if a key is given, expect the key prompt, enter it and wait for the models."""
    page = probe.page
    page.goto(probe.base + "/")
    if key:
        poll(page, "() => document.getElementById('server-status').textContent.includes('API key')")
        assert page.locator("#settings").is_visible()
        page.fill("#api-key", key)
        page.press("#api-key", "Tab")  # 'change' → stored and the models reloaded
    page.wait_for_selector("#model option:not([value=''])", state="attached")
    return page


def _answer(page, n: int = 1):
    return page.locator(".msg.assistant").nth(n - 1)


def _wait_state(page, n: int, states: tuple[str, ...] = ("done",), timeout: float = 20_000):
    poll(page, "([n, states]) => { const m = document.querySelectorAll('.msg.assistant')[n - 1];"
               " return !!m && states.includes(m.dataset.state); }", [n, list(states)], timeout / 1000)


def test_upload_ask_stream_and_see_the_experts(fake, open_page):
    base, rec = fake
    probe = open_page(base)
    page = _ready(probe)
    assert page.locator("#model option").all_inner_texts() == ["BIAS-7B", "CAPTION-7B"]
    assert page.locator("#settings").is_hidden()  # opened to ask for the key, closed once it worked
    page.select_option("#model", "CAPTION-7B")
    page.click("#settings-toggle")
    assert page.locator("#settings").is_visible()
    page.fill("#temperature", "0.7")
    page.fill("#max-tokens", "200")
    page.press("#max-tokens", "Tab")
    page.click("#settings-toggle")
    assert page.locator("#settings").is_hidden()

    page.set_input_files("#file", str(PHOTO))
    page.wait_for_selector("#attachment:not([hidden])")
    assert "768×576" in page.inner_text("#attachment-info")
    page.fill("#prompt", "What is in this photo, and what is the dog's name?")
    page.press("#prompt", "Enter")

    # while it streams: Stop replaces Send, the experts' panel arrives first, then text grows token by token
    page.wait_for_selector("#stop:visible")
    assert page.locator("#send").is_hidden()
    answer = _answer(page)
    page.wait_for_selector(".msg.assistant details.experts[open]")
    poll(page, "() => document.querySelector('.msg.assistant .text').textContent.split(' ').length >= 3")
    partial = answer.locator(".text").inner_text()
    assert answer.get_attribute("data-state") == "streaming" and 0 < len(partial) < len(ANSWER)
    assert ANSWER.startswith(partial)
    _wait_state(page, 1)
    assert answer.locator(".text").inner_text() == ANSWER
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    assert page.locator("#attachment").is_hidden() and page.input_value("#prompt") == ""

    # the experts: each report with its time, OCR text, the caption, detections as labelled boxes
    reports = answer.locator(".report")
    assert reports.count() == 3
    assert answer.locator(".report[data-expert=ocr]").inner_text().count("Max, 3 years old") >= 1
    assert answer.locator(".report[data-expert=ocr] .report-time").inner_text() == "777 ms"
    assert answer.locator(".report[data-expert=detection] .report-time").inner_text() == "278 ms"
    assert answer.locator(".report[data-expert=caption] .report-time").inner_text() == "<1 ms"
    assert "OCR 777 ms · Detection 278 ms · Caption <1 ms" in answer.locator("details.experts summary").inner_text()
    assert f"{len(ANSWER.split())} tokens" in answer.locator(".meta").inner_text()  # from the usage chunk
    assert "a bicycle and a dog" in answer.locator(".report[data-expert=caption]").inner_text()
    chips = answer.locator(".report[data-expert=detection] .items li").all_inner_texts()
    assert [c.split()[0] for c in chips] == ["car", "bicycle", "dog"] and "59%" in chips[0]
    boxes = answer.locator(".figure .box")
    assert boxes.count() == len(DETECTIONS) + 1
    assert answer.locator(".box.text-box").get_attribute("data-label") == OCR["text"]

    # the boxes sit where the detector put them, scaled from image pixels to the displayed image
    img = answer.locator(".figure img").bounding_box()
    for det in DETECTIONS:
        got = answer.locator(f".box[data-label='{det['label']}']").bounding_box()
        x1, y1, x2, y2 = det["box"]
        sx, sy = img["width"] / REF_SIZE[0], img["height"] / REF_SIZE[1]
        expected = (img["x"] + x1 * sx, img["y"] + y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy)
        actual = (got["x"], got["y"], got["width"], got["height"])
        assert all(abs(a - e) <= 1.5 for a, e in zip(actual, expected, strict=True)), (det["label"], actual, expected)
    # hovering a detection highlights its box
    answer.locator(".report[data-expert=detection] .items li", has_text="dog").hover()
    assert "hl" in answer.locator(".box[data-label=dog]").get_attribute("class")

    # what the server received
    body, headers = rec.requests[0], rec.headers[0]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert body["model"] == "CAPTION-7B" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.7 and body["max_tokens"] == 200 and "experts" not in body
    (msg,) = body["messages"]
    assert msg["role"] == "user" and [p["type"] for p in msg["content"]] == ["text", "image_url"]
    assert msg["content"][0]["text"] == "What is in this photo, and what is the dog's name?"
    url = msg["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,") and base64.b64decode(url.split(",", 1)[1])[:2] == b"\xff\xd8"

    shot = screenshot(page, "chat.png")
    print(f"screenshot: {shot}")

    # a second turn: the whole conversation goes back, the earlier image's experts panel starts collapsed
    page.fill("#prompt", "What colour is the car?")
    page.click("#send")
    _wait_state(page, 2)
    second = rec.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == ANSWER and second[2]["content"] == "What colour is the car?"
    assert second[0]["content"][1]["image_url"]["url"] == url
    assert _answer(page, 2).locator("details.experts").count() == 1
    assert _answer(page, 2).locator("details.experts").get_attribute("open") is None
    assert page.locator(".msg.user").count() == 2

    # settings survive a reload (the key too: no prompt this time)
    page.reload()
    _ready(probe, key=None)
    assert page.input_value("#model") == "CAPTION-7B" and page.input_value("#max-tokens") == "200"
    assert page.input_value("#temperature") == "0.7" and page.input_value("#api-key") == KEY

    # "New chat" clears the conversation
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    _wait_state(page, 1)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()

    assert probe.external == [], "the page requested something outside the server"
    assert probe.console_errors(allow=("status of 401",)) == []  # the key prompt; no CSP or script error


def test_stop_aborts_the_stream_and_the_server_sees_the_disconnect(fake, open_page):
    base, rec = fake
    probe = open_page(base)
    page = _ready(probe)
    page.fill("#prompt", "Tell me a long story. SLOW")
    page.press("#prompt", "Enter")
    poll(page, "() => document.querySelector('.msg.assistant .text').textContent.split(' ').length >= 4")
    page.click("#stop")
    _wait_state(page, 1, ("stopped",))
    wait_until(rec.disconnected.is_set, 5, message="the server to see the client disconnect")
    assert not rec.completed.is_set()
    sent = rec.tokens_sent
    answer = _answer(page)
    partial = answer.locator(".text").inner_text()
    assert partial and "Stopped" in answer.locator(".meta").inner_text()
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    page.wait_for_timeout(500)
    assert rec.tokens_sent == sent, "the server kept generating after the stop"

    # the partial answer stays in the conversation
    page.fill("#prompt", "Go on.")
    page.press("#prompt", "Enter")
    _wait_state(page, 2)
    roles = [(m["role"], m["content"]) for m in rec.requests[1]["messages"]]
    assert roles == [("user", "Tell me a long story. SLOW"), ("assistant", partial), ("user", "Go on.")]

    # Escape stops too
    page.fill("#prompt", "Again. SLOW")
    page.press("#prompt", "Enter")
    poll(page, "() => document.querySelectorAll('.msg.assistant')[2]?.querySelector('.text').textContent.length > 0")
    page.keyboard.press("Escape")
    _wait_state(page, 3, ("stopped",))

    # "New chat" in the middle of a generation stops it and starts afresh
    page.fill("#prompt", "Once more. SLOW")
    page.press("#prompt", "Enter")
    poll(page, "() => document.querySelectorAll('.msg.assistant')[3]?.querySelector('.text').textContent.length > 0")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#send").is_visible()
    page.fill("#prompt", "Fresh start.")
    page.press("#prompt", "Enter")
    _wait_state(page, 1)
    assert [m["content"] for m in rec.requests[-1]["messages"]] == ["Fresh start."]
    assert page.locator(".msg").count() == 2
    assert probe.console_errors(allow=("status of 401",)) == []  # the key prompt


_PNG_JS = """async ([b64, how]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], 'shot.png', { type: 'image/png' }));
  if (how === 'paste') window.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true }));
  else {
    document.body.dispatchEvent(new DragEvent('dragenter', { dataTransfer: dt, bubbles: true }));
    document.body.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
    document.body.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }
}"""


def test_paste_drop_experts_off_and_errors(fake, open_page):
    base, rec = fake
    probe = open_page(base)
    page = _ready(probe)
    png = base64.b64encode((IMAGES / "text.png").read_bytes()).decode()

    page.evaluate(_PNG_JS, [png, "paste"])
    page.wait_for_selector("#attachment:not([hidden])")
    assert "shot.png" in page.inner_text("#attachment-info")
    page.click("#attachment-remove")
    assert page.locator("#attachment").is_hidden()

    page.evaluate(_PNG_JS, [png, "drop"])
    page.wait_for_selector("#attachment:not([hidden])")
    assert page.locator("#drop-overlay").is_hidden()

    # experts switched off → "experts": [] and no panel; PNGs stay PNG (sharp text for OCR)
    page.click("#settings-toggle")
    page.uncheck("#use-experts")
    page.fill("#prompt", "Read it.")
    page.press("#prompt", "Enter")
    _wait_state(page, 1)
    body = rec.requests[0]
    assert body["experts"] == []
    assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert _answer(page, 1).locator("details.experts").count() == 0

    # an HTTP error: shown in the answer, the question and image come back to the composer, not in the history
    page.set_input_files("#file", str(PHOTO))
    page.wait_for_selector("#attachment:not([hidden])")
    page.fill("#prompt", "FAIL please")
    page.press("#prompt", "Enter")
    _wait_state(page, 2, ("error",))
    assert "does not exist" in _answer(page, 2).locator(".error").inner_text()
    assert page.input_value("#prompt") == "FAIL please" and page.locator("#attachment").is_visible()

    # an error event mid-stream: the partial text stays, the error is shown
    page.fill("#prompt", "MIDERR")
    page.press("#prompt", "Enter")
    _wait_state(page, 3, ("error",))
    assert "engine failed" in _answer(page, 3).locator(".error").inner_text()
    assert _answer(page, 3).locator(".text").inner_text().startswith("The photo shows")
    roles = [m["role"] for m in rec.requests[-1]["messages"]]
    assert roles == ["user", "assistant", "user"]  # the failed turn was not sent again

    # a wrong key: the settings open and the key field is flagged
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Tab")
    page.wait_for_selector(".key-field.needed")
    assert probe.external == []
    assert probe.console_errors(allow=("status of 401", "status of 400")) == []  # the browser logs failed fetches
