"""Tool calling: the reply parser (whole and streamed in any chunking), the prompt (generic section, and a
template that takes tools), and the official openai client against the real app on the default model
(SmolLM2-135M-Instruct): every call's arguments validate against its function's schema, streamed deltas add up
to the same calls, tool_choice none / auto / required / named and parallel_tool_calls are honoured, and a
conversation with tool results goes on."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from models.loading import load_gguf
from models.prompts import ChatTemplate
from server.api.prompting import PromptBuilder, Turn, chat_input
from server.api.tools import Tool, ToolCall, ToolSet, ToolStream
from server.app import create_app
from tests.api.conftest import live_server, settings

pytestmark = pytest.mark.timeout(600)

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
MODEL = "SmolLM2-135M-Instruct"

REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "celsius", '
         '"days": 3}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n'
         '</tool_call>')


def _merge(events):
    content = "".join(e[1] for e in events if e[0] == "content")
    names = [(e[1], e[3]) for e in events if e[0] == "call"]
    args: dict[int, str] = {}
    for e in events:
        if e[0] == "arguments":
            args[e[1]] = args.get(e[1], "") + e[2]
    return content, names, args


def test_the_parser_gives_the_same_calls_in_any_chunking():
    whole = ToolStream()
    expected = _merge(whole.feed(REPLY) + whole.finish())
    assert expected[0] == "Let me look.\n"
    assert expected[1] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(expected[2][0]) == {"city": 'Pa"ris}', "unit": "celsius", "days": 3}
    assert expected[2][1] == '{"timezone": "Europe/Paris"}'
    assert [c.arguments for c in whole.calls] == [expected[2][0], expected[2][1]]
    for cut in range(1, len(REPLY)):  # every split in two
        s = ToolStream()
        assert _merge(s.feed(REPLY[:cut]) + s.feed(REPLY[cut:]) + s.finish()) == expected, cut
    s = ToolStream()  # one character at a time
    assert _merge([e for ch in REPLY for e in s.feed(ch)] + s.finish()) == expected


def test_the_parser_keeps_text_and_a_call_cut_short():
    s = ToolStream()
    assert _merge(s.feed("a < b, and <tool") + s.finish()) == ("a < b, and <tool", [], {})
    s = ToolStream()
    content, names, args = _merge(s.feed('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Eu') + s.finish())
    assert (content, names, args[0]) == ("", [(0, "get_time")], '{"timezone": "Eu')
    s = ToolStream()  # not a call we can read: it stays text
    assert _merge(s.feed("<tool_call>oops</tool_call> fine") + s.finish())[0] == "<tool_call>oops</tool_call> fine"


def _toolset(choice="auto", named=None, parallel=True):
    return ToolSet(tuple(Tool(t["function"]["name"], t["function"]["description"],
                              json.dumps(t["function"]["parameters"])) for t in TOOLS), choice, named, parallel)


def test_prompts_carry_the_tools_and_the_history():
    history = chat_input([Turn("user", "Weather in Paris?"),
                          Turn("assistant", "", tool_calls=(ToolCall("call_1", "get_weather",
                                                                     '{"city": "Paris", "unit": "celsius", "days": 1}'),)),
                          Turn("tool", "sunny, 21 C", tool_call_id="call_1"), Turn("tool", "windy", tool_call_id="call_1")],
                         [])
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    generic = PromptBuilder("chat", chatml, _Tok(), 4096).render(history, None, _toolset())
    assert generic.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert '"name": "get_weather"' in generic and "<tools>" in generic
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius", "days": 1}}\n</tool_call><|im_end|>') in generic
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\nwindy\n" in generic
    native = ("{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
              "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
              "{% for c in m.get('tool_calls', []) %}[{{ c['function']['name'] }}({{ c['function']['arguments']['city'] }})]"
              "{% endfor %}{% if m.get('tool_call_id') %}<{{ m['tool_call_id'] }}>{% endif %}\n{% endfor %}")
    text = PromptBuilder("chat", native, _Tok(), 4096).render(history, None, _toolset("function", "get_time"))
    assert text == ("TOOLS:get_time;user:Weather in Paris?assistant:[get_weather(Paris)]"  # trim_blocks: no newlines
                    "tool:sunny, 21 C<call_1>tool:windy<call_1>")
    assert ChatTemplate(native).takes_tools and not ChatTemplate(chatml).takes_tools
    alpaca = PromptBuilder("alpaca", None, _Tok(), 4096).render(history, None, _toolset())
    assert "### Instruction:\nWeather in Paris?" in alpaca and "Tool: <tool_response>\nsunny, 21 C" in alpaca
    assert "# Tools" in alpaca


class _Tok:
    bos_id, eos_id, add_bos = None, 0, False

    def encode(self, text, bos=False):
        return list(text.encode())


# ------------------------------------------------------------------------------ the real app


@pytest.fixture(scope="module")
def client():
    app = create_app(settings(max_context=2048, max_batch=4), loaded=load_gguf(dtype="fp32"))
    with live_server(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def _check_calls(calls, names=SCHEMAS):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_calls_always_validate(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
                                       temperature=1.0, seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls)


def test_a_named_function_and_no_parallel_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=1.0, seed=4,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       parallel_tool_calls=False, n=3)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, names={"get_time"})


def test_streamed_deltas_add_up_to_the_same_calls(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or ():
                if d.id is not None:  # the first delta of a call: its id, type and name
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]


def test_auto_answers_or_calls_validly_and_none_never_calls(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0,
                                           seed=seed)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls)
        else:
            assert choice.message.content and not choice.message.content.startswith("<tool_call>")
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=30,
                                          temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_a_conversation_with_tool_results_goes_on(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=0).choices[0].message
    messages = [*ASK, first.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"forecast": "sunny", "high": 21})}
                 for c in first.tool_calls]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    assert r.choices[0].message.content


def test_tools_with_a_json_answer_format(client):
    answer = {"type": "object", "properties": {"reply": {"type": "string", "maxLength": 40}}, "required": ["reply"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS, max_tokens=120,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": answer}})
    m = r.choices[0].message
    if m.tool_calls:
        _check_calls(m.tool_calls)
    else:
        jsonschema.validate(json.loads(m.content), answer)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=5,
                                       response_format={"type": "json_object"})
