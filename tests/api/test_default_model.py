"""`lamina serve` as a user runs it: the embedded SmolLM2 with the OCR, detection and caption experts;
a question, a photo, SIGTERM. Also: a broken model path exits 1 with the loader's message."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.net import free_port

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
LAMINA = str(Path(sys.executable).with_name("lamina"))



def _variant(path: Path, i: int) -> str:
    """The photo cropped a little differently each time, as base64 JPEG."""
    import io

    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    buf = io.BytesIO()
    im.crop((i * 4, 0, w - i * 4, h)).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def clean_env() -> dict:
    """The caller's environment without LAMINA_* settings (LAMINA_DATA_DIR, where expert assets live, stays)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_") or k == "LAMINA_DATA_DIR"}


@pytest.mark.slow
def test_lamina_serve_default_model_with_experts(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([LAMINA, "serve", "--port", str(port), "--max-context", "2048"], stdout=log,
                            stderr=subprocess.STDOUT, env=clean_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{base}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        log.seek(0)
        assert ready is not None and ready.status_code == 200, log.read()
        (model,) = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
        assert model == "SmolLM2-135M-Instruct"

        r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": model, "temperature": 0, "max_tokens": 30,
            "messages": [{"role": "user", "content": "What is the capital of Japan?"}]})
        assert "Tokyo" in r.json()["choices"][0]["message"]["content"]

        photo = base64.b64encode((IMAGES / "horses.jpg").read_bytes()).decode()
        r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": model, "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What animals are in this photo?"},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}}]}]})
        body = r.json()
        experts = {e["name"]: e for e in body["experts"]}
        assert set(experts) == {"ocr", "detection", "caption"}
        assert experts["detection"]["status"] == "ok" and "horse" in experts["detection"]["text"]
        assert "horse" in body["choices"][0]["message"]["content"].lower()  # grounded in what the experts saw
        # 8 image requests at once (8 different images: no expert cache hits) all keep their experts
        bursts = [_variant(IMAGES / "horses.jpg", i) for i in range(8)]

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json={
                    "model": model, "temperature": 0, "max_tokens": 4, "experts": ["ocr", "detection"],
                    "messages": [{"role": "user", "content": [
                        {"type": "text", "text": "What is in this photo?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b}"}}]}]})
                    for b in bursts))

        for r in asyncio.run(burst()):
            assert r.status_code == 200, r.text
            assert [(e["name"], e["status"]) for e in r.json()["experts"]] == [("ocr", "ok"), ("detection", "ok")]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'stage="expert:detection"' in metrics
        queued = [line for line in metrics.splitlines()
                  if line.startswith('lamina:expert_queue_time_seconds_count{expert="ocr"}')]
        assert queued and float(queued[0].split()[-1]) >= 9  # the photo above, then the 8 of the burst
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.close()
    assert code == 0


def test_a_broken_model_path_exits_1(tmp_path):
    port = free_port()
    r = subprocess.run([LAMINA, "serve", "--port", str(port), "--llama-dir", str(tmp_path), "--tokenizer",
                        str(tmp_path / "tokenizer.model"), "--experts", "none"],
                       capture_output=True, text=True, timeout=120, env=clean_env())
    assert r.returncode == 1
    assert "startup failed" in r.stderr
