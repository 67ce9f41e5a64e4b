"""Structured outputs through the official openai client against the real app on the default model
(SmolLM2-135M-Instruct): response_format json_schema / json_object and vLLM's structured_outputs (choice, regex,
json, grammar). The output always parses and validates, streamed or not, and constrained and free requests
share the batch."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import openai
import pytest

from models.loading import load_gguf
from server.app import create_app
from tests.api.conftest import live_server, settings

pytestmark = pytest.mark.timeout(600)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "colour", "tags", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person who lives in a city, as JSON."}]


@pytest.fixture(scope="module")
def client():
    app = create_app(settings(max_context=1024, max_batch=4), loaded=load_gguf(dtype="fp32"))
    with live_server(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(client, temperature):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=300, seed=3,
                                       temperature=temperature, response_format=_schema_format(PERSON))
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_validates(client):
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=300,
                                            temperature=0.7, seed=11, stream=True,
                                            response_format=_schema_format(PERSON))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_vllm_structured_outputs(client):
    obj = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=200,
                                         temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    ask = [{"role": "user", "content": "Is the sea salty? Answer."}]
    choice = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask, max_tokens=10, n=3,
                                            temperature=1.0, seed=5,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert {c.message.content for c in choice.choices} <= {"yes", "no", "maybe"}
    regex = client.completions.create(model="SmolLM2-135M-Instruct", prompt="A date: ", max_tokens=20, temperature=0,
                                      extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.choices[0].text), regex.choices[0].text
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
    arr = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Some numbers: ", max_tokens=60,
                                    temperature=0, extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(arr.choices[0].text), schema)
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "red" | "blue"'
    g = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Colour?", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"grammar": lark}})
    assert g.choices[0].text in ("The answer is red.", "The answer is blue.")


def test_constrained_and_free_requests_share_the_batch(client):
    """Four requests at once, two constrained: the free ones are untouched by the others' masks (the same text
    as alone, greedy) and the constrained ones validate."""
    free = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Say something nice."}],
            "max_tokens": 24, "temperature": 0}
    alone = client.chat.completions.create(**free).choices[0].message.content
    results = {}

    def run(key, **kw):
        results[key] = client.chat.completions.create(**kw).choices[0].message.content

    threads = [threading.Thread(target=run, args=(f"free{i}",), kwargs=free) for i in range(2)]
    threads += [threading.Thread(target=run, args=(f"json{i}",), kwargs={
        "model": "SmolLM2-135M-Instruct", "messages": ASK, "max_tokens": 300, "temperature": 0.8, "seed": i,
        "response_format": _schema_format(PERSON)}) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["free0"] == results["free1"] == alone
    for i in range(2):
        jsonschema.validate(json.loads(results[f"json{i}"]), PERSON)


def test_bad_constraints_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "([a-z"}})
    with pytest.raises(openai.BadRequestError, match="exactly one"):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    with pytest.raises(openai.BadRequestError, match="send one"):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=5,
                                       response_format={"type": "json_object"},
                                       extra_body={"structured_outputs": {"choice": ["b"]}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=5,
                                       response_format={"type": "json_schema"})


def test_a_sentencepiece_adapter_model_is_constrained_too(tiny):
    """The LLaMA-Adapter path (SentencePiece vocabulary, random tiny weights): its gibberish still obeys."""
    from tests.api.conftest import app_client

    with app_client(tiny) as c:
        for temperature in (0, 1.0):
            r = c.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                "temperature": temperature, "seed": 1, "structured_outputs": {"regex": "[a-e]{2,4}:(yes|no)"}})
            assert r.status_code == 200, r.text
            assert re.fullmatch("[a-e]{2,4}:(yes|no)", r.json()["choices"][0]["message"]["content"]), r.json()
        # '-' is no token of this 128-token vocabulary: the choice ends where the grammar needs it
        r = c.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
            "structured_outputs": {"regex": "[a-e]{2}-x"}})
        out = r.json()["choices"][0]
        assert r.status_code == 200 and out["finish_reason"] == "stop" and re.fullmatch("[a-e]{2}", out["message"]["content"])
