"""The Responses API (`POST /v1/responses`): its wire types, its input items → the conversation the pipeline
runs, the formatter of `response` objects and of its streaming events in OpenAI's order, and the bounded
in-memory store behind `previous_response_id` and `GET /v1/responses/{id}`.

Events of a stream: response.created, response.in_progress, then per output item output_item.added,
(a message) content_part.added, output_text.delta…, output_text.done, content_part.done / (a function call)
function_call_arguments.delta…, function_call_arguments.done, then output_item.done; last response.completed
(response.incomplete when max_output_tokens cut it). Every event has a sequence_number.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from server.api.errors import APIError, bad_request
from server.api.formatters import Outputs, Totals
from server.api.prompting import Turn, chat_input
from server.api.schemas import GRAMMAR_CHARS, TOOL_NAME, Off, ParamError, StopParam, _schema, check_tools
from server.api.tools import ToolCall, ToolStream
from server.engine.types import GrammarSpec

if TYPE_CHECKING:
    from server.api.pipeline import Job
    from server.api.prompting import ChatInput


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------ input items


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # output_text of an earlier reply
    logprobs: list | None = None


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="https://… or a data: URL")
    detail: Literal["auto", "low", "high", "original"] = "auto"
    file_id: Off = None

    @model_validator(mode="after")
    def _url(self) -> InputImage:
        if self.image_url is None:
            raise ParamError("image_url", "input_image needs an image_url (file ids: this server has no Files API)")
        return self


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | InputImage | Refusal, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1, max_length=128)
    name: str = Field(..., pattern=TOOL_NAME)
    arguments: str = Field(..., max_length=GRAMMAR_CHARS)
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1, max_length=128)
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]
ITEM_TYPES = ("message", "function_call", "function_call_output")


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = Field(None, max_length=GRAMMAR_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @property
    def parameters_json(self) -> str:
        return json.dumps(self.parameters if self.parameters is not None else {"type": "object", "properties": {}})


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if (self.type == "json_schema") != (self.schema_ is not None):
            raise ValueError("schema goes with type 'json_schema', and only there")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool = True


class ResponsesRequest(_Strict):
    model: str = Field(..., min_length=1)
    input: str | list[Item] = Field(..., description="a user message, or a list of items (messages, function calls "
                                    "and their outputs)")
    instructions: str | None = Field(None, description="a system message (not carried over by previous_response_id)")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool | None = Field(None, description="default true: kept (bounded, in memory) for previous_response_id")
    previous_response_id: str | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    truncation: Literal["disabled"] | None = Field(None, description="'auto' (dropping earlier items) is not supported")
    include: list[str] | None = Field(None, max_length=0, description="not supported: omit or []")
    parallel: Off = None
    reasoning: Off = None
    background: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    top_logprobs: Literal[0] | None = None
    # extensions, as in chat completions
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: StopParam = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    ignore_eos: bool = False
    experts: list[str] | None = None

    _grammar: GrammarSpec | None = PrivateAttr(None)

    @field_validator("input", mode="before")
    @classmethod
    def _types(cls, value: Any) -> Any:
        """Messages may come without a type; unknown item types get a clear refusal."""
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a string or a non-empty list of items")
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"item {i} must be an object")
            kind = item.get("type", "message")
            if kind not in ITEM_TYPES:
                raise ValueError(f"item {i} has type {kind!r}; supported item types: {', '.join(ITEM_TYPES)}")
            items.append({**item, "type": kind})
        return items

    @model_validator(mode="after")
    def _checks(self) -> ResponsesRequest:
        check_tools(self.tools, self.tool_choice)
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_object":
            self._grammar = GrammarSpec("json_object")
        elif fmt is not None and fmt.type == "json_schema":
            self._grammar = _schema(fmt.schema_, "text.format")
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed with stream: true")
        return self

    @property
    def grammar(self) -> GrammarSpec | None:
        return self._grammar

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# ------------------------------------------------------------------------------------ items → turns


def input_turns(req: ResponsesRequest) -> tuple[list[Turn], list[str]]:
    """The request's own items as conversation turns (without the instructions), and its image URLs in order."""
    if isinstance(req.input, str):
        return [Turn("user", req.input)], []
    turns: list[Turn] = []
    urls: list[str] = []
    for item in req.input:
        if isinstance(item, MessageItem):
            parts = [InputText(type="input_text", text=item.content)] if isinstance(item.content, str) else item.content
            texts, before = [], len(urls)
            for part in parts:
                if isinstance(part, InputImage):
                    if item.role != "user":
                        raise bad_request(f"only user messages may contain images, not {item.role} messages", "input")
                    urls.append(part.image_url)
                else:
                    texts.append(part.refusal if isinstance(part, Refusal) else part.text)
            role = "system" if item.role in ("system", "developer") else item.role
            turns.append(Turn(role, "\n".join(t for t in texts if t), len(urls) - before))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            if turns and turns[-1].role == "assistant":  # the calls of one reply go to one assistant turn
                turns[-1] = Turn("assistant", turns[-1].text, tool_calls=(*turns[-1].tool_calls, call))
            else:
                turns.append(Turn("assistant", "", tool_calls=(call,)))
        else:
            output = item.output if isinstance(item.output, str) else "\n".join(p.text for p in item.output)
            turns.append(Turn("tool", output, tool_call_id=item.call_id))
    return turns, urls


class ResponseStore:
    """The last `size` stored responses: the body GET returns and the conversation previous_response_id goes on
    from (the turns before it, its reply, its image URLs). Shared by the event loop only, but cheap to lock."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, tuple[dict, tuple[Turn, ...], tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, body: dict, turns: tuple[Turn, ...], urls: tuple[str, ...]) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items[body["id"]] = (body, turns, urls)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, tuple[Turn, ...], tuple[str, ...]]:
        with self._lock:
            found = self._items.get(response_id)
        if found is None:
            kept = f"the last {self.size} stored responses are kept" if self.size else "no responses are kept here"
            raise APIError(404, f"no stored response with id {response_id!r} ({kept}; store: false ones never)",
                           param=param, code="response_not_found")
        return found

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        with self._lock:
            self._items.pop(response_id, None)


def conversation(req: ResponsesRequest, store: ResponseStore) -> tuple[ChatInput, tuple[Turn, ...]]:
    """The whole conversation of a request (previous responses, instructions, its items), and what of it a
    stored reply carries over (everything but the instructions)."""
    turns, urls = input_turns(req)
    if req.previous_response_id is not None:
        _, before, before_urls = store.get(req.previous_response_id, "previous_response_id")
        turns, urls = [*before, *turns], [*before_urls, *urls]
    carried = tuple(turns)
    head = [Turn("system", req.instructions)] if req.instructions else []
    return chat_input([*head, *turns], urls), carried


# -------------------------------------------------------------------------------------------- formatter


def _usage(totals: Totals, prompt_len: int) -> dict:
    prompt, completion, cached = totals.counts(prompt_len)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


class ResponsesFormat:
    """`response` objects and their event stream; a finished response is stored (unless store: false)."""

    def __init__(self, store: ResponseStore):
        self.store = store

    def _response(self, job: Job, status: str, output: list, usage: dict | None, finish: str | None = None) -> dict:
        e = job.plan.extra
        return {
            "id": job.id, "object": "response", "created_at": job.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "model": job.plan.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": e["instructions"], "max_output_tokens": job.plan.max_tokens,
            "metadata": e["metadata"], "parallel_tool_calls": e["parallel_tool_calls"],
            "previous_response_id": e["previous_response_id"], "store": e["store"],
            "temperature": e["temperature"], "top_p": e["top_p"], "text": e["text"], "tool_choice": e["tool_choice"],
            "tools": e["tools"], "truncation": "disabled", "user": job.plan.user, "usage": usage,
            "background": False, "reasoning": None, "service_tier": "default",
            **({"experts": job.experts_report} if job.experts_report is not None else {}),
        }

    def _items(self, job: Job, text: str, calls: list[ToolCall], finish: str | None) -> list[dict]:
        state = "incomplete" if finish == "length" else "completed"
        items = []
        if text or not calls:
            items.append(_message(_item_id(job, "msg", 0), text, state))
        items += [_call(c, _item_id(job, "fc", k), state) for k, c in enumerate(calls)]
        return items

    def _finish(self, job: Job, text: str, calls: list[ToolCall], totals: Totals) -> dict:
        finish = totals.finish.get(0)
        body = self._response(job, "incomplete" if finish == "length" else "completed",
                              self._items(job, text, calls, finish), _usage(totals, len(job.prompt_ids[0])), finish)
        if job.plan.extra["store"]:
            reply = Turn("assistant", text, tool_calls=tuple(calls))
            self.store.put(body, (*job.plan.extra["carried"], reply), job.plan.chat.image_urls)
        return body

    def body(self, job: Job, totals: Totals) -> dict:
        text, calls = totals.text(0), []
        if job.plan.tools is not None and job.plan.tools.active:
            text, calls = job.plan.tools.parse(text)
        return self._finish(job, text, calls, totals)

    async def events(self, job: Job, outputs: Outputs) -> AsyncIterator[str]:
        seq = iter(range(1 << 62))

        def event(kind: str, **data: Any) -> str:
            payload = {"type": kind, "sequence_number": next(seq), **data}
            return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

        opening = self._response(job, "in_progress", [], None)
        yield event("response.created", response=opening)
        yield event("response.in_progress", response=opening)
        parser = ToolStream() if job.plan.tools is not None and job.plan.tools.active else None
        text, index = "", 0  # the message's text; the output index of the item being written (the last opened)
        open_item: str | None = None  # "message" | "call"
        msg_id = _item_id(job, "msg", 0)
        totals = Totals()

        def open_message() -> list[str]:
            return [event("response.output_item.added", output_index=index,
                          item=_message(msg_id, "", "in_progress", content=False)),
                    event("response.content_part.added", item_id=msg_id, output_index=index, content_index=0,
                          part=_text_part(""))]

        def close_message() -> list[str]:
            return [event("response.output_text.done", item_id=msg_id, output_index=index, content_index=0, text=text,
                          logprobs=[]),
                    event("response.content_part.done", item_id=msg_id, output_index=index, content_index=0,
                          part=_text_part(text)),
                    event("response.output_item.done", output_index=index, item=_message(msg_id, text, "completed"))]

        def close_call(k: int, state: str = "completed") -> list[str]:
            item = _call(parser.calls[k], _item_id(job, "fc", k), state)  # complete: a later call began, or the end
            return [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=item["arguments"], name=item["name"]),
                    event("response.output_item.done", output_index=index, item=item)]

        async for part, out in outputs:
            totals.add(out, part)
            deltas = [("content", out.text)] if parser is None else parser.feed(out.text)
            if out.finished and parser is not None:
                deltas += parser.finish()
            for d in deltas:
                if d[0] == "content" and d[1]:
                    if open_item is None:
                        open_item = "message"
                        for e in open_message():
                            yield e
                    if open_item == "message":
                        text += d[1]
                        yield event("response.output_text.delta", item_id=msg_id, output_index=index, content_index=0,
                                    delta=d[1], logprobs=[])
                elif d[0] == "call":
                    if open_item is not None:
                        for e in close_message() if open_item == "message" else close_call(d[1] - 1):
                            yield e
                        index += 1
                    open_item = "call"
                    item = _call(ToolCall(d[2], d[3], ""), _item_id(job, "fc", d[1]), "in_progress")
                    yield event("response.output_item.added", output_index=index, item=item)
                elif d[0] == "arguments":
                    yield event("response.function_call_arguments.delta", item_id=_item_id(job, "fc", d[1]),
                                output_index=index, delta=d[2])
        finish = totals.finish.get(0)
        calls = list(parser.calls) if parser is not None else []
        if open_item is None and not calls:  # an empty reply is still a message
            open_item = "message"
            for e in open_message():
                yield e
        if open_item == "message":
            for e in close_message():
                yield e
        elif open_item == "call":
            for e in close_call(len(calls) - 1, "incomplete" if finish == "length" else "completed"):
                yield e
        body = self._finish(job, text, calls, totals)  # the same ids as the stream's items
        yield event("response.incomplete" if body["status"] == "incomplete" else "response.completed", response=body)

    def error_events(self, job: Job, err: APIError) -> list[str]:
        payload = {"type": "error", "sequence_number": 0, "code": err.code or err.type, "message": err.message,
                   "param": err.param}
        return [f"event: error\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"]


def _item_id(job: Job, prefix: str, k: int) -> str:
    return f"{prefix}_{job.id.removeprefix('resp_')[:24]}{k:02d}"


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, text: str, status: str, content: bool = True) -> dict:
    parts = [_text_part(text)] if content else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": parts}


def _call(c: ToolCall, item_id: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": c.id, "name": c.name, "arguments": c.arguments,
            "status": status}
