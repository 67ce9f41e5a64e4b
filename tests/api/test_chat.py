"""OpenAI conformance of /v1/chat/completions, /v1/completions and /v1/models against the real app."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import MSG, app_client


@pytest.fixture(scope="module")
def client(tiny):
    with app_client(tiny) as c:
        yield c


def sse_events(text: str) -> list:
    """Parse an SSE body into JSON events (and the literal "[DONE]"); comments are dropped."""
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, **body})


def test_models_lists_every_adapter(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert {"id", "object", "created", "owned_by"} <= set(body["data"][0])
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/v1/models/nope").status_code == 404


def test_non_streaming_shape(client):
    r = chat(client, max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 1 <= u["completion_tokens"] <= 5
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_is_honoured(client, field):
    body = chat(client, temperature=0, ignore_eos=True, **{field: 3}).json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_tokens_disagreeing_is_refused(client):
    r = chat(client, max_tokens=3, max_completion_tokens=4)
    assert r.status_code == 400 and "max_completion_tokens" in r.json()["error"]["message"]


def test_streaming_conformance(client):
    r = chat(client, max_tokens=6, temperature=0, ignore_eos=True, stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert all(reason is None for reason in reasons[:-1])  # null (never "" or missing) until the end
    assert all("finish_reason" in c["choices"][0] for c in chunks)
    assert reasons[-1] == "length"
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    plain = chat(client, max_tokens=6, temperature=0, ignore_eos=True).json()
    assert text == plain["choices"][0]["message"]["content"]  # greedy: stream == non-stream


def test_include_usage(client):
    r = chat(client, max_tokens=4, temperature=0, ignore_eos=True, stream=True,
             stream_options={"include_usage": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)  # present and null on every other chunk
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["id"] == chunks[0]["id"]


def test_stream_options_needs_stream(client):
    r = chat(client, stream_options={"include_usage": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_n_choices(client):
    body = chat(client, n=2, max_tokens=3, temperature=0.8, seed=1, ignore_eos=True).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6
    events = sse_events(chat(client, n=2, max_tokens=3, seed=1, stream=True, ignore_eos=True).text)
    finished = [c["choices"][0]["index"] for c in events[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]
    roles = [c["choices"][0]["index"] for c in events[:-1] if c["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1]


def test_seed_is_reproducible(client):
    a = chat(client, max_tokens=8, temperature=1.0, seed=7).json()["choices"][0]["message"]["content"]
    b = chat(client, max_tokens=8, temperature=1.0, seed=7).json()["choices"][0]["message"]["content"]
    assert a == b


def test_stop_sequence_not_in_output(client):
    text = chat(client, max_tokens=12, temperature=0, ignore_eos=True).json()["choices"][0]["message"]["content"]
    assert len(text.strip()) >= 3, text  # 12 greedy tokens of the tiny model: always some text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip())  # never at the start
    body = chat(client, max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]).json()
    out = body["choices"][0]
    assert stop not in out["message"]["content"] and out["finish_reason"] == "stop"
    assert out["message"]["content"] == text[: text.index(stop)]


def test_logprobs(client):
    body = chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2, ignore_eos=True).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(content[0])
    assert len(content[0]["top_logprobs"]) == 2
    assert chat(client, top_logprobs=2).status_code == 400  # needs logprobs: true
    assert chat(client, logprobs=True, top_logprobs=21).status_code == 400


def test_completions(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 4,
                                               "temperature": 0, "ignore_eos": True})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    echo = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 4,
                                                  "temperature": 0, "echo": True, "ignore_eos": True}).json()
    assert echo["choices"][0]["text"] == "Once upon" + body["choices"][0]["text"]
    lp = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2,
                                                "logprobs": 2, "ignore_eos": True}).json()
    assert len(lp["choices"][0]["logprobs"]["tokens"]) == 2
    stream = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 4,
                                                    "temperature": 0, "stream": True, "ignore_eos": True})
    events = sse_events(stream.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]
    assert all(e["object"] == "text_completion" for e in events[:-1])
    refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "echo": True, "logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    empty = client.post("/v1/completions", json={"model": "tiny", "prompt": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"


def _completion(client, prompt, **kw):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True, **kw}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def test_a_batch_of_prompts_gives_one_choice_per_prompt_and_n_in_order(client):
    """OpenAI's batch: choices go prompt by prompt, n per prompt; each equals the prompt sent alone."""
    prompts = ["Once upon", "The sea is", "Hello there"]
    alone = [_completion(client, p).json() for p in prompts]
    body = _completion(client, prompts, n=2).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for i, c in enumerate(body["choices"]):
        assert c["text"] == alone[i // 2]["choices"][0]["text"] and c["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == 6 * 3
    echo = _completion(client, prompts, echo=True).json()
    texts = [c["text"] for c in echo["choices"]]
    assert texts == [p + a["choices"][0]["text"] for p, a in zip(prompts, alone, strict=True)]
    events = [e for e in sse_events(_completion(client, prompts, stream=True, echo=True,
                                                  stream_options={"include_usage": True}).text) if e != "[DONE]"]
    streamed: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert streamed == dict(enumerate(texts))
    assert events[-1]["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]
    ids = [[5, 6, 7], [9, 10]]  # token-id prompts batch too
    assert [c["text"] for c in _completion(client, ids).json()["choices"]] == \
        [_completion(client, p).json()["choices"][0]["text"] for p in ids]


def test_usage_reports_the_prefix_cache_hit(client):
    prompt = "A prompt no other test sends, about prefix caching and usage."
    first = _completion(client, prompt).json()["usage"]
    again = _completion(client, prompt, stream=True, stream_options={"include_usage": True})
    usage = [e for e in sse_events(again.text) if e != "[DONE]"][-1]["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["prompt_tokens_details"]["cached_tokens"] == first["prompt_tokens"] - 1  # all but the last token
    chat_usage = chat(client, max_tokens=2).json()["usage"]
    assert set(chat_usage["prompt_tokens_details"]) == {"cached_tokens"}


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "messages": MSG, "frobnicate": 1}, "frobnicate"),
    ({"model": "tiny", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    ({"model": "tiny", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f g"}}]},
     "tools[0].function.name"),
    ({"model": "tiny", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"model": "tiny", "messages": MSG, "tool_choice": "required"}, "tool_choice"),
    ({"model": "tiny", "messages": MSG + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"model": "tiny", "messages": MSG, "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"model": "tiny", "messages": MSG, "structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"model": "tiny", "messages": MSG, "temperature": 3}, "temperature"),
    ({"model": "tiny", "messages": MSG, "n": 0}, "n"),
    ({"model": "tiny", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "tiny", "messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "tiny", "messages": MSG, "logit_bias": {"100000": 1}}, "logit_bias"),
    ({"model": "tiny", "messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"model": "tiny"}, "messages"),
    ({"messages": MSG}, "model"),
    ({"model": "tiny", "messages": MSG, "max_tokens": 100000}, "messages"),
    ({"model": "tiny", "messages": MSG, "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"model": "tiny", "messages": MSG, "stop_token_ids": [100000]}, "stop_token_ids"),
])
def test_bad_parameters_are_refused_by_name(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"]


def test_min_tokens_and_stop_token_ids(client):
    first = _completion(client, "a cat", max_tokens=6)
    ids = client.post("/tokenize", json={"prompt": first.json()["choices"][0]["text"],
                                         "add_special_tokens": False}).json()["tokens"]
    stopped = _completion(client, "a cat", max_tokens=6, stop_token_ids=ids[:1], ignore_eos=False).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    held = _completion(client, "a cat", max_tokens=6, stop_token_ids=ids[:1], min_tokens=4).json()
    assert held["usage"]["completion_tokens"] >= 4


def test_neutral_values_of_unsupported_parameters_pass(client):
    r = chat(client, max_tokens=2, tools=None, tool_choice="none", store=False, response_format={"type": "text"},
             user="someone")
    assert r.status_code == 200, r.text


def test_context_error_has_the_numbers(client):
    err = chat(client, max_tokens=100000).json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "256" in err["message"] and "100000" in err["message"]


def test_unknown_model_is_404(client):
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_non_json_and_non_object_bodies(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert client.post("/v1/chat/completions", json=[1, 2]).status_code == 400
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_error_after_the_stream_began_is_an_error_event(tiny):
    from server.engine.types import RequestOutput

    with app_client(tiny) as c:
        engine = c.app.state.runtime.engine

        async def failing(request, reservation=None):
            reservation.release()
            yield RequestOutput(request.request_id, 0, "partial", (5,), prompt_tokens=3, completion_tokens=1)
            yield RequestOutput(request.request_id, 0, "", (), finished=True, finish_reason="error")

        engine.generate = failing
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[1]["choices"][0]["delta"]["content"] == "partial"
        assert set(events[-2]["error"]) == {"message", "type", "param", "code"}
        assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        plain = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
        assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_error"
        assert engine.stats().waiting == 0  # the reservation was not leaked


def test_what_openai_python_2_sends_is_accepted(client):
    """stream_options.include_obfuscation, prompt_cache_retention and assistant refusal parts (each was a 400)."""
    r = chat(client, max_tokens=2, stream=True, stream_options={"include_usage": True, "include_obfuscation": False},
             prompt_cache_retention="24h")
    assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
               {"role": "user", "content": "then describe the image"}]
    assert chat(client, messages=history, max_tokens=2).status_code == 200
    bad = [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]
    r = chat(client, messages=bad, max_tokens=2)
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]


def test_a_conversation_may_end_with_a_system_message(client):
    msgs = [{"role": "user", "content": "describe the image"}, {"role": "system", "content": "Answer briefly."}]
    assert chat(client, messages=msgs, max_tokens=2).status_code == 200
    r = chat(client, messages=[{"role": "system", "content": "only a system message"}], max_tokens=2)
    assert r.status_code == 400 and "user message" in r.json()["error"]["message"]


def test_an_empty_body_says_what_is_missing(client):
    r = client.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "None" not in err["message"] and "empty" in err["message"]


def test_a_batch_gets_a_place_for_every_prompt_or_none(tiny):
    """Each prompt takes a waiting-queue place: a batch larger than the queue is refused whole (429), and the
    places it took on the way are given back."""
    with app_client(tiny, max_waiting=2) as c:
        refused = c.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 1})
        assert refused.status_code == 429, refused.text
        for _ in range(2):  # nothing leaked: a batch that fits still runs, twice
            ok = c.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 1})
            assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_tokenize_and_detokenize_match_what_requests_send(client):
    """vLLM's shapes: the ids /tokenize gives are the ones a completion or chat request prefills."""
    prompt = "the sea is here"  # within the tiny vocabulary: it round-trips
    tok = client.post("/tokenize", json={"model": "tiny", "prompt": prompt, "return_token_strs": True}).json()
    used = _completion(client, prompt).json()["usage"]["prompt_tokens"]
    assert tok["count"] == len(tok["tokens"]) == used and len(tok["token_strs"]) == tok["count"]
    assert tok["max_model_len"] == client.get("/v1/models").json()["data"][0]["max_model_len"] > 0
    chat_tok = client.post("/tokenize", json={"messages": MSG}).json()
    assert chat_tok["count"] == chat(client, max_tokens=1).json()["usage"]["prompt_tokens"]
    plain = client.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert plain["count"] <= tok["count"]
    assert client.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": prompt}
    for body, param in (({"prompt": "x", "messages": MSG}, "prompt"), ({}, "prompt"),
                        ({"messages": MSG, "add_generation_prompt": False}, "add_generation_prompt")):
        r = client.post("/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    r = client.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_an_assistant_message_last_is_continued(tiny, spy_requests):
    """The prompt ends with the assistant's partial message (Alpaca: after "### Response:"); the completion is
    what follows it, greedy: the same tokens as a completion of that prompt text."""
    from models.prompts import format_alpaca

    with app_client(tiny) as c:
        seen = spy_requests(c)
        messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue and"}]
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4,
                                                  "temperature": 0, "ignore_eos": True, "experts": []})
        assert r.status_code == 200, r.text
        want = tiny.tokenizer.encode(format_alpaca("Name a colour.") + "Blue and", bos=True)
        assert list(seen[0].prompt_ids) == want
        plain = c.post("/v1/completions", json={"model": "tiny", "prompt": want, "max_tokens": 4, "temperature": 0,
                                                 "ignore_eos": True}).json()
        assert r.json()["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


def test_include_stop_str_in_output(client):
    """vLLM's include_stop_str_in_output: the stop string that ended the choice stays at the end of its text,
    streamed or not; a stop_token_ids token's text too."""
    text = chat(client, max_tokens=12, temperature=0, ignore_eos=True).json()["choices"][0]["message"]["content"]
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip())
    kw = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop], "include_stop_str_in_output": True}
    out = chat(client, **kw).json()["choices"][0]
    assert out["finish_reason"] == "stop" and out["message"]["content"] == text[: text.index(stop) + len(stop)]
    events = sse_events(chat(client, stream=True, **kw).text)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == out["message"]["content"]
    first = _completion(client, "a cat", max_tokens=6)
    ids = client.post("/tokenize", json={"prompt": first.json()["choices"][0]["text"],
                                         "add_special_tokens": False}).json()["tokens"]
    kept = _completion(client, "a cat", max_tokens=6, stop_token_ids=ids[:1], include_stop_str_in_output=True).json()
    assert kept["usage"]["completion_tokens"] == 1 and kept["choices"][0]["finish_reason"] == "stop"
    token_text = client.post("/detokenize", json={"tokens": ids[:1]}).json()["prompt"]
    assert kept["choices"][0]["text"] == token_text != ""


@pytest.mark.parametrize("text", ["hello", " ", "é\u00e9 日本語 🙂", 'quo"te \\ back', "new\nline\ttab\r", "\x00\x1f\x7f",
                                  "\u2028\u2029", "\x00lamina-text\x00"])
def test_a_streamed_text_delta_is_the_same_bytes_as_the_full_encoding(text):
    """The streamed deltas are encoded through TextEvents (the event around the text encoded once): byte for
    byte what encoding the whole event gives, for any text."""
    from server.api.streaming import TextEvents, sse

    def make(index, t):
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "system_fingerprint": None, "usage": None,
                "choices": [{"index": index, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]}

    events = TextEvents(make)
    for index in (0, 3, 0):
        assert events(index, text) == sse(make(index, text))
    odd = TextEvents(lambda index, t: {"model": TextEvents._MARK, "text": t})  # the mark stands elsewhere too
    assert odd(0, text) == sse({"model": TextEvents._MARK, "text": text})
