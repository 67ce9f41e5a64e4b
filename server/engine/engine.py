"""The async front end: one engine thread running `EngineCore.step()`, per-request asyncio queues, aborts.

The event loop never runs model work: `generate` hands a request to the engine thread through a
thread-safe inbox and awaits deltas that the thread posts back with `loop.call_soon_threadsafe`. Leaving
the iterator early (client gone, task cancelled) or passing a request's deadline aborts it, and the abort is
applied before the next step, so its slot is free for the next request. The waiting queue is bounded:
`check_capacity` / `reserve` refuse with `QueueFullError` before any expensive per-request work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from models.adapter import NoVisual
from models.loading import LoadedModel
from server.engine.core import EngineConfig, EngineCore
from server.engine.sampling import validate_params
from server.engine.types import (
    ContextLengthError,
    EngineError,
    EngineObserver,
    EngineStats,
    EngineStoppedError,
    GenerateRequest,
    QueueFullError,
    RequestOutput,
    UnknownAdapterError,
)

__all__ = ["AsyncEngine", "EngineConfig", "Reservation"]

log = logging.getLogger("lamina.engine")


class Reservation:
    """A place in the waiting queue taken before expensive per-request work; pass it to `generate`."""

    def __init__(self, engine: AsyncEngine):
        self._engine: AsyncEngine | None = engine

    def release(self) -> None:
        if self._engine is not None:
            self._engine._unqueue(None)
            self._engine = None

    def _consume(self) -> None:
        self._engine = None  # its place now belongs to the submitted request

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AsyncEngine:
    """`loaded` is a LoadedModel, or a callable returning one that `start()` runs on the engine thread.

    Prefer the callable: torch steps on a thread other than the one that loaded the weights ran ~1.4x slower
    here (24 vs 34 ms per batch-1 decode step, SmolLM2 bf16, 2 OpenMP threads), so the engine thread loads.
    """

    def __init__(self, loaded: LoadedModel | Callable[[], LoadedModel], config: EngineConfig):
        self.config = config
        self._loader = loaded if callable(loaded) else None
        if self._loader is None:
            self._build(loaded)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._waiting = 0  # reservations + submitted requests not yet admitted
        self._queued: set[str] = set()
        self._queues: dict[str, asyncio.Queue] = {}
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens) per step over the last seconds
        self._running_rows = 0
        self._draining = False
        self._stop = False
        self.failed: str | None = None  # why the engine thread died (then nothing is served any more)
        self.on_failure: Callable[[str], None] | None = None  # called on the event loop when it dies
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _build(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.core = EngineCore.from_config(loaded, self.config, on_admit=self._unqueue)
        self.runner = self.core.runner
        # adapter name → bank row; rows past the loaded ones are free for `load_adapter` (a server with runtime
        # adapters has them: see models.loading.RuntimeBanks); an unloaded row retires once its requests end
        self._rows: dict[str, int] = {name: i for i, name in enumerate(loaded.adapter_names)}
        self._free_rows = list(range(len(loaded.adapter_names), loaded.model.llama.args.n_adapters))
        self._retiring: set[int] = set()  # engine thread only
        self._installs: set[asyncio.Future] = set()  # loads waiting for the engine thread (failed if it dies)

    # ------------------------------------------------------------------------------------------- facts

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._rows)

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def n_slots(self) -> int:
        return self.runner.n_slots

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Starts the engine thread; returns once the model is warmed up."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="lamina-engine", daemon=True)
        self._thread.start()
        await ready

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stops admitting, lets in-flight requests finish for up to drain_timeout s, aborts the rest."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout
        while self._queues and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._queues:
            self._inbox.put(("abort_all",))
            self._wake.set()
            end = time.monotonic() + 5
            while self._queues and time.monotonic() < end:
                await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # ------------------------------------------------------------------------------------------ admission

    def set_observer(self, observer: EngineObserver) -> None:
        """Who hears of timed stages (visual encoding, prefill chunks) and admissions: the server's metrics."""
        self.runner.observer = observer

    def check_capacity(self) -> None:
        """Cheap and synchronous: raises QueueFullError / EngineStoppedError before any expensive work."""
        if self.failed is not None:
            raise EngineStoppedError(f"the engine has failed ({self.failed}) and admits no requests")
        if self._draining or self._stop:
            raise EngineStoppedError("the engine is shutting down and admits no new requests")
        if self._waiting >= self.config.max_waiting:
            raise QueueFullError(self._waiting, self.config.max_waiting)

    def reserve(self) -> Reservation:
        with self._lock:
            self.check_capacity()
            self._waiting += 1
        return Reservation(self)

    def _unqueue(self, request_id: str | None) -> None:
        """A reservation was released (None) or a request left the waiting queue (admitted or finished)."""
        with self._lock:
            if request_id is None:
                self._waiting -= 1
            elif request_id in self._queued:
                self._queued.discard(request_id)
                self._waiting -= 1

    def adapter_id(self, name: str | None) -> int:
        if name is None:
            return 0
        row = self._rows.get(name)
        if row is not None:
            return row
        if not self._rows and name == self.loaded.name:
            return 0
        raise UnknownAdapterError(name, self.adapters or (self.loaded.name,))

    # ---------------------------------------------------------------------------------- runtime adapters

    async def load_adapter(self, name: str, path, read: Callable[[], tuple]) -> None:
        """Loads an adapter into a free bank row while serving: `read()` (the file's checks, off the event loop)
        gives its row and visual path, the engine thread writes them between two steps, and from then on the
        name is served, batched with the others. ValueError when it cannot be (a name in use, no free row)."""
        if name in self._rows or name == self.loaded.name:
            raise ValueError(f"an adapter named {name!r} is loaded already; unload it first or pick another name")
        if not self._free_rows:
            n = self.loaded.model.llama.args.n_adapters - 1
            raise ValueError(f"all {n} adapter rows are in use; unload an adapter first (or start with more "
                             "--max-runtime-adapters)")
        self.check_capacity()  # EngineStoppedError: a stopped engine installs nothing
        row = self._free_rows.pop(0)
        try:
            tensors, visual = await asyncio.get_running_loop().run_in_executor(None, read)
            done = self._loop.create_future()
            self._installs.add(done)
            self._inbox.put(("install", row, tensors, visual, done))
            self._wake.set()
            try:
                await done
            finally:
                self._installs.discard(done)
        except BaseException:
            self._free_rows.insert(0, row)
            raise
        self._rows[name] = row
        log.info("adapter %s loaded from %s (bank row %d)", name, path, row)

    def unload_adapter(self, name: str) -> None:
        """From now on `name` is unknown (404); its requests in flight finish, then its row is free again."""
        row = self._rows.get(name)
        if row is None:
            raise UnknownAdapterError(name, self.adapters)
        if row == 0 and self.loaded.adapter_names and self.loaded.adapter_names[0] == self.loaded.name:
            raise ValueError(f"{name!r} is the base model, which cannot be unloaded")
        del self._rows[name]
        self._inbox.put(("retire", row))
        self._wake.set()
        log.info("adapter %s unloaded (bank row %d frees when its requests end)", name, row)

    def _retire_rows(self) -> None:
        """Engine thread: unloaded rows whose last request ended go back to the free list."""
        for row in [r for r in self._retiring if not self.core.uses_adapter(r)]:
            self._retiring.discard(row)
            self.runner.model.visual[row] = NoVisual()  # the adapter's visual path is freed now
            self._loop.call_soon_threadsafe(self._free_rows.append, row)

    def validate(self, request: GenerateRequest) -> None:
        """Typed errors before streaming starts: ContextLengthError, UnknownAdapterError, ValueError."""
        p = request.sampling
        vocab = self.loaded.model.llama.args.vocab_size
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError("the prompt has token ids outside the vocabulary")
        validate_params(p, vocab)
        if p.grammar is not None:
            self.core.grammars.validate(p.grammar)
        if len(request.prompt_ids) + p.max_tokens > self.max_context:
            raise ContextLengthError(len(request.prompt_ids), p.max_tokens, self.max_context)
        self.adapter_id(request.adapter)
        if request.images:
            model = self.loaded.model
            if not model.multimodal:
                raise ValueError(f"{self.loaded.name} does not take images")
            if len(request.images) > self.config.max_images:
                raise ValueError(f"at most {self.config.max_images} images per request")
            S = model.image_size
            for img in request.images:
                if tuple(img.pixels.shape) != (3, S, S):
                    raise ValueError(f"image tensor of shape {tuple(img.pixels.shape)}; expected (3, {S}, {S})")

    async def generate(self, request: GenerateRequest, reservation: Reservation | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Per-choice deltas until every choice has finished; leaving early aborts the request."""
        try:
            self.validate(request)
            if reservation is None or reservation._engine is None:
                reservation = self.reserve()
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        rid = request.request_id
        if rid in self._queues:
            reservation.release()
            raise ValueError(f"request id {rid!r} is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = outputs
        with self._lock:
            reservation._consume()
            self._queued.add(rid)
        self._inbox.put(("add", request, self.adapter_id(request.adapter)))
        self._wake.set()
        remaining = request.sampling.n
        try:
            while remaining:
                out = await outputs.get()
                if isinstance(out, EngineError):  # the engine thread died (see _die)
                    raise out
                remaining -= out.finished
                yield out
        finally:
            self._queues.pop(rid, None)
            if remaining:
                self._inbox.put(("abort", rid))
                self._wake.set()

    # ---------------------------------------------------------------------------------------------- stats

    def stats(self) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            window = [(t, n) for t, n in self._rate if now - t <= 10.0]
            waiting = self._waiting
        rate = sum(n for _, n in window) / (now - window[0][0]) if len(window) > 1 else 0.0
        return EngineStats(
            running=self._running_rows,
            waiting=waiting,
            kv_cache_usage=self.core.scheduler.slots_in_use / self.runner.n_slots,
            tokens_per_second=rate,
            prompt_tokens_total=self.core.prompt_tokens_total,
            generation_tokens_total=self.core.generation_tokens_total,
            prompt_tokens_cached_total=self.core.prompt_tokens_cached_total,
            weight_bytes=self.runner.weight_bytes,
            kv_cache_bytes=self.runner.kv_bytes,
        )

    # -------------------------------------------------------------------------------------- engine thread

    def _run(self, ready: asyncio.Future) -> None:
        try:
            if self._loader is not None:
                self._build(self._loader())
            self.runner.warmup()
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._loop.call_soon_threadsafe(ready.set_exception, e)
            return
        self._loop.call_soon_threadsafe(ready.set_result, None)
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - anything that escapes the loop: fail loudly, hang no one
            self._die(e)

    def _die(self, error: BaseException) -> None:
        """The engine thread cannot go on: every waiting and running request ends with an error now, and
        `failed` tells the server (which then reports unhealthy and exits non-zero so it is restarted)."""
        log.error("engine thread died: %s", error, exc_info=error)
        self.failed = f"{type(error).__name__}: {error}"[:300]
        dead = EngineStoppedError(f"the engine failed ({self.failed})")
        try:
            self._loop.call_soon_threadsafe(self._fail_all, dead)
        except RuntimeError:  # the event loop is already closed: nobody is waiting
            pass
        if self.on_failure is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_failure, self.failed)
            except RuntimeError:
                pass

    def _fail_all(self, error: EngineError) -> None:
        for q in list(self._queues.values()):
            q.put_nowait(error)
        for done in list(self._installs):
            _settle(done, error)

    def _serve(self) -> None:
        while True:
            outputs = self._drain_inbox()
            if self._stop:
                outputs += self.core.abort_all()
                self._publish(outputs)
                return
            outputs += self.core.abort_expired(time.monotonic())
            if self.core.has_work():
                try:
                    generated = self.core.generation_tokens_total
                    outputs += self.core.step()
                    with self._lock:
                        self._rate.append((time.monotonic(), self.core.generation_tokens_total - generated))
                        while self._rate and time.monotonic() - self._rate[0][0] > 10.0:
                            self._rate.popleft()
                except Exception:
                    log.exception("engine step failed; failing the requests in flight")
                    outputs += self.core.abort_all("error")
            self._running_rows = len(self.core.scheduler.running)
            if self._retiring:
                self._retire_rows()
            self._publish(outputs)
            self._wake.clear()
            if not self.core.has_work() and self._inbox.empty():
                self._wake.wait(timeout=0.1)

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            if cmd[0] == "add":
                self.core.add_request(cmd[1], cmd[2])
            elif cmd[0] == "abort":
                outputs += self.core.abort(cmd[1])
                self._unqueue(cmd[1])
            elif cmd[0] == "abort_all":
                outputs += self.core.abort_all()
            elif cmd[0] == "install":
                _, row, tensors, visual, done = cmd
                try:
                    self.core.install_adapter(row, tensors, visual)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._loop.call_soon_threadsafe(_settle, done, e)
                else:
                    self._loop.call_soon_threadsafe(_settle, done, None)
            elif cmd[0] == "retire":
                self._retiring.add(cmd[1])

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._unqueue(out.request_id)
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
