"""Several LLaMA-Adapter V2 adapters over one base: `model` picks the adapter; a caption adapter feeds the
caption expert through the engine."""

from __future__ import annotations

import pytest

from models.loading import load_llama_adapter
from tests.api.conftest import MSG, app_client, data_url, image_message, png_bytes
from tests.models.conftest import REF


@pytest.fixture(scope="module")
def two_adapters():
    return load_llama_adapter(
        llama_dir=REF / "llama" / "tiny", tokenizer_path=REF / "tokenizer.model",
        adapters={"BIAS-TINY": REF / "adapter.pth", "CAPTION-TINY": REF / "adapter.pth"},
        clip_model=str(REF / "clip-tiny.json"), clip_weights=REF / "clip-tiny.pt")


def test_model_selects_the_adapter(two_adapters):
    with app_client(two_adapters) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["BIAS-TINY", "CAPTION-TINY"]
        engine = c.app.state.runtime.engine
        seen = []
        generate = engine.generate
        engine.generate = lambda request, reservation=None: (seen.append(request), generate(request, reservation))[1]
        outs = {}
        for model in ("BIAS-TINY", "CAPTION-TINY"):
            r = c.post("/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 4,
                                                      "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == model
            outs[model] = r.json()["choices"][0]["message"]["content"]
        assert [s.adapter for s in seen] == ["BIAS-TINY", "CAPTION-TINY"]
        assert outs["BIAS-TINY"] == outs["CAPTION-TINY"]  # same weights in both banks → same greedy text
        assert c.post("/v1/chat/completions", json={"model": "LLaMA-7B", "messages": MSG}).status_code == 404


def test_caption_expert_runs_on_the_caption_adapter(two_adapters):
    """The real `caption` entry point, built by the app, with the engine-backed generate_caption."""
    with app_client(two_adapters, experts=["caption"], caption_adapter="CAPTION-TINY", expert_timeout=30) as c:
        engine = c.app.state.runtime.engine
        seen = []
        generate = engine.generate
        engine.generate = lambda request, reservation=None: (seen.append(request), generate(request, reservation))[1]
        r = c.post("/v1/chat/completions", json={"model": "BIAS-TINY", "max_tokens": 3,
                                                  "messages": image_message(data_url(png_bytes()))})
        assert r.status_code == 200, r.text
        (caption,) = r.json()["experts"]
        assert caption["name"] == "caption" and caption["status"] == "ok", caption
        assert [s.adapter for s in seen] == ["CAPTION-TINY", "BIAS-TINY"]
        assert len(seen[0].images) == 1 and seen[0].sampling.temperature == 0.0
