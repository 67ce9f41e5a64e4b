"""The official `openai` client, unmodified, against a live uvicorn on 127.0.0.1: plain, streaming, images,
extra sampling knobs, errors."""

from __future__ import annotations

import openai
import pytest

from server.app import create_app
from tests.api.conftest import data_url, live_server, png_bytes, settings


@pytest.fixture(scope="module")
def client(tiny):
    app = create_app(settings(api_keys=["sk-test"]), loaded=tiny)
    with live_server(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, timeout=30)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_plain_and_streaming_agree(client):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
          "max_completion_tokens": 6, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 6
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_chat_with_image_and_extensions(client):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes()), "detail": "high"}}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=3,
                                       extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True)
    assert any(c.choices[0].finish_reason for c in stream)


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert len(list(client.completions.create(model="tiny", prompt="Once", max_tokens=3, stream=True))) >= 1


def test_errors_map_to_client_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "yaml"})
    assert e.value.body["param"] == "response_format.type"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
