"""A small stand-in for Lamina's HTTP API, for browser tests that need exact control: the models list, a slow
SSE token stream with an `experts` report (OCR lines, detections with boxes, a caption) in the first chunk,
API-key checks, scripted errors, and a record of every request and of client disconnects.

Triggers in the last user message's text: "FAIL" → HTTP 400 before the stream; "MIDERR" → an error event
after a few tokens; "SLOW" → a long stream (for stopping it)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

import server.ui

# What the real experts reported for tests/data/images/ocr/photo-overlay.jpg (768×576), in its pixels.
REF_SIZE = (768, 576)
OCR = {"type": "OcrLine", "text": "Max, 3 years old", "score": 0.99, "box": [23.0, 14.0, 368.0, 66.0]}
DETECTIONS = [
    {"type": "Detection", "label": "car", "score": 0.585, "box": [471.6, 81.4, 683.0, 165.9]},
    {"type": "Detection", "label": "bicycle", "score": 0.541, "box": [109.7, 124.3, 565.4, 443.3]},
    {"type": "Detection", "label": "dog", "score": 0.415, "box": [124.0, 206.9, 312.6, 542.7]},
]
CAPTION = "A picture of a car, a bicycle and a dog, with the text \"Max, 3 years old\"."
ANSWER = ("The photo shows a dog sitting in front of a bicycle, with a car parked behind them. "
          "The text at the top reads \"Max, 3 years old\", so the dog is probably called Max.")


@dataclass
class Recorder:
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    tokens_sent: int = 0
    disconnected: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)


def _image_size(url: str) -> tuple[int, int]:
    data = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _scaled(item: dict, size: tuple[int, int]) -> dict:
    sx, sy = size[0] / REF_SIZE[0], size[1] / REF_SIZE[1]
    x1, y1, x2, y2 = item["box"]
    return {**item, "box": [x1 * sx, y1 * sy, x2 * sx, y2 * sy]}


def expert_reports(image_urls: list[str]) -> list[dict]:
    reports = []
    for i, url in enumerate(image_urls):
        size = _image_size(url)
        dets = [_scaled(d, size) for d in DETECTIONS]
        reports += [
            {"image": i, "name": "ocr", "text": f"Text in image (OCR):\n1. {OCR['text']}", "seconds": 0.7768,
             "status": "ok", "error": None, "data": [_scaled(OCR, size)]},
            {"image": i, "name": "detection",
             "text": "Objects detected (position, confidence): 1 car (top right 59%), 1 bicycle (centre 54%), "
                     "1 dog (left 41%)", "seconds": 0.278, "status": "ok", "error": None, "data": dets},
            {"image": i, "name": "caption", "text": f"Caption (from object detection and OCR): {CAPTION}",
             "seconds": 0.0001, "status": "ok", "error": None,
             "data": [{"type": "Caption", "text": CAPTION, "source": "grounded"}]},
        ]
    return reports


def create_fake_app(api_key: str | None = None, token_delay: float = 0.04) -> tuple[FastAPI, Recorder]:
    app = FastAPI()
    rec = Recorder()
    app.state.recorder = rec
    app.include_router(server.ui.router)

    def unauthorized(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "invalid or missing API key: send `Authorization: Bearer "
                                           "<key>`", "type": "authentication_error", "param": None,
                                           "code": "invalid_api_key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "lamina"}
                                           for m in ("BIAS-7B", "CAPTION-7B")]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        rec.requests.append(body)
        rec.headers.append(dict(request.headers))
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last if p["type"] == "text")
        if "FAIL" in text:
            return JSONResponse({"error": {"message": "the model 'nope' does not exist", "type":
                                           "invalid_request_error", "param": "model", "code": "model_not_found"}},
                                status_code=400)
        urls = [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image_url"]
        run_experts = bool(urls) and body.get("experts") != []
        words = ANSWER.split(" ")
        if "SLOW" in text:
            words = words * 20
        words = words[: body.get("max_tokens") or len(words)]
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"]}

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            try:
                yield ": keep-alive\n\n"
                if run_experts:
                    await asyncio.sleep(0.3)  # the experts "work"
                first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]}
                if run_experts:
                    first["experts"] = expert_reports(urls)
                yield sse(first)
                for i, word in enumerate(words):
                    if "MIDERR" in text and i == 5:
                        yield sse({"error": {"message": "the engine failed while generating", "type":
                                             "server_error", "param": None, "code": "engine_error"}})
                        yield "data: [DONE]\n\n"
                        return
                    await asyncio.sleep(token_delay)
                    rec.tokens_sent += 1
                    yield sse({**base, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word},
                                                    "finish_reason": None}]})
                finish = "length" if len(words) == body.get("max_tokens") else "stop"
                yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield sse({**base, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": len(words),
                                                                "total_tokens": 50 + len(words)}})
                yield "data: [DONE]\n\n"
                rec.completed.set()
            except (asyncio.CancelledError, GeneratorExit):
                rec.disconnected.set()
                raise

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app, rec
