"""The request pipeline every API shape goes through: validate → admit → fetch images → run experts → build the
prompt → generate → format.

`Pipeline.handle` below is the whole order on one screen; each stage is one method after it. Validation (the
`Plan` of a Chat Completions, Completions or Responses request) is in server/api/plans.py, formatting (one
formatter per shape) in server/api/formatters.py. What the order guarantees:
1. cheap checks (model, parameters, prompt length against the context) — 400/404, no work done;
2. admission: `engine.reserve()` holds a waiting-queue place or refuses with 429 — before any image is
   fetched or decoded and before any expert runs;
3. images (fetch/decode off the loop, limits, SSRF) → 4xx with the image's position, even when streaming;
4. experts (off the loop, timeouts, never fatal) → findings fitted into the context budget;
5. the engine; its deltas become a JSON body or SSE events.
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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image

from experts.caption import CAPTION_PROMPT
from experts.context import format_context
from models.preprocess import clip_transform
from models.prompts import format_alpaca
from server.api.errors import APIError, bad_request, to_api_error
from server.api.formatters import Formatter, Totals
from server.api.images import ImageLoader, LoadedImage
from server.api.metrics import Metrics
from server.api.prompting import ChatInput, PromptBuilder, describe_findings
from server.api.streaming import SSEResponse, cancel_on_disconnect, with_keepalive
from server.api.tools import ToolSet
from server.engine.types import ContextLengthError, GenerateRequest, ImageInput, RequestOutput, SamplingParams
from server.settings import Settings

log = logging.getLogger("lamina.api")


# ------------------------------------------------------------------------------------------ the engine


class Reservation(Protocol):
    def release(self) -> None: ...


class EngineClient(Protocol):
    """What the pipeline needs of an engine (server.engine.AsyncEngine; test doubles)."""

    loaded: Any  # models.loading.LoadedModel: the model's name, prompt format
    adapters: tuple[str, ...]  # the adapter ids served now
    max_context: int
    tokenizer: Any  # models.tokenizer: encode / decode / token_text / vocab_size

    def validate(self, request: GenerateRequest) -> None: ...
    def reserve(self) -> Reservation: ...
    def generate(self, request: GenerateRequest, reservation: Reservation | None = None
                 ) -> AsyncIterator[RequestOutput]: ...


class Admission:
    """A waiting-queue place from `engine.reserve()`: released unless handed to `engine.generate`."""

    def __init__(self, reservation: Reservation):
        self._reservation: Reservation | None = reservation

    def hand_over(self) -> Reservation | None:
        reservation, self._reservation = self._reservation, None
        return reservation

    def release(self) -> None:
        if self._reservation is not None:
            self._reservation, reservation = None, self._reservation
            reservation.release()


def engine_validate(engine: EngineClient, request: GenerateRequest) -> None:
    """The engine's checks of a request: ContextLengthError (→ 400 with the numbers), and a 400 for a parameter
    value it refuses (a ValueError, e.g. a grammar that does not compile)."""
    try:
        engine.validate(request)
    except ValueError as e:
        raise bad_request(str(e), code="invalid_value") from None


# -------------------------------------------------------------------------------------- plan and job


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    echo: str = ""  # completions with echo: the prompt text that opens each of its choices


@dataclass(frozen=True)
class Plan:
    """What a validated request asks for, whatever its API shape (the output of the validate stage)."""

    kind: str  # "chat" | "completion" | "responses"
    model: str
    adapter: str | None
    sampling: SamplingParams  # max_tokens is set when the prompt is final
    prompts: tuple[Prompt, ...]  # completions: one per prompt of a batch; chat and responses: one
    max_tokens: int | None = None  # as the client asked (None: the rest of the context)
    chat: ChatInput | None = None  # chat and responses: rebuilt with the experts' findings
    expert_names: tuple[str, ...] = ()
    tools: ToolSet | None = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what a formatter echoes back (Responses' parameters)


@dataclass
class Job:
    """One admitted request on its way through the stages (the mutable part of a request)."""

    plan: Plan
    arrival: float
    admissions: list[Admission]
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_ids: list[tuple[int, ...]] = field(default_factory=list)  # per prompt, final after build_prompt
    images: list[LoadedImage] = field(default_factory=list)
    image_inputs: tuple[ImageInput, ...] = ()
    experts_report: list[dict] | None = None

    def __post_init__(self) -> None:
        prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "responses": "resp_"}[self.plan.kind]
        self.id = self.id or f"{prefix}{uuid.uuid4().hex}"
        self.prompt_ids = self.prompt_ids or [p.ids for p in self.plan.prompts]

    @property
    def n_choices(self) -> int:
        return self.plan.sampling.n * len(self.plan.prompts)

    def echo_of(self, index: int) -> str:
        """The echoed prompt of choice `index` (a batch's choices go prompt by prompt, n per prompt)."""
        return self.plan.prompts[index // self.plan.sampling.n].echo

    def release(self) -> None:
        for a in self.admissions:
            a.release()


# ------------------------------------------------------------------------------------------ pipeline


class Pipeline:
    def __init__(self, settings: Settings, engine: EngineClient, builder: PromptBuilder, images: ImageLoader,
                 metrics: Metrics, experts: Any | None = None, executor: Executor | None = None):
        self.settings, self.engine, self.builder = settings, engine, builder
        self.images, self.metrics, self.experts, self.executor = images, metrics, experts, executor
        self.multimodal = bool(getattr(engine.loaded.model, "multimodal", False))
        self.image_size = int(getattr(engine.loaded.model, "image_size", 224))

    async def handle(self, http: Request, plan: Plan, fmt: Formatter, arrival: float) -> JSONResponse | SSEResponse:
        """The stages after validation, in order. A plain response runs them all under cancel-on-disconnect; a
        stream fetches the images before its 200 (their errors keep their 4xx) and runs the rest inside."""
        job = self.admit(plan, arrival)  # 429 / 503 before any expensive work
        if not plan.stream:
            try:
                return JSONResponse(await cancel_on_disconnect(http, self.complete(job, fmt)))
            finally:
                job.release()
        try:
            await cancel_on_disconnect(http, self.fetch_images(job))
        except BaseException:
            job.release()
            raise
        return SSEResponse(with_keepalive(self.stream(job, fmt), self.settings.sse_keepalive), cleanup=job.release)

    async def complete(self, job: Job, fmt: Formatter) -> dict:
        await self.fetch_images(job)
        await self.run_experts(job)
        totals = Totals()
        async for part, out in self.generate(job):
            totals.add(out, part)
        return fmt.body(job, totals)

    async def stream(self, job: Job, fmt: Formatter) -> AsyncIterator[str]:
        try:
            await self.run_experts(job)  # with_keepalive covers the wait
            async for event in fmt.events(job, self.generate(job)):
                yield event
        except asyncio.CancelledError:
            log.info("client disconnected mid-stream; request aborted")
            raise
        except Exception as e:  # after the 200 went out: an error event, then the end of the stream
            err = to_api_error(e)
            if err.status >= 500:
                log.exception("stream failed", exc_info=e)
            self.metrics.errors.labels(str(err.status)).inc()
            for event in fmt.error_events(job, err):
                yield event
        finally:
            job.release()

    # --------------------------------------------------------------------------------- 2. admit
    def admit(self, plan: Plan, arrival: float) -> Job:
        """A waiting-queue place for every prompt, or none (429)."""
        admissions: list[Admission] = []
        try:
            for _ in plan.prompts:
                admissions.append(Admission(self.engine.reserve()))
        except BaseException:
            for a in admissions:
                a.release()
            raise
        return Job(plan, arrival, admissions)

    # -------------------------------------------------------------------------- 3. fetch images
    async def fetch_images(self, job: Job) -> None:
        if job.plan.chat is None or not job.plan.chat.image_urls:
            return
        job.images = await self.images.load_all(job.plan.chat.image_urls)
        if self.multimodal and job.images:
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            order = self.settings.channel_order
            pixels = await asyncio.gather(*(
                loop.run_in_executor(self.executor, clip_transform, im.image, self.image_size, order)
                for im in job.images))
            job.image_inputs = tuple(ImageInput(p, im.sha256) for p, im in zip(pixels, job.images, strict=True))
            self.metrics.observe_stage("image_decode", time.perf_counter() - t0)

    # ---------------------------------------------------------------- 4, 5. experts and prompt
    async def run_experts(self, job: Job) -> None:
        """Run the experts on each image and build the final prompt with their findings."""
        chat = job.plan.chat
        if not job.plan.expert_names or not job.images:
            return
        results = await asyncio.gather(*(
            self.experts.run(im.image, im.sha256, chat.question, job.plan.expert_names) for im in job.images))
        job.experts_report = [{"image": i, **r.to_dict()} for i, per_image in enumerate(results) for r in per_image]
        findings = describe_findings([format_context(per_image) for per_image in results], len(job.images))
        await self.build_prompt(job, findings)

    async def build_prompt(self, job: Job, findings: str) -> None:
        reserve = job.plan.max_tokens or min(self.settings.default_max_tokens or 512, self.engine.max_context // 4)
        prompt_budget = self.engine.max_context - reserve
        loop = asyncio.get_running_loop()
        chat, tools = job.plan.chat, job.plan.tools
        fitted = await loop.run_in_executor(
            self.executor, self.builder.fit_findings, chat, findings, self.settings.expert_budget, prompt_budget,
            tools)
        ids = await loop.run_in_executor(
            self.executor, lambda: self.builder.encode(self.builder.render(chat, fitted, tools)))
        job.prompt_ids = [tuple(ids)]

    # ------------------------------------------------------------------------------ 6. generate
    def engine_request(self, job: Job, part: int, max_tokens: int) -> GenerateRequest:
        return GenerateRequest(
            request_id=job.id if len(job.prompt_ids) == 1 else f"{job.id}-{part}",  # unique, whatever the client
            prompt_ids=job.prompt_ids[part],
            sampling=dataclasses.replace(job.plan.sampling, max_tokens=max_tokens),
            adapter=job.plan.adapter,
            images=job.image_inputs,
            deadline=job.arrival + self.settings.request_timeout,
        )

    def final_max_tokens(self, job: Job, part: int) -> int:
        if job.plan.max_tokens is not None:
            return job.plan.max_tokens
        n = len(job.prompt_ids[part])
        room = self.engine.max_context - n
        if room < 1:
            raise ContextLengthError(n, 1, self.engine.max_context)
        return min(room, self.settings.default_max_tokens or room)

    async def generate(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt, delta) pairs from the engine — a batch's prompts run together, their choices renumbered
        prompt by prompt as OpenAI does — with latency and token metrics recorded on the way."""
        if len(job.prompt_ids) == 1:
            async for out in self._outputs(job, 0):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        n = job.plan.sampling.n

        async def pump(k: int) -> None:
            try:
                async for out in self._outputs(job, k):
                    await queue.put((k, dataclasses.replace(out, index=k * n + out.index)))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((k, e))
                return
            await queue.put((k, None))

        tasks = [asyncio.create_task(pump(k)) for k in range(len(job.prompt_ids))]
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

    async def _outputs(self, job: Job, part: int) -> AsyncIterator[RequestOutput]:
        request = self.engine_request(job, part, self.final_max_tokens(job, part))
        engine_validate(self.engine, request)
        model, m = job.plan.model, self.metrics
        m.prompt_tokens.labels(model).inc(len(request.prompt_ids))
        tokens, itl = m.generation_tokens.labels(model), m.itl.labels(model)  # once, not per token
        submitted = time.monotonic()
        first: float | None = None
        last: dict[int, float] = {}
        generated = 0
        async with aclosing(self.engine.generate(request, job.admissions[part].hand_over())) as stream:
            async for out in stream:
                now = time.monotonic()
                if out.token_ids:
                    n = len(out.token_ids)
                    generated += n
                    tokens.inc(n)
                    if first is None:
                        first = now
                        m.ttft.labels(model).observe(now - job.arrival)
                        admitted = m.admitted.pop(request.request_id, None)
                        if admitted is not None:
                            m.queue.labels(model).observe(max(0.0, admitted - submitted))
                    elif out.index in last:
                        itl.observe((now - last[out.index]) / n)
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
        log.info("%s %s: %d prompt tokens, %d generated, %d image(s), %.2f s%s", job.plan.kind, model,
                 len(request.prompt_ids), generated, len(job.images), elapsed,
                 f", user {job.plan.user!r}" if job.plan.user else "")

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
