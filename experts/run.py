"""Concurrent, bounded execution of experts for one request; failures degrade, never fail the request.

Each expert gets its own lane of daemon worker threads (`workers_per_expert`; the server's default comes from
the cores; experts that are not re-entrant serialise themselves). An expert's timeout counts from the moment
a worker starts its call, so waiting behind other requests' calls on a busy server does not drop it; the wait
is bounded by the request's total budget and reported (`queue_observer`). A call that overruns is abandoned:
the request goes on without it, a queued call is dropped, and a hung call occupies only its own expert's
lane — it cannot starve the other experts, and since the threads are daemons it never blocks process exit.

Per request: every expert runs under min(its timeout, what is left of the total budget); experts that
consume others' results (`depends_on`) start when those finish. Successful results are cached in a bounded
LRU keyed on (image hash, expert, question if the expert `uses_question`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from experts.base import Expert, ExpertResult, Status, UnknownExpertError

Observer = Callable[[str, float, Status], None]  # (expert name, seconds, status) -> None, e.g. Prometheus
QueueObserver = Callable[[str, float], None]  # (expert name, seconds a call waited for a worker) -> None

log = logging.getLogger(__name__)


def image_digest(image: Image.Image) -> str:
    """sha256 of the decoded pixels (+ mode and size); the server may pass a hash of the raw bytes instead."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class LaneFullError(RuntimeError):
    """Too many calls are already waiting for this expert (a previous call may be hung)."""


class _Lane:
    """A bounded FIFO of calls served by `workers` daemon threads, started on first use."""

    def __init__(self, name: str, workers: int, max_backlog: int) -> None:
        self._name, self._workers, self._max_backlog = name, workers, max_backlog
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # submitted, not yet picked up by a worker (cancelled ones included)
        self._abandoned: set[concurrent.futures.Future] = set()  # running calls that overran their timeout
        self._lock = threading.Lock()

    @property
    def wedged(self) -> bool:
        """Every worker is busy with a call that overran its timeout: a new call would only wait."""
        with self._lock:
            return len(self._abandoned) >= self._workers

    def abandon(self, future: concurrent.futures.Future) -> None:
        """Nobody waits for this call any more: dropped if still queued, else counted until it ends."""
        with self._lock:
            if not future.cancel() and not future.done():
                self._abandoned.add(future)

    def submit(self, fn: Callable[..., Any], *args: Any) -> tuple[concurrent.futures.Future, concurrent.futures.Future]:
        """(result, started): `started` gets the time.monotonic() at which a worker began the call."""
        with self._lock:
            if self._waiting >= self._max_backlog:
                raise LaneFullError(f"{self._waiting} calls already waiting; a previous call may be hung")
            self._waiting += 1
            if not self._threads:
                self._threads = [threading.Thread(target=self._serve, name=f"expert-{self._name}-{i}", daemon=True)
                                 for i in range(self._workers)]
                for t in self._threads:
                    t.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, started, fn, args))
        return future, started

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._lock:
                self._waiting -= 1
            self._call(*item)
            with self._lock:
                self._abandoned.discard(item[0])
            item = None  # do not keep the last image alive while idle

    @staticmethod
    def _call(future: concurrent.futures.Future, started: concurrent.futures.Future, fn: Callable[..., Any],
              args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return  # abandoned while queued
        if started.set_running_or_notify_cancel():
            started.set_result(time.monotonic())
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            future.set_exception(e)

    def close(self) -> None:
        with self._lock:
            for _ in self._threads:
                self._queue.put(None)
            self._threads = []


class _LruCache:
    def __init__(self, size: int) -> None:
        self._size, self._data = size, OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> ExpertResult | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: ExpertResult) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class ExpertRunner:
    """Runs enabled experts for a request: concurrently, off the event loop, with timeouts and a cache."""

    def __init__(
        self,
        experts: Sequence[Expert],
        *,
        timeout: float = 10.0,
        timeouts: Mapping[str, float] | None = None,
        total_budget: float = 20.0,
        cache_size: int = 256,
        default: Sequence[str] | None = None,
        observer: Observer | None = None,
        workers_per_expert: int = 1,
        max_backlog: int = 16,
        queue_observer: QueueObserver | None = None,
    ) -> None:
        self._experts: dict[str, Expert] = {}
        for e in experts:
            if e.name in self._experts:
                raise ValueError(f"two experts are named {e.name!r}")
            self._experts[e.name] = e
        self._deps = {n: tuple(d for d in getattr(e, "depends_on", ()) if d in self._experts)
                      for n, e in self._experts.items()}
        self._check_acyclic()
        self._timeouts = {n: float((timeouts or {}).get(n, timeout)) for n in self._experts}
        self.total_budget = float(total_budget)
        self.default = self.resolve(default) if default is not None else tuple(self._experts)
        self._observer = observer
        self._queue_observer = queue_observer
        self.cache = _LruCache(cache_size)
        self._lanes = {n: _Lane(n, workers_per_expert, max_backlog) for n in self._experts}

    # ---- configuration -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Enabled experts, in configuration order."""
        return tuple(self._experts)

    def expert(self, name: str) -> Expert:
        return self._experts[name]

    def _check_acyclic(self) -> None:
        state: dict[str, int] = {}

        def visit(n: str, path: tuple[str, ...]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise ValueError(f"experts depend on each other in a cycle: {' -> '.join(path + (n,))}")
            state[n] = 1
            for d in self._deps[n]:
                visit(d, path + (n,))
            state[n] = 2

        for n in self._experts:
            visit(n, ())

    def resolve(self, names: Sequence[str] | None) -> tuple[str, ...]:
        """The experts a request asked for (None: the default set; []: none). Unknown names raise."""
        if names is None:
            return self.default
        if unknown := [n for n in names if n not in self._experts]:
            raise UnknownExpertError(
                f"unknown or disabled expert(s) {unknown}; enabled: {list(self._experts) or 'none'}")
        return tuple(dict.fromkeys(names))

    def warmup(self, names: Sequence[str] | None = None) -> dict[str, str | None]:
        """Load models now (blocking; call it off the event loop at startup). Returns name -> error or None."""
        errors: dict[str, str | None] = {}
        for name in self.resolve(names) if names is not None else self.names:
            warm = getattr(self._experts[name], "warmup", None)
            try:
                if warm is not None:
                    warm()
                errors[name] = None
            except Exception as e:  # noqa: BLE001 - reported to the caller
                log.warning("expert %s failed to warm up: %s", name, e)
                errors[name] = f"{type(e).__name__}: {e}"
        return errors

    def close(self) -> None:
        """Stop idle worker threads (calls still running finish in the background)."""
        for lane in self._lanes.values():
            lane.close()

    # ---- running -------------------------------------------------------------------------------------
    async def run(
        self,
        image: Image.Image,
        image_hash: str | None = None,
        question: str = "",
        names: Sequence[str] | None = None,
    ) -> list[ExpertResult]:
        """One ExpertResult per requested expert, in request order; never raises for an expert's failure.

        Raises UnknownExpertError for names that are not enabled (before doing any work). Cancelling the
        awaiting task cancels pending expert calls and returns at once.
        """
        requested = self.resolve(names)
        if not requested:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_budget
        # Decode lazily-loaded images once, here, rather than racing in several worker threads.
        try:
            digest = await asyncio.to_thread(_prepare, image, image_hash)
        except Exception as e:  # noqa: BLE001 - a broken image degrades every expert, not the request
            return [self._failed(n, 0.0, "error", f"image could not be read: {type(e).__name__}: {e}")
                    for n in requested]
        tasks: dict[str, asyncio.Task] = {}

        def start(name: str) -> asyncio.Task:
            if name not in tasks:
                tasks[name] = asyncio.ensure_future(self._run_one(name, image, digest, question, deadline, start))
            return tasks[name]

        try:
            return list(await asyncio.gather(*(start(n) for n in requested)))
        finally:
            for t in tasks.values():  # dependencies nobody awaits any more (only on cancellation)
                t.cancel()

    async def _run_one(
        self, name: str, image: Image.Image, digest: str, question: str, deadline: float,
        start: Callable[[str], asyncio.Task],
    ) -> ExpertResult:
        expert = self._experts[name]
        key = (digest, name, question if getattr(expert, "uses_question", False) else None)
        if (hit := self.cache.get(key)) is not None:
            self._observe(name, 0.0, "cached")
            return dataclasses.replace(hit, status="cached", seconds=0.0)

        inputs: dict[str, ExpertResult] = {}
        if deps := self._deps[name]:
            done = await asyncio.gather(*(start(d) for d in deps))
            inputs = {r.name: r for r in done if r.ok}

        loop = asyncio.get_running_loop()
        timeout = min(self._timeouts[name], deadline - loop.time())
        if timeout <= 0:
            return self._failed(name, 0.0, "timeout", "the total expert budget ran out before it could start")
        call = (expert.run_with, image, question, inputs) if deps else (expert.run, image, question)
        lane = self._lanes[name]
        if lane.wedged:
            return self._failed(name, 0.0, "timeout", "its workers are all busy with calls that overran the timeout")
        try:
            future, started = lane.submit(*call)
        except LaneFullError as e:
            return self._failed(name, 0.0, "timeout", str(e))
        queued = time.monotonic()
        # asyncio.wait, not wait_for: 3.11's wait_for swallows a cancellation that races a completion
        result_f, started_f = asyncio.wrap_future(future), asyncio.wrap_future(started)
        try:  # waiting for a worker: bounded by the request's total budget, not by the expert's own timeout
            await asyncio.wait((started_f, result_f), timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if not started_f.done():
                lane.abandon(future)
                self._observe_queue(name, time.monotonic() - queued)
                return self._failed(name, 0.0, "timeout", f"waited {time.monotonic() - queued:.2f} s for a "
                                    "worker; the total expert budget ran out")
            t0 = started_f.result()
            self._observe_queue(name, t0 - queued)
            ends = min(t0 + self._timeouts[name], deadline)  # loop.time() is time.monotonic(), the worker's clock
            # the expert's timeout counts from the start of its work
            await asyncio.wait((result_f,), timeout=max(0.0, ends - loop.time()))
        except asyncio.CancelledError:
            lane.abandon(future)
            raise
        if not result_f.done():
            lane.abandon(future)  # a running call cannot be interrupted
            return self._failed(name, time.monotonic() - t0, "timeout", f"no result within {ends - t0:.2f} s")
        try:
            result = result_f.result()
        except Exception as e:  # noqa: BLE001 - an expert's failure never fails the request
            return self._failed(name, time.monotonic() - t0, "error", f"{type(e).__name__}: {e}")
        seconds = time.monotonic() - t0
        if not isinstance(result, ExpertResult):
            return self._failed(name, seconds, "error", f"returned {type(result).__name__}, not ExpertResult")
        result = dataclasses.replace(result, name=name, seconds=seconds, status="ok", error=None)
        if len(inputs) == len(deps):  # a result built on partial inputs is not cached
            self.cache.put(key, result)
        self._observe(name, seconds, "ok")
        return result

    def _failed(self, name: str, seconds: float, status: Status, error: str) -> ExpertResult:
        log.warning("expert %s dropped (%s): %s", name, status, error)
        self._observe(name, seconds, status)
        return ExpertResult(name, "", (), seconds, status, error)

    def _observe_queue(self, name: str, seconds: float) -> None:
        _notify(self._queue_observer, name, seconds)

    def _observe(self, name: str, seconds: float, status: Status) -> None:
        _notify(self._observer, name, seconds, status)


def _notify(observer: Callable[..., None] | None, *args: Any) -> None:
    if observer is None:
        return
    try:
        observer(*args)
    except Exception:  # noqa: BLE001 - metrics must not break requests
        log.exception("expert observer failed")


def _prepare(image: Image.Image, image_hash: str | None) -> str:
    image.load()
    return image_hash or image_digest(image)
