"""The Responses API through the official openai client (`responses.create`, `responses.stream`,
`responses.parse`) against the real app on the default model, and with images on the tiny LLaMA-Adapter model:
events in OpenAI's order, structured output, function calls and their outputs, the store behind
previous_response_id and GET / DELETE, max_output_tokens, and refusals by name."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest

from models.loading import load_gguf
from server.app import create_app
from tests.api.conftest import app_client, data_url, live_server, png_bytes, settings

pytestmark = pytest.mark.timeout(600)
MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The forecast for a city", "parameters": WEATHER}]


@pytest.fixture(scope="module")
def served():
    app = create_app(settings(max_context=2048, max_batch=4, response_store=8), loaded=load_gguf(dtype="fp32"))
    with live_server(app) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def test_create_with_instructions_and_usage(served):
    _, client = served
    r = client.responses.create(model=MODEL, instructions="Answer in one short sentence.",
                                input="What is the capital of France?", max_output_tokens=40, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 40
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer in one short sentence." and r.temperature == 0


def test_stream_events_in_order_add_up_to_the_response(served):
    base, client = served
    kw = dict(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Name three fruits."}]}],
              max_output_tokens=30, temperature=0)
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == client.responses.create(**kw).output_text
    with httpx.stream("POST", f"{base}/v1/responses", json={**kw, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if final.status == "incomplete" else "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


def test_structured_output_with_parse(served):
    _, client = served
    r = client.responses.parse(model=MODEL, input="Describe a person as JSON.", text_format=Person,
                               max_output_tokens=80, temperature=0)
    assert isinstance(r.output_parsed, Person)
    obj = client.responses.create(model=MODEL, input="Describe a person who lives in a city, as JSON.",
                                  max_output_tokens=300, temperature=0, text={"format": {"type": "json_object"}})
    assert obj.status == "completed", obj.output_text
    assert isinstance(json.loads(obj.output_text), dict)


def test_function_calls_then_their_outputs_via_the_store(served):
    base, client = served
    r = client.responses.create(model=MODEL, input="What is the weather in Paris for 2 days?", tools=TOOLS,
                                tool_choice="required", max_output_tokens=120, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id.startswith("call_") for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), WEATHER)
    with client.responses.stream(model=MODEL, input="What is the weather in Paris for 2 days?", tools=TOOLS,
                                 tool_choice="required", max_output_tokens=120, temperature=0) as stream:
        args = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        streamed = stream.get_final_response()
    assert [o.arguments for o in streamed.output if o.type == "function_call"] == [c.arguments for c in calls]
    assert args == "".join(c.arguments for c in calls)
    follow = client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=TOOLS, tool_choice="none", max_output_tokens=30,
        temperature=0, input=[{"type": "function_call_output", "call_id": c.call_id, "output": '{"sky": "sunny"}'}
                              for c in calls])
    assert follow.output_text and follow.previous_response_id == r.id
    # the same conversation sent whole gives the same reply: previous_response_id carried it over
    items = [{"type": "message", "role": "user", "content": "What is the weather in Paris for 2 days?"},
             *[{"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls],
             *[{"type": "function_call_output", "call_id": c.call_id, "output": '{"sky": "sunny"}'} for c in calls]]
    whole = client.responses.create(model=MODEL, input=items, tools=TOOLS, tool_choice="none", max_output_tokens=30,
                                    temperature=0, store=False)
    assert whole.output_text == follow.output_text
    assert httpx.get(f"{base}/v1/responses/{follow.id}").json()["output"][0]["content"][0]["text"] == follow.output_text
    assert httpx.get(f"{base}/v1/responses/{whole.id}").status_code == 404  # store: false
    assert client.responses.delete(follow.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)


def test_incomplete_and_refusals(served):
    base, client = served
    r = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3, temperature=0,
                                extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    for body, param in [
        ({"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"model": MODEL, "input": [{"type": "reasoning", "summary": []}]}, "input"),
        ({"model": MODEL, "input": "hi", "truncation": "auto"}, "truncation"),
        ({"model": MODEL, "input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"model": "nope", "input": "hi"}, "model"),
    ]:
        resp = httpx.post(f"{base}/v1/responses", json=body, timeout=30)
        assert resp.status_code in (400, 404), (body, resp.text)
        assert resp.json()["error"]["param"] == param, (body, resp.text)


@pytest.fixture(scope="module")
def client(tiny):
    with app_client(tiny) as c:
        yield c


def test_images_on_the_adapter_model(client):
    body = {"model": "tiny", "max_output_tokens": 4, "temperature": 0, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": data_url(png_bytes())}]}]}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] > 0 and r.json()["output"][0]["type"] == "message"
    bad = client.post("/v1/responses", json={**body, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]})
    assert bad.status_code == 400 and "image" in bad.json()["error"]["message"].lower()


def test_stream_items_for_text_then_two_calls_in_one_delta():
    """The formatter alone, on a scripted reply whose last delta ends the first call and holds the whole second:
    each item opens and closes at its own output index, with the ids and arguments the final response has."""
    import asyncio

    from server.api.pipeline import Admission, Job, Plan, Prompt
    from server.api.prompting import Turn, chat_input
    from server.api.responses import ResponsesFormat, ResponseStore
    from server.api.tools import Tool, ToolSet
    from server.engine.types import RequestOutput, SamplingParams

    tools = ToolSet((Tool("get_weather", None, json.dumps(WEATHER)),))
    echo = {k: None for k in ("instructions", "previous_response_id", "temperature", "top_p")}
    echo.update(metadata={}, parallel_tool_calls=True, store=False, text={"format": {"type": "text"}},
                tool_choice="auto", tools=[], carried=())
    plan = Plan(kind="responses", model="m", adapter=None, sampling=SamplingParams(), prompts=(Prompt((1, 2)),),
                chat=chat_input([Turn("user", "x")], []), tools=tools, stream=True, extra=echo)
    job = Job(plan, 0.0, [Admission(None)])
    pieces = ['Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
              'ris", "days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
              '"days": 1}}\n</tool_call>']

    async def outputs():
        for i, text in enumerate(pieces):
            last = i == len(pieces) - 1
            yield 0, RequestOutput("r", 0, text, (7,), finished=last, finish_reason="stop" if last else None,
                                   prompt_tokens=2, completion_tokens=i + 1)

    async def collect():
        return [json.loads(e.split("data: ", 1)[1]) async for e in ResponsesFormat(ResponseStore(0)).events(job,
                                                                                                       outputs())]

    events = asyncio.run(collect())
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me check.\n"
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in added] == [e["output_index"] for e in done] == [0, 1, 2]
    assert [e["item"] for e in done] == final["output"]
    for k, item in enumerate(final["output"][1:], start=1):
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                  and e["output_index"] == k]
        assert "".join(deltas) == item["arguments"] and json.loads(item["arguments"])["days"] == 3 - k
        assert added[k]["item"]["id"] == item["id"] and added[k]["item"]["call_id"] == item["call_id"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
