"""The serving layer: an OpenAI request → admission → images → experts → prompt → engine → response.

Order matters and is the point of this file:
1. cheap checks (model, parameters, prompt length against the context) — 400/404, no work done;
2. admission: `engine.reserve()` holds a waiting-queue place or refuses with 429 — before any image is
   fetched or decoded and before any expert runs;
3. images (fetch/decode off the loop, limits, SSRF) → 4xx with the image's position;
4. experts (off the loop, timeouts, never fatal) → findings fitted into the context budget;
5. the engine; its deltas become a JSON body or SSE chunks.
Every stage runs in the request's task, so a client that disconnects cancels whatever stage is running
(`cancel_on_disconnect` for plain responses, Starlette's stream cancellation for SSE), and the reservation
or engine request is released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image

from experts.caption import CAPTION_PROMPT
from experts.context import format_context
from models.preprocess import clip_transform
from models.prompts import format_alpaca
from server.api.errors import APIError, bad_request, error_body, to_api_error
from server.api.images import ImageLoader, LoadedImage
from server.api.metrics import Metrics
from server.api.prompting import ChatInput, PromptBuilder, describe_findings, parse_messages
from server.api.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.api.streaming import SSEResponse, cancel_on_disconnect, sse, with_keepalive
from server.engine.types import (
    ContextLengthError,
    GenerateRequest,
    ImageInput,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from server.settings import Settings

log = logging.getLogger("lamina.api")



# ------------------------------------------------------------------------------------- small helpers


class Admission:
    """A waiting-queue place from `engine.reserve()`: released unless handed to `engine.generate`."""

    def __init__(self, reservation: Any):
        self._reservation = reservation
        self._open = True

    def hand_over(self) -> Any:
        self._open = False
        return self._reservation

    def release(self) -> None:
        if self._open:
            self._open = False
            self._reservation.release()


class AdmissionGroup:
    """A batch's places (one per prompt), released together; each part hands its own to the engine."""

    def __init__(self, admissions: list[Admission]):
        self.admissions = admissions

    def release(self) -> None:
        for a in self.admissions:
            a.release()


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


# -------------------------------------------------------------------------------------------- the job


@dataclass
class Job:
    """One admitted request on its way through the stages."""

    kind: str  # "chat" | "completion"
    request_id: str
    model: str
    adapter: str | None
    sampling: SamplingParams
    prompt_ids: list[int]
    arrival: float
    admission: Admission | AdmissionGroup | None = None
    max_tokens: int | None = None  # as the client asked (None: the rest of the context)
    chat: ChatInput | None = None
    image_urls: tuple[str, ...] = ()
    expert_names: tuple[str, ...] = ()
    images: list[LoadedImage] = field(default_factory=list)
    image_inputs: tuple[ImageInput, ...] = ()
    experts_report: list[dict] | None = None
    echo: str = ""
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    parts: list[Job] = field(default_factory=list)  # a batch of prompts (/v1/completions): one job per prompt
    id: str = ""
    created: int = 0

    @property
    def n_choices(self) -> int:
        return self.sampling.n * max(1, len(self.parts))

    def echo_of(self, index: int) -> str:
        """The echoed prompt of choice `index` (a batch's choices go prompt by prompt, n per prompt)."""
        return self.parts[index // self.sampling.n].echo if self.parts else self.echo

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())


@dataclass
class Totals:
    text: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)  # per prompt of a batch
    cached_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, out: RequestOutput, part: int = 0) -> None:
        self.text[out.index] = self.text.get(out.index, "") + out.text
        self.logprobs.setdefault(out.index, []).extend(out.logprobs)
        self.completion_tokens[out.index] = max(self.completion_tokens.get(out.index, 0),
                                                out.completion_tokens)
        self.prompt_tokens[part] = max(self.prompt_tokens.get(part, 0), out.prompt_tokens)
        self.cached_tokens[part] = max(self.cached_tokens.get(part, 0), out.cached_tokens)
        if out.finished:
            self.finish[out.index] = out.finish_reason

    def usage(self, prompt_len: int) -> dict:
        prompt = sum(self.prompt_tokens.values()) or prompt_len
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}


# ----------------------------------------------------------------------------------------- the service


class CompletionService:
    def __init__(
        self,
        settings: Settings,
        engine: Any,
        builder: PromptBuilder,
        images: ImageLoader,
        metrics: Metrics,
        experts: Any | None = None,
        executor: Any | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.builder = builder
        self.images = images
        self.metrics = metrics
        self.experts = experts
        self.executor = executor
        loaded = engine.loaded
        self.multimodal = bool(getattr(loaded.model, "multimodal", False))
        self.image_size = int(getattr(loaded.model, "image_size", 224))
        self.adapters: tuple[str, ...] = tuple(loaded.adapter_names)
        self.model_ids = self.adapters or (settings.served_model_name or loaded.name,)
        self.vocab_size = int(getattr(engine.tokenizer, "vocab_size", 0) or 0)
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------ models
    def list_models(self) -> dict:
        owner = "lamina"
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": self.created, "owned_by": owner,
             "max_model_len": self.engine.max_context} for m in self.model_ids]}

    def resolve_model(self, model: str) -> str | None:
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                           param="model", code="model_not_found")
        return model if self.adapters else None

    # ---------------------------------------------------------------------------------- tokenizer
    async def tokenize(self, req: TokenizeRequest) -> dict:
        """The ids a completion (`prompt`) or a chat request (`messages`, through the template) would send."""
        if req.model is not None:
            self.resolve_model(req.model)
        if req.messages is not None:
            ids = await self._encode(self.builder.render(parse_messages(req.messages), None))
        elif req.add_special_tokens:
            ids = await self._encode(req.prompt)
        else:
            ids = self.engine.tokenizer.encode(req.prompt, bos=False)
        body = {"count": len(ids), "max_model_len": self.engine.max_context, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [self.engine.tokenizer.token_text(i) for i in ids]
        return body

    def detokenize(self, req: DetokenizeRequest) -> dict:
        if req.model is not None:
            self.resolve_model(req.model)
        self._check_ids(req.tokens, "tokens", "token id")
        return {"prompt": self.engine.tokenizer.decode(req.tokens)}

    def _check_ids(self, ids, param: str, what: str) -> None:
        """A 400 naming `param` unless every token id is in the vocabulary."""
        bad = next((t for t in ids if t < 0 or (self.vocab_size and t >= self.vocab_size)), None)
        if bad is not None:
            raise bad_request(f"{what} {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param)

    # ---------------------------------------------------------------------------------- sampling
    def _sampling(self, req: ChatCompletionRequest | CompletionRequest, *, logprobs: bool, top: int) -> SamplingParams:
        bias = {int(key): float(value) for key, value in (req.logit_bias or {}).items()}
        self._check_ids(bias, "logit_bias", "logit_bias token id")
        self._check_ids(req.stop_token_ids or (), "stop_token_ids", "stop_token_ids: token id")
        return SamplingParams(
            max_tokens=1,  # set once the prompt is final
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            logit_bias=bias,
            seed=None if req.seed is None else req.seed % 2**63,
            stop=req.stop_list,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            grammar=req.grammar,
            n=req.n,
            logprobs=logprobs,
            top_logprobs=top,
        )

    def _engine_request(self, job: Job, max_tokens: int) -> GenerateRequest:
        sampling = SamplingParams(**{**job.sampling.__dict__, "max_tokens": max_tokens})
        return GenerateRequest(
            request_id=job.id,  # unique even when clients reuse an X-Request-Id
            prompt_ids=tuple(job.prompt_ids),
            sampling=sampling,
            adapter=job.adapter,
            images=job.image_inputs,
            deadline=job.arrival + self.settings.request_timeout,
        )

    def _check_length(self, job: Job, reserve: int) -> None:
        """ContextLengthError (→ 400 with the numbers) unless the prompt + `reserve` tokens fit."""
        self._validate(self._engine_request(job, max(1, reserve)))

    def _validate(self, request: GenerateRequest) -> None:
        try:
            self.engine.validate(request)
        except ValueError as e:  # the engine's refusal of a parameter value
            raise bad_request(str(e), code="invalid_value") from None

    def _final_max_tokens(self, job: Job) -> int:
        if job.max_tokens is not None:
            return job.max_tokens
        room = self.engine.max_context - len(job.prompt_ids)
        if room < 1:
            raise ContextLengthError(len(job.prompt_ids), 1, self.engine.max_context)
        return min(room, self.settings.default_max_tokens or room)

    def _admit(self, job: Job) -> Job:
        job.admission = Admission(self.engine.reserve())  # 429 / 503 before any expensive work
        return job

    # ------------------------------------------------------------------------------- chat: stage 1
    async def _encode(self, text: str) -> list[int]:
        if len(text) < 8192:
            return self.builder.encode(text)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.builder.encode, text)

    async def prepare_chat(self, req: ChatCompletionRequest, request_id: str, arrival: float) -> Job:
        adapter = self.resolve_model(req.model)
        chat = parse_messages(req.messages)
        urls = chat.image_urls
        if len(urls) > self.settings.max_images:
            raise bad_request(f"{len(urls)} images in this request; the limit is {self.settings.max_images}",
                              "messages", "too_many_images")
        names: tuple[str, ...] = ()
        if req.experts is not None and self.experts is None and req.experts:
            raise APIError(400, f"unknown or disabled expert(s) {req.experts}; no experts are enabled",
                           param="experts", code="unknown_expert")
        if self.experts is not None:
            names = tuple(self.experts.resolve(req.experts))  # UnknownExpertError → 400
        if urls and not self.multimodal and not names:
            raise bad_request(
                f"the model {req.model!r} cannot see images and no experts are enabled to describe them; "
                "enable experts (`experts` or --experts) or send text only", "messages", "images_unsupported")
        top = req.top_logprobs or 0
        job = Job(
            kind="chat", request_id=request_id, model=req.model, adapter=adapter,
            sampling=self._sampling(req, logprobs=req.logprobs, top=top),
            prompt_ids=await self._encode(self.builder.render(chat, None)),
            arrival=arrival, max_tokens=req.max_new_tokens, chat=chat, image_urls=urls,
            expert_names=names if urls else (), stream=req.stream, include_usage=req.include_usage, user=req.user,
        )
        self._check_length(job, job.max_tokens or 1)
        return self._admit(job)

    # --------------------------------------------------------------------------- chat: stage 2, 3
    async def load_images(self, job: Job) -> None:
        job.images = await self.images.load_all(job.image_urls)
        if self.multimodal and job.images:
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            order = self.settings.channel_order
            pixels = await asyncio.gather(*(
                loop.run_in_executor(self.executor, clip_transform, im.image, self.image_size, order)
                for im in job.images))
            job.image_inputs = tuple(ImageInput(p, im.sha256) for p, im in zip(pixels, job.images, strict=True))
            self.metrics.observe_stage("image_decode", time.perf_counter() - t0)

    async def finalize_prompt(self, job: Job) -> None:
        """Run the experts on each image and build the final prompt with their findings."""
        if not job.expert_names or not job.images:
            return
        results = await asyncio.gather(*(
            self.experts.run(im.image, im.sha256, job.chat.question, job.expert_names) for im in job.images))
        job.experts_report = [{"image": i, **r.to_dict()} for i, per_image in enumerate(results) for r in per_image]
        findings = describe_findings([format_context(per_image) for per_image in results], len(job.images))
        reserve = job.max_tokens or min(self.settings.default_max_tokens or 512, self.engine.max_context // 4)
        prompt_budget = self.engine.max_context - reserve
        loop = asyncio.get_running_loop()
        fitted = await loop.run_in_executor(
            self.executor, self.builder.fit_findings, job.chat, findings, self.settings.expert_budget,
            prompt_budget)
        job.prompt_ids = await loop.run_in_executor(
            self.executor, lambda: self.builder.encode(self.builder.render(job.chat, fitted)))

    # ------------------------------------------------------------------------------ completions
    async def prepare_completion(self, req: CompletionRequest, request_id: str, arrival: float) -> Job:
        adapter = self.resolve_model(req.model)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str | list) \
            else [req.prompt]
        top = req.logprobs or 0
        sampling = self._sampling(req, logprobs=req.logprobs is not None, top=top)
        jobs = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids = await self._encode(prompt)
                echo_text = prompt
            else:
                ids = [int(t) for t in prompt]
                self._check_ids(ids, param, "prompt token id")
                echo_text = self.engine.tokenizer.decode(ids)
            if not ids:
                raise bad_request("prompt must not be empty", param)
            job = Job(
                kind="completion", request_id=request_id, model=req.model, adapter=adapter, sampling=sampling,
                prompt_ids=ids, arrival=arrival, max_tokens=req.max_tokens, echo=echo_text if req.echo else "",
                stream=req.stream, include_usage=req.include_usage, user=req.user,
            )
            self._check_length(job, job.max_tokens or 1)
            jobs.append(job)
        if len(jobs) == 1:
            return self._admit(jobs[0])
        batch = Job(kind="completion", request_id=request_id, model=req.model, adapter=adapter, sampling=sampling,
                    prompt_ids=[t for j in jobs for t in j.prompt_ids], arrival=arrival, max_tokens=req.max_tokens,
                    stream=req.stream, include_usage=req.include_usage, user=req.user, parts=jobs)
        try:  # a place for every prompt, or none (429)
            for job in jobs:
                self._admit(job)
        except BaseException:
            AdmissionGroup([j.admission for j in jobs if j.admission is not None]).release()
            raise
        batch.admission = AdmissionGroup([j.admission for j in jobs])
        return batch

    # ------------------------------------------------------------------------------ the engine
    async def outputs(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt, delta) pairs from the engine for `job` — a batch's prompts run together, their choices
        renumbered prompt by prompt as OpenAI does — with latency and token metrics recorded on the way."""
        if not job.parts:
            async for out in self._outputs(job):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        n = job.sampling.n

        async def pump(k: int, part: Job) -> None:
            try:
                async for out in self._outputs(part):
                    await queue.put((k, dataclasses.replace(out, index=k * n + out.index)))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((k, e))
                return
            await queue.put((k, None))

        tasks = [asyncio.create_task(pump(k, part)) for k, part in enumerate(job.parts)]
        try:
            running = len(tasks)
            while running:
                k, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield k, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _outputs(self, job: Job) -> AsyncIterator[RequestOutput]:
        request = self._engine_request(job, self._final_max_tokens(job))
        self._validate(request)
        model, m = job.model, self.metrics
        m.prompt_tokens.labels(model).inc(len(job.prompt_ids))
        submitted = time.monotonic()
        first: float | None = None
        last: dict[int, float] = {}
        generated = 0
        async with aclosing(self.engine.generate(request, job.admission.hand_over())) as stream:
            async for out in stream:
                now = time.monotonic()
                if out.token_ids:
                    n = len(out.token_ids)
                    generated += n
                    m.generation_tokens.labels(model).inc(n)
                    if first is None:
                        first = now
                        m.ttft.labels(model).observe(now - job.arrival)
                        admitted = m.admitted.pop(job.id, None)
                        if admitted is not None:
                            m.queue.labels(model).observe(max(0.0, admitted - submitted))
                    elif out.index in last:
                        m.itl.labels(model).observe((now - last[out.index]) / n)
                    last[out.index] = now
                if out.finished:
                    m.requests.labels(model, out.finish_reason or "stop").inc()
                    if out.finish_reason == "abort":  # not us leaving: the deadline, or a shutdown
                        if time.monotonic() >= request.deadline:
                            raise TimeoutError
                        raise APIError(503, "the server stopped before the request finished", code="aborted",
                                       headers={"Retry-After": "5"})
                    if out.finish_reason == "error":
                        raise APIError(500, "the engine failed while generating", code="engine_error")
                yield out
        elapsed = time.monotonic() - job.arrival
        m.e2e.labels(model).observe(elapsed)
        log.info("%s %s: %d prompt tokens, %d generated, %d image(s), %.2f s%s", job.kind, model,
                 len(job.prompt_ids), generated, len(job.image_urls), elapsed,
                 f", user {job.user!r}" if job.user else "")

    # ---------------------------------------------------------------------------- plain responses
    async def complete(self, job: Job) -> dict:
        """Run every remaining stage and return the JSON body."""
        try:
            if job.kind == "chat":
                await self.load_images(job)
                await self.finalize_prompt(job)
            totals = Totals()
            async for part, out in self.outputs(job):
                totals.add(out, part)
        finally:
            job.admission.release()
        indices = sorted(set(totals.text) | set(totals.finish)) or [0]
        if job.kind == "chat":
            choices = [{
                "index": i,
                "message": {"role": "assistant", "content": totals.text.get(i, ""), "refusal": None},
                "logprobs": chat_logprobs(totals.logprobs.get(i, [])) if job.sampling.logprobs else None,
                "finish_reason": _finish(totals.finish.get(i)),
            } for i in indices]
            body = {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                    "choices": choices, "usage": totals.usage(len(job.prompt_ids)), "system_fingerprint": None}
            if job.experts_report is not None:
                body["experts"] = job.experts_report
            return body
        choices = [{
            "index": i,
            "text": job.echo_of(i) + totals.text.get(i, ""),
            "logprobs": completion_logprobs(totals.logprobs.get(i, []), len(job.echo_of(i)))
            if job.sampling.logprobs else None,
            "finish_reason": _finish(totals.finish.get(i)),
        } for i in indices]
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": choices, "usage": totals.usage(len(job.prompt_ids)), "system_fingerprint": None}

    async def respond(self, request: Request, job: Job) -> JSONResponse | SSEResponse:
        """The response for an admitted job: JSON (cancelled if the client leaves) or an SSE stream."""
        if not job.stream:
            try:
                body = await cancel_on_disconnect(request, self.complete(job))
            finally:
                job.admission.release()
            return JSONResponse(body)
        try:
            if job.kind == "chat":  # image errors still get their own 4xx status
                await cancel_on_disconnect(request, self.load_images(job))
        except BaseException:
            job.admission.release()
            raise
        return SSEResponse(with_keepalive(self.stream(job), self.settings.sse_keepalive),
                           cleanup=job.admission.release)

    # ---------------------------------------------------------------------------------- streaming
    async def stream(self, job: Job) -> AsyncIterator[str]:
        base = {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "system_fingerprint": None}
        usage_field = {"usage": None} if job.include_usage else {}
        chat = job.kind == "chat"

        def chunk(index: int, text: str | None, finish: str | None, logprobs: Any = None,
                  role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if role else (
                    {"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return {**base, "choices": [choice], **usage_field}

        try:
            if chat:
                await self.finalize_prompt(job)  # the experts (with_keepalive covers the wait)
            totals = Totals()
            offsets: dict[int, int] = {}
            for i in range(job.n_choices):  # every choice opens with the role (the first also the experts)
                if chat:
                    first = chunk(i, "", None, role=True)
                    if i == 0 and job.experts_report is not None:
                        first["experts"] = job.experts_report
                    yield sse(first)
                elif job.echo_of(i):
                    yield sse(chunk(i, job.echo_of(i), None))
                offsets[i] = len(job.echo_of(i))
            async for part, out in self.outputs(job):
                totals.add(out, part)
                lp = None
                if job.sampling.logprobs and out.logprobs:
                    lp = chat_logprobs(out.logprobs) if chat else completion_logprobs(out.logprobs,
                                                                                       offsets[out.index])
                offsets[out.index] = offsets.get(out.index, 0) + len(out.text)
                if out.text or lp:
                    yield sse(chunk(out.index, out.text, None, lp))
                if out.finished:
                    yield sse(chunk(out.index, None, _finish(out.finish_reason)))
            if job.include_usage:
                yield sse({**base, "choices": [], "usage": totals.usage(len(job.prompt_ids))})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            log.info("client disconnected mid-stream; request aborted")
            raise
        except Exception as e:  # after the 200 went out: an error event, then the end of the stream
            err = to_api_error(e)
            if err.status >= 500:
                log.exception("stream failed", exc_info=e)
            self.metrics.errors.labels(str(err.status)).inc()
            yield sse(error_body(err))
            yield "data: [DONE]\n\n"
        finally:
            job.admission.release()

    # ------------------------------------------------------------------------ the caption expert
    def caption_function(self, loop: asyncio.AbstractEventLoop, adapter: str, timeout: float
                         ) -> Callable[[Image.Image], str]:
        """`generate_caption(image) -> str` for the caption expert (called from its worker thread)."""
        prompt_ids = tuple(self.builder.encode(format_alpaca(CAPTION_PROMPT)))

        async def caption(pixels, digest: str) -> str:
            request = GenerateRequest(
                request_id=f"caption-{uuid.uuid4().hex[:12]}", prompt_ids=prompt_ids,
                sampling=SamplingParams(max_tokens=48, temperature=0.0), adapter=adapter,
                images=(ImageInput(pixels, digest),), deadline=time.monotonic() + timeout)
            text = []
            async with aclosing(self.engine.generate(request)) as stream:
                async for out in stream:
                    text.append(out.text)
            return "".join(text).strip()

        def generate_caption(image: Image.Image) -> str:
            from experts.run import image_digest

            pixels = clip_transform(image, self.image_size, self.settings.channel_order)
            future = asyncio.run_coroutine_threadsafe(caption(pixels, image_digest(image)), loop)
            try:
                return future.result(timeout)
            finally:
                future.cancel()  # aborts the engine request if we gave up waiting

        return generate_caption


def _finish(reason: str | None) -> str | None:
    """Engine reasons → OpenAI's (`stop` | `length`); never "" or a non-OpenAI value."""
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"

