"""`create_app(settings)`: the FastAPI app, and the runtime its lifespan builds and tears down.

Startup returns at once so liveness answers while the model loads; a background task loads the weights
(off the loop, with progress in the log), starts the engine, builds the experts, warms both up, and only
then flips readiness. Shutdown (SIGTERM via `server.__main__`, or the lifespan's end) drains: readiness
and new requests get 503, in-flight requests finish or time out, then the engine stops.

Tests inject a preloaded `LoadedModel`, a fake engine or an expert runner; nothing is global.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import ui
from server.api import errors, routes
from server.api.images import ImageLimits, ImageLoader
from server.api.metrics import Metrics
from server.api.middleware import RequestContextMiddleware
from server.api.prompting import PromptBuilder
from server.api.service import CompletionService
from server.engine.types import GenerateRequest, SamplingParams
from server.memory import release_cuda_libraries
from server.settings import Settings

log = logging.getLogger("lamina.server")


def model_device(setting: str) -> str:
    """`auto`: the first CUDA GPU when torch sees one, else the CPU. An explicit CUDA device must exist."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        index = int(setting.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ValueError(f"--device {setting}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not compiled in'})")
    return setting


def weight_dtype(setting: str, device: str = "cpu", cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`auto` on CPU: bf16 where the CPU computes it natively (AVX512-BF16 or AMX: half the bytes per decoded token
    and faster GEMMs than fp32 there; ~1.5x decode on SmolLM2 here), else fp32 (emulated bf16 is slower than fp32).
    On CUDA: bf16 where the GPU supports it, else fp16 (the reference's inference dtype)."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "fp32"
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def quantized(settings: Settings) -> bool:
    """Whether the base weights will be held quantized: int8/int4, or a GGUF file under auto."""
    return settings.quantization in ("int8", "int4") or (settings.quantization == "auto" and settings.llama_dir is None)


def activation_dtype(settings: Settings, device: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """--dtype, where auto means fp32 over quantized weights on CPU (the integer kernels take and give fp32 at no
    cost, and a bf16 residual stream costs accuracy: on SmolLM2 Q4_1 teacher-forced top-1 agreement with the
    fp32 path is 97.4% in fp32, 96.5% in bf16), else `weight_dtype`."""
    if settings.dtype == "auto" and device == "cpu" and quantized(settings):
        return "fp32"
    return weight_dtype(settings.dtype, device, cpuinfo)


def kv_dtype(settings: Settings, device: str, activations: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """--kv-cache-dtype; auto: bf16 where it is native (half the cache of fp32), else the activations' dtype."""
    if settings.kv_cache_dtype != "auto":
        return settings.kv_cache_dtype
    if device.startswith("cuda"):
        return activations
    return "bf16" if weight_dtype("auto", device, cpuinfo) == "bf16" else activations


def load_model(settings: Settings, progress: Callable[[str], None]):
    """The model the settings name: a LLaMA(-Adapter) checkpoint, a GGUF file, or the embedded default."""
    from models.loading import RuntimeBanks, load_gguf, load_llama_adapter

    device = model_device(settings.device)
    quantization = settings.quantization
    if device != "cpu":
        if quantization in ("int8", "int4"):
            raise ValueError(f"--quantization {quantization}: the quantized kernels are CPU-only; use --device cpu "
                             "or --quantization none")
        quantization = "none"  # a GGUF is dequantized to --dtype for the GPU
    dtype = activation_dtype(settings, device)
    progress(f"activations in {dtype} on {device}, base weights: quantization {quantization}")
    if device == "cpu":
        from models import kernels

        pending = kernels.to_compile()
        if pending is not None:
            progress(f"compiling the CPU kernels ({pending}) for this CPU and torch: once, about "
                     f"2 minutes on 2 cores, cached in {kernels.build_dir(pending).parent}")
        progress(f"CPU kernels: {kernels.isa()}")

    if settings.llama_dir is not None:
        runtime = RuntimeBanks(settings.max_runtime_adapters, settings.max_lora_rank, settings.runtime_query_len,
                               settings.runtime_query_layer, settings.served_model_name) \
            if settings.allow_runtime_adapters else None
        loaded = load_llama_adapter(
            llama_dir=settings.llama_dir,
            tokenizer_path=settings.tokenizer,
            adapters=settings.adapters,
            clip_model=settings.clip_model,
            clip_weights=settings.clip_weights,
            dtype=dtype,
            max_seq_len=settings.max_context,
            quantization=quantization,
            progress=progress,
            runtime=runtime,
        )
    else:
        progress(f"reading {settings.gguf or 'the embedded default model (SmolLM2-135M-Instruct)'}")
        loaded = load_gguf(settings.gguf, dtype=dtype, max_seq_len=settings.max_context, quantization=quantization,
                           progress=progress)
    if device != "cpu":
        progress(f"moving the weights to {device}")
        loaded.model.to(device)
    return loaded


def build_engine(loaded, settings: Settings):
    """`loaded`: the model or a function that loads it (on the engine thread)."""
    from server.engine.engine import AsyncEngine, EngineConfig

    device = model_device(settings.device)
    wanted = {
        "max_context": settings.max_context,
        "max_batch": settings.max_batch,
        "kv_cache_bytes": int(settings.kv_cache_bytes) if settings.kv_cache_bytes else None,
        "max_waiting": settings.max_waiting,
        "prefill_chunk": settings.prefill_chunk,
        "compile_decode": settings.compile,
        "deterministic": settings.deterministic,
        "prefix_caching": settings.prefix_caching,
        "max_images": max(1, settings.max_images),
        "dtype": kv_dtype(settings, device, activation_dtype(settings, device)),
    }
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    return AsyncEngine(loaded, EngineConfig(**{k: v for k, v in wanted.items() if k in known and v is not None}))


class Runtime:
    """What the lifespan builds: engine, experts, service, metrics, and the server's state."""

    def __init__(self, settings: Settings, *, loaded=None, engine=None, experts=None):
        self.settings = settings
        self.metrics = Metrics()
        self.status = "loading"  # loading | ready | failed | draining | stopped
        self.detail = "loading the model"
        self.draining = False
        self.inflight = 0
        self.service: CompletionService | None = None
        self.engine = engine
        self.experts = experts
        self._loaded = loaded
        self._task: asyncio.Task | None = None
        self._engine_stopped = False
        self.on_fatal: Callable[[str], None] | None = None
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lamina-prep")
        s = settings
        self.images = ImageLoader(
            ImageLimits(max_bytes=int(s.image_max_bytes), max_pixels=s.image_max_pixels, max_side=s.image_max_side,
                        formats=frozenset(s.image_formats), fetch_timeout=s.image_fetch_timeout,
                        allowed_hosts=tuple(s.image_allowed_hosts)),
            executor=self.executor, observe=self.metrics.observe_stage)

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.service is not None

    def status_message(self) -> str:
        failed = self.detail if self.detail.startswith("the engine") else f"startup failed: {self.detail}"
        return {"loading": f"the server is starting: {self.detail}", "failed": failed,
                "draining": "the server is shutting down", "stopped": "the server has stopped"}.get(
                    self.status, self.detail)

    # ---------------------------------------------------------------------------------- startup
    def start(self) -> None:
        self._task = asyncio.create_task(self._startup(), name="lamina-startup")

    async def wait_ready(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _startup(self) -> None:
        t0 = time.perf_counter()
        release_cuda_libraries()  # before loading too, so that they do not add to the peak
        try:
            if self.engine is None:
                # the engine thread loads the weights itself, so that it is the only thread that runs torch ops in
                # parallel: a second OpenMP team in the process (the main thread's, had it loaded them) makes
                # libgomp put its workers to sleep between parallel regions, and decode ran 25-40% slower
                loaded = self._loaded or (lambda: load_model(self.settings, self._progress))
                self.engine = build_engine(loaded, self.settings)
            self.engine.on_failure = self._engine_died
            await self.engine.start()
            log.info("model loaded and engine started in %.1f s", time.perf_counter() - t0)
            builder = PromptBuilder(self.engine.loaded.prompt_format, self.engine.loaded.chat_template,
                                    self.engine.tokenizer, self.engine.max_context)
            service = CompletionService(self.settings, self.engine, builder, self.images, self.metrics,
                                        executor=self.executor)
            self.metrics.bind_engine(self.engine.stats)
            if hasattr(self.engine, "set_observer"):  # test doubles may lack it
                self.engine.set_observer(self.metrics)
            if self.experts is None and self.settings.experts:
                self._progress(f"loading experts: {', '.join(self.settings.experts)}")
                self.experts = await asyncio.to_thread(self._build_experts, service, asyncio.get_running_loop())
            service.experts = self.experts
            self._progress("warming up")
            await self._warm_up(service)
            release_cuda_libraries()  # and what loading and warm-up faulted back in
            self.service = service
            self.status, self.detail = "ready", "ready"
            log.info("ready in %.1f s: serving %s", time.perf_counter() - t0, ", ".join(service.model_ids))
        except Exception as e:
            self.status, self.detail = "failed", f"{type(e).__name__}: {e}"
            log.error("startup failed: %s", self.detail, exc_info=not isinstance(e, ValueError | OSError))
            if self.on_fatal is not None:
                self.on_fatal(self.detail)

    def _engine_died(self, reason: str) -> None:
        """The engine thread died (its requests have ended with an error): unhealthy from now on, and the
        process exits non-zero so Docker / Kubernetes restart it."""
        self.status, self.detail = "failed", f"the engine thread died: {reason}"
        log.error("%s; exiting", self.detail)
        if self.on_fatal is not None:
            self.on_fatal(self.detail)

    def _progress(self, message: str) -> None:
        self.detail = message
        log.info("startup: %s", message)

    def _build_experts(self, service: CompletionService, loop: asyncio.AbstractEventLoop):
        from experts.registry import create_runner

        s = self.settings
        config: dict[str, dict[str, Any]] = {}
        if "caption" in s.experts and s.caption_adapter in service.adapters:
            config["caption"] = {
                "generate_caption": service.caption_function(loop, s.caption_adapter, s.expert_timeout),
                "source": f"LLaMA-Adapter {s.caption_adapter}",
            }
        workers = s.expert_workers or max(1, (os.cpu_count() or 2) // 2)
        runner = create_runner(s.experts, config, timeout=s.expert_timeout, total_budget=s.expert_total_timeout,
                               observer=self.metrics.expert_observer, workers=workers,
                               queue_observer=self.metrics.expert_queue_observer)
        for name, error in runner.warmup().items():
            if error:
                log.warning("expert %s is unavailable: %s (requests go on without it)", name, error)
        return runner

    async def _warm_up(self, service: CompletionService) -> None:
        """One short greedy generation per adapter, so the first client does not pay for lazy setup."""
        ids = tuple(service.builder.encode("Hello"))
        for adapter in service.adapters or (None,):
            request = GenerateRequest(request_id=f"warmup-{adapter or 'model'}", prompt_ids=ids,
                                      sampling=SamplingParams(max_tokens=2, temperature=0.0), adapter=adapter)
            async for _ in self.engine.generate(request):
                pass

    # --------------------------------------------------------------------------------- shutdown
    async def drain(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish (up to `timeout`), then stop the engine."""
        if self.draining:
            return
        self.draining = True
        if self.status == "ready":
            self.status = "draining"
        deadline = time.monotonic() + timeout
        log.info("draining: %d request(s) in flight, up to %.0f s", self.inflight, timeout)
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._stop_engine(max(0.0, deadline - time.monotonic()))
        log.info("drained (%d request(s) still in flight)", self.inflight)

    async def _stop_engine(self, timeout: float) -> None:
        if self.engine is not None and not self._engine_stopped:
            self._engine_stopped = True
            try:
                await self.engine.shutdown(timeout)
            except Exception:
                log.exception("engine shutdown failed")

    async def close(self) -> None:
        await self.drain(self.settings.drain_timeout)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.experts is not None and hasattr(self.experts, "close"):
            self.experts.close()
        await self.images.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.status = "stopped"


def create_app(settings: Settings | None = None, *, loaded=None, engine=None, experts=None) -> FastAPI:
    """The ASGI app. `loaded` (a LoadedModel), `engine` (an AsyncEngine-like object) and `experts` (an
    ExpertRunner) replace what the settings would build; tests use them."""
    settings = settings or Settings()
    rt = Runtime(settings, loaded=loaded, engine=engine, experts=experts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start()
        try:
            yield
        finally:
            await rt.close()

    app = FastAPI(
        title="Lamina",
        summary="OpenAI-compatible server for multimodal LLaMA-Adapter V2 models, with vision experts",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    errors.install(app, on_error=lambda status: rt.metrics.errors.labels(str(status)).inc())
    app.include_router(routes.api)
    app.include_router(routes.tokens)
    app.include_router(routes.ops)
    app.include_router(ui.router)  # the chat page at / (no key needed: it holds no secret)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"],
                           allow_credentials="*" not in settings.cors_origins)

    def started() -> None:
        rt.inflight += 1

    def ended() -> None:
        rt.inflight -= 1

    app.add_middleware(RequestContextMiddleware, on_start=started, on_end=ended,
                       max_body_bytes=int(settings.max_body_bytes))
    return app
