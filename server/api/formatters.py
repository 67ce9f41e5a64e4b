"""The format stage: engine deltas → one API shape's JSON body or SSE events. One formatter per shape (Chat
Completions and Completions here, the Responses API in server/api/responses.py); the pipeline calls `body` for a
plain response and `events` for a stream, and `error_events` when a stream fails after its 200."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from server.api.errors import APIError, error_body
from server.api.streaming import TextEvents, sse
from server.api.tools import ToolStream
from server.engine.types import RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from server.api.pipeline import Job

Outputs = AsyncIterator[tuple[int, RequestOutput]]  # (prompt, delta) from the pipeline's generate stage


class Formatter(Protocol):
    def body(self, job: Job, totals: Totals) -> dict: ...
    def events(self, job: Job, outputs: Outputs) -> AsyncIterator[str]: ...
    def error_events(self, job: Job, err: APIError) -> list[str]: ...


@dataclass
class Totals:
    """A request's deltas added up, per choice (and per prompt for the usage)."""

    pieces: dict[int, list[str]] = field(default_factory=dict)  # joined once, by `text` (not per delta)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)  # per prompt of a batch
    cached_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, out: RequestOutput, part: int = 0) -> None:
        self.pieces.setdefault(out.index, []).append(out.text)
        self.logprobs.setdefault(out.index, []).extend(out.logprobs)
        self.completion_tokens[out.index] = max(self.completion_tokens.get(out.index, 0),
                                                out.completion_tokens)
        self.prompt_tokens[part] = max(self.prompt_tokens.get(part, 0), out.prompt_tokens)
        self.cached_tokens[part] = max(self.cached_tokens.get(part, 0), out.cached_tokens)
        if out.finished:
            self.finish[out.index] = out.finish_reason

    def text(self, index: int) -> str:
        return "".join(self.pieces.get(index, ()))

    @property
    def indices(self) -> list[int]:
        return sorted(set(self.pieces) | set(self.finish)) or [0]

    def counts(self, prompt_len: int) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens."""
        return (sum(self.prompt_tokens.values()) or prompt_len, sum(self.completion_tokens.values()),
                sum(self.cached_tokens.values()))

    def usage(self, prompt_len: int) -> dict:
        prompt, completion, cached = self.counts(prompt_len)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(reason: str | None, tool_calls: bool = False) -> str | None:
    """Engine reasons → OpenAI's (`stop` | `length` | `tool_calls`); never "" or a non-OpenAI value."""
    if reason is None:
        return None
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict:
    return {"content": [{
        "token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)}
                         for (_, t, v), b in zip(lp.top, lp.top_bytes, strict=True)],
    } for lp in items], "refusal": None}


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> dict:
    offsets, pos = [], offset
    for lp in items:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for _, t, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


def _prompt_len(job: Job) -> int:
    return sum(len(ids) for ids in job.prompt_ids)


class ChatFormat:
    """/v1/chat/completions: `chat.completion` bodies and `chat.completion.chunk` events, tool calls included."""

    def _base(self, job: Job, obj: str) -> dict:
        return {"id": job.id, "object": obj, "created": job.created, "model": job.plan.model,
                "system_fingerprint": None}

    def body(self, job: Job, totals: Totals) -> dict:
        tools = job.plan.tools
        choices = []
        for i in totals.indices:
            text, calls = totals.text(i), []
            if tools is not None and tools.active:
                text, calls = tools.parse(text)
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None,
                                       "refusal": None}
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            choices.append({
                "index": i, "message": message,
                "logprobs": chat_logprobs(totals.logprobs.get(i, [])) if job.plan.sampling.logprobs else None,
                "finish_reason": finish_reason(totals.finish.get(i), bool(calls)),
            })
        body = {**self._base(job, "chat.completion"), "choices": choices, "usage": totals.usage(_prompt_len(job))}
        if job.experts_report is not None:
            body["experts"] = job.experts_report
        return body

    async def events(self, job: Job, outputs: Outputs) -> AsyncIterator[str]:
        base = {**self._base(job, "chat.completion.chunk"), **({"usage": None} if job.plan.include_usage else {})}

        def event(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> dict:
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
            return sse(event(index, delta, finish, logprobs))

        content = TextEvents(lambda index, text: event(index, {"content": text}))
        tools = job.plan.tools if job.plan.tools is not None and job.plan.tools.active else None
        parsers = {i: ToolStream() for i in range(job.n_choices)} if tools else {}
        for i in range(job.n_choices):  # every choice opens with the role (the first also the experts)
            first = {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            if i == 0 and job.experts_report is not None:
                first["experts"] = job.experts_report
            yield sse(first)
        totals = Totals()
        async for part, out in outputs:
            totals.add(out, part)
            lp = chat_logprobs(out.logprobs) if job.plan.sampling.logprobs and out.logprobs else None
            if tools is None:
                if lp:
                    yield chunk(out.index, {"content": out.text}, logprobs=lp)
                elif out.text:
                    yield content(out.index, out.text)
            else:
                parser = parsers[out.index]
                deltas = parser.feed(out.text) + (parser.finish() if out.finished else [])
                for delta in _chat_deltas(deltas) or ([{"content": ""}] if lp else []):
                    yield chunk(out.index, delta, logprobs=lp)
                    lp = None
            if out.finished:
                calls = bool(parsers[out.index].calls) if tools else False
                yield chunk(out.index, {}, finish_reason(out.finish_reason, calls))
        if job.plan.include_usage:
            yield sse({**base, "choices": [], "usage": totals.usage(_prompt_len(job))})
        yield "data: [DONE]\n\n"

    def error_events(self, job: Job, err: APIError) -> list[str]:
        return [sse(error_body(err)), "data: [DONE]\n\n"]


def _chat_deltas(events: list[tuple]) -> list[dict]:
    """ToolStream events → chat chunk deltas, shaped as OpenAI streams tool calls."""
    deltas = []
    for e in events:
        if e[0] == "content":
            deltas.append({"content": e[1]})
        elif e[0] == "call":
            deltas.append({"tool_calls": [{"index": e[1], "id": e[2], "type": "function",
                                           "function": {"name": e[3], "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": e[1], "function": {"arguments": e[2]}}]})
    return deltas


class CompletionFormat:
    """/v1/completions: `text_completion` bodies and events; a batch's choices go prompt by prompt."""

    def _base(self, job: Job) -> dict:
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.plan.model,
                "system_fingerprint": None}

    def body(self, job: Job, totals: Totals) -> dict:
        choices = [{
            "index": i,
            "text": job.echo_of(i) + totals.text(i),
            "logprobs": completion_logprobs(totals.logprobs.get(i, []), len(job.echo_of(i)))
            if job.plan.sampling.logprobs else None,
            "finish_reason": finish_reason(totals.finish.get(i)),
        } for i in totals.indices]
        return {**self._base(job), "choices": choices, "usage": totals.usage(_prompt_len(job))}

    async def events(self, job: Job, outputs: Outputs) -> AsyncIterator[str]:
        base = {**self._base(job), **({"usage": None} if job.plan.include_usage else {})}

        def event(index: int, text: str, finish: str | None, logprobs: Any = None) -> dict:
            return {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> str:
            return sse(event(index, text, finish, logprobs))

        texts = TextEvents(lambda index, text: event(index, text, None))

        offsets: dict[int, int] = {}
        for i in range(job.n_choices):
            if job.echo_of(i):
                yield chunk(i, job.echo_of(i), None)
            offsets[i] = len(job.echo_of(i))
        totals = Totals()
        async for part, out in outputs:
            totals.add(out, part)
            lp = None
            if job.plan.sampling.logprobs and out.logprobs:
                lp = completion_logprobs(out.logprobs, offsets[out.index])
            offsets[out.index] = offsets.get(out.index, 0) + len(out.text)
            if lp:
                yield chunk(out.index, out.text, None, lp)
            elif out.text:
                yield texts(out.index, out.text)
            if out.finished:
                yield chunk(out.index, "", finish_reason(out.finish_reason))
        if job.plan.include_usage:
            yield sse({**base, "choices": [], "usage": totals.usage(_prompt_len(job))})
        yield "data: [DONE]\n\n"

    def error_events(self, job: Job, err: APIError) -> list[str]:
        return [sse(error_body(err)), "data: [DONE]\n\n"]
