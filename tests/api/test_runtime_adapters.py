"""Adapters loaded and unloaded while serving (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter) on the
tiny LLaMA-Adapter reference: off by default; a loaded adapter answers exactly as when loaded at start and batches
with the others at once; the loader's errors are 400s; paths stay inside --adapter-dir; an unloaded adapter's
stream finishes, then its id is a 404, and its row serves the next adapter with nothing left of the old one; a
server can start with the base and CLIP alone."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import openai
import pytest
import torch

from server.app import create_app
from tests.api.conftest import app_client, live_server, settings
from tests.models.conftest import REF, load_reference

pytestmark = pytest.mark.timeout(300)
PROMPT = "Describe the picture."


def _model_settings(**kw):
    return {"llama_dir": REF / "llama" / "tiny", "tokenizer": REF / "tokenizer.model",
            "clip_model": str(REF / "clip-tiny.json"), "clip_weights": REF / "clip-tiny.pt", "dtype": "fp32", **kw}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tiny2.pth: the reference adapter with its biases and gates scaled (answers differently); tiny-copy.pth:
    the reference adapter itself; not-an-adapter.pt: the CLIP weights."""
    d = tmp_path_factory.mktemp("adapters")
    ck = torch.load(REF / "adapter.pth", weights_only=True)
    sd = {k: v * 1.7 if k.startswith("llama.") and (".bias" in k or "gate" in k) else v for k, v in ck["model"].items()}
    torch.save({"model": sd, "config": ck["config"]}, d / "tiny2.pth")
    shutil.copy(REF / "adapter.pth", d / "tiny-copy.pth")
    shutil.copy(REF / "clip-tiny.pt", d / "not-an-adapter.pt")
    return d


def _complete(client, model, max_tokens=6, **kw):
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                             "temperature": 0, "ignore_eos": True, "logprobs": 1, **kw})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def _until(call, done, timeout=60.0):
    """`call()` again until `done(result)` (an unloaded row frees when the engine next looks), or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = call()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def _same(a, b):
    assert a[0] == b[0]
    assert max(abs(x - y) for x, y in zip(a[1], b[1], strict=True)) < 1e-4


@pytest.fixture(scope="module")
def expected(files):
    """Greedy completions of servers that loaded each adapter at start."""
    out = {}
    with app_client(load_reference()) as c:
        out["tiny"] = _complete(c, "tiny")
    with app_client(load_reference(adapters={"tiny2": files / "tiny2.pth"})) as c:
        out["tiny2"] = _complete(c, "tiny2")
    with app_client(load_reference(adapters={})) as c:
        out["base"] = _complete(c, "tiny")  # the plain base model (served under its folder's name)
    return out


def test_off_unless_allowed(tiny):
    with app_client(tiny) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp/x.pth"})
        assert r.status_code == 403 and "--allow-runtime-adapters" in r.json()["error"]["message"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "tiny"}).status_code == 403


def test_load_batch_unload_and_reuse(files, expected):
    app = create_app(settings(**_model_settings(adapters={"tiny": REF / "adapter.pth"}, allow_runtime_adapters=True,
                                                adapter_dir=files, max_runtime_adapters=1, served_model_name="base")))
    with live_server(app) as base:
        c = httpx.Client(base_url=base, timeout=60)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "tiny"]
        _same(_complete(c, "base"), expected["base"])  # the base row is the base model
        _same(_complete(c, "tiny"), expected["tiny"])  # warms the prefix cache of a row for this prompt

        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)  # the README's way
        assert oai.post("/load_lora_adapter", cast_to=object, body={"lora_name": "tiny2", "lora_path": "tiny2.pth"}) \
            == {"object": "adapter", "id": "tiny2", "status": "loaded"}
        assert [m.id for m in oai.models.list()] == ["base", "tiny", "tiny2"]
        _same(_complete(c, "tiny2"), expected["tiny2"])
        r = oai.completions.create(model="tiny2", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                   extra_body={"ignore_eos": True})
        _same((r.choices[0].text, r.choices[0].logprobs.token_logprobs), expected["tiny2"])

        results = {}  # the three batch together, each as alone
        threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, _complete(c, m)))
                   for m in ("tiny", "tiny2", "base")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for m in ("tiny", "tiny2", "base"):
            _same(results[m], expected[m])

        # refusals: each by name, nothing loaded
        for body, status, param, words in [
            ({"lora_name": "tiny3", "lora_path": "tiny-copy.pth"}, 400, "lora_name", "rows are in use"),
            ({"lora_name": "tiny2", "lora_path": "tiny-copy.pth"}, 400, "lora_name", "loaded already"),
            ({"lora_name": "x", "lora_path": str(REF / "adapter.pth")}, 403, "lora_path", "inside the adapter folder"),
            ({"lora_name": "x", "lora_path": "../adapters/../x.pth"}, 403, "lora_path", "inside"),
            ({"lora_name": "x y", "lora_path": "tiny2.pth"}, 400, "lora_name", ""),
        ]:
            r = c.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text

        # unload while a stream of tiny2 runs: the stream finishes, then tiny2 is a 404
        with c.stream("POST", "/v1/completions", json={"model": "tiny2", "prompt": PROMPT, "max_tokens": 60,
                                                       "temperature": 0, "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "tiny2"}).status_code == 200
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        chunks = [json.loads(first[6:]), *rest]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "error" not in chunks[-1]
        assert c.post("/v1/completions", json={"model": "tiny2", "prompt": PROMPT}).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "tiny2"}).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "base"}).status_code == 400

        # the freed row takes the next adapter (retrying until the stream's row has retired), and nothing of
        # tiny2 is left in it: its retained K/V for this very prompt must not serve the new adapter
        r = _until(lambda: c.post("/v1/load_lora_adapter", json={"lora_name": "tiny3", "lora_path": "tiny-copy.pth"}),
                   lambda r: r.status_code == 200)
        assert r.status_code == 200, r.text
        _same(_complete(c, "tiny3"), expected["tiny"])

        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "tiny3"}).status_code == 200
        r = _until(lambda: c.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "not-an-adapter.pt"}),
                   lambda r: "rows are in use" not in r.text)  # the loader's own message, once the row is free
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        assert "not a LLaMA-Adapter checkpoint" in r.json()["error"]["message"]


def test_start_with_the_base_alone_and_keys_required(files, expected):
    app = create_app(settings(**_model_settings(allow_runtime_adapters=True, runtime_query_len=5,
                                                runtime_query_layer=3, api_keys=["k"])))
    with live_server(app, headers={"Authorization": "Bearer k"}) as base:
        c = httpx.Client(base_url=base, timeout=60, headers={"Authorization": "Bearer k"})
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]  # the base, by its folder
        _same(_complete(c, "tiny"), expected["base"])
        body = {"lora_name": "tiny2", "lora_path": str(files / "tiny2.pth")}  # no --adapter-dir: any path
        assert httpx.post(f"{base}/v1/load_lora_adapter", json=body).status_code == 401
        assert c.post("/v1/load_lora_adapter", json=body).status_code == 200
        _same(_complete(c, "tiny2"), expected["tiny2"])


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_an_installed_row_is_the_adapter_loaded_at_start(files, quantization):
    """Engine level, plain and quantized (the fused CPU forward): the row written while serving gives the same
    logprobs as a model that loaded the adapter at start, and the base row the plain base model's."""
    from pathlib import Path

    from models.loading import RuntimeBanks, read_runtime_adapter
    from server.engine.core import EngineConfig, EngineCore
    from server.engine.types import GenerateRequest, SamplingParams

    def run(loaded, adapter_id, install=None):
        core = EngineCore.from_config(loaded, EngineConfig(max_context=64, max_batch=2))
        if install is not None:
            core.install_adapter(*install)
        req = GenerateRequest("r", (1, 5, 9, 20, 33), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                      logprobs=True))
        outs = core.generate_all([(req, adapter_id)])["r"]
        return [t for o in outs for t in o.token_ids], [lp.logprob for o in outs for lp in o.logprobs]

    rt = load_reference(runtime=RuntimeBanks(2, lora_rank=4, base_name="base"), quantization=quantization)
    assert rt.adapter_names == ("base", "tiny") and rt.model.llama.args.n_adapters == 4
    assert (rt.model.llama.fused is not None) == (quantization == "int8")
    row, visual = read_runtime_adapter(rt.model, "tiny2", Path(files / "tiny2.pth"))
    _same(run(rt, 2, (2, row, visual)), run(load_reference(adapters={"tiny2": files / "tiny2.pth"},
                                                           quantization=quantization), 0))
    _same(run(rt, 1), run(load_reference(quantization=quantization), 0))
    _same(run(rt, 0), run(load_reference(adapters={}, quantization=quantization), 0))
