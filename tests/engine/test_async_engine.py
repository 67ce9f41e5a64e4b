"""The async front end: streaming, aborts free slots, bounded queue, reservations, deadlines, drain."""

import asyncio
import time

import pytest

from server.engine.engine import AsyncEngine, EngineConfig
from server.engine.types import (
    ContextLengthError,
    EngineStoppedError,
    QueueFullError,
    SamplingParams,
    UnknownAdapterError,
)

from .conftest import request, run, token_ids

LONG = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)


def engine_run(loaded, body, **config):
    async def main():
        engine = AsyncEngine(loaded, EngineConfig(**{"max_context": 128, "max_batch": 2, "max_waiting": 2,
                                                      "prefill_chunk": 16, **config}))
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown(drain_timeout=1)

    return asyncio.run(main())


async def collect(engine, req, reservation=None):
    return [o async for o in engine.generate(req, reservation)]


async def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


def test_streams_same_tokens_as_core(plain):
    req = request("r", [1, 5, 9, 22], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    expected = token_ids(run(plain, [req])["r"])

    async def body(engine):
        outs = await collect(engine, req)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        assert token_ids(outs) == expected
        stats = engine.stats()
        assert stats.generation_tokens_total >= 10 and stats.prompt_tokens_total >= 4
        assert stats.running == 0 and stats.waiting == 0

    engine_run(plain, body)


def test_cancel_aborts_and_frees_slot(plain):
    async def body(engine):
        gens = [engine.generate(request(f"r{i}", [1, 5, 9], LONG)) for i in range(2)]
        firsts = [await g.__anext__() for g in gens]  # both running: every slot taken
        assert all(not f.finished for f in firsts) and engine.stats().kv_cache_usage == 1.0
        await gens[0].aclose()  # the client went away
        await wait_for(lambda: engine.stats().running == 1)
        outs = await collect(engine, request("next", [1, 2], SamplingParams(max_tokens=3, temperature=0)))
        assert outs[-1].finished
        task = asyncio.create_task(collect(engine, request("t", [1, 2], LONG)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gens[1].aclose()
        await wait_for(lambda: engine.stats().running == 0 and engine.stats().kv_cache_usage == 0)

    engine_run(plain, body)


def test_queue_full_and_reservations(plain):
    async def body(engine):
        engine.check_capacity()
        r1 = engine.reserve()
        with engine.reserve():
            with pytest.raises(QueueFullError):
                engine.check_capacity()
            with pytest.raises(QueueFullError):
                engine.reserve()
        engine.check_capacity()  # the context manager released its place
        outs = await collect(engine, request("a", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0)), r1)
        assert outs[-1].finished
        await wait_for(lambda: engine.stats().waiting == 0)
        r2 = engine.reserve()
        r2.release()
        r2.release()  # idempotent
        assert engine.stats().waiting == 0

    engine_run(plain, body, max_waiting=2)


def test_validation_errors(plain):
    async def body(engine):
        with pytest.raises(ContextLengthError):
            engine.validate(request("a", [1] * 100, SamplingParams(max_tokens=29)))
        with pytest.raises(ContextLengthError):
            engine.validate(request("a", [1] * 129, SamplingParams(max_tokens=1)))
        with pytest.raises(ContextLengthError):
            await collect(engine, request("a", [1] * 100, SamplingParams(max_tokens=100)))
        with pytest.raises(UnknownAdapterError):
            engine.validate(request("a", [1], adapter="nope"))
        with pytest.raises(ValueError):
            engine.validate(request("a", [1], SamplingParams(top_p=0)))
        with pytest.raises(ValueError):
            engine.validate(request("a", []))
        engine.validate(request("a", [1] * 100, SamplingParams(max_tokens=28)))
        assert engine.stats().waiting == 0

    engine_run(plain, body)


def test_deadline_aborts(plain):
    async def body(engine):
        req = request("d", [1, 2, 3], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                      deadline=time.monotonic() + 0.05)
        outs = await collect(engine, req)
        assert outs[-1].finish_reason == "abort"

    engine_run(plain, body, max_context=512)


def test_shutdown_refuses_and_aborts(plain):
    async def main():
        engine = AsyncEngine(plain, EngineConfig(max_context=512, max_batch=2))
        await engine.start()
        gen = engine.generate(request("r", [1, 2], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
        first = await gen.__anext__()
        task = asyncio.create_task(engine.shutdown(drain_timeout=0.05))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineStoppedError):
            engine.check_capacity()
        rest = [o async for o in gen]
        await task
        assert not first.finished and rest[-1].finish_reason == "abort"

    asyncio.run(main())


def test_n_choices_stream(plain):
    async def body(engine):
        outs = await collect(engine, request("n", [1, 5], SamplingParams(max_tokens=4, n=3, seed=3, ignore_eos=True)))
        assert sorted(o.index for o in outs if o.finished) == [0, 1, 2]

    engine_run(plain, body)


@pytest.mark.parametrize("where", ["_drain_inbox", "_publish", "abort_expired"])
def test_a_dead_engine_thread_fails_every_request_and_says_so(plain, where):
    """An exception outside the step's own try (the inbox, deadlines, publishing) used to kill the thread
    silently and hang every request. Now: in-flight requests end with an error, new ones are refused, and
    `on_failure` tells the server (which reports unhealthy and exits non-zero)."""
    async def body(engine):
        told = []
        engine.on_failure = told.append
        running = asyncio.create_task(collect(engine, request("a", [1, 2, 3], LONG)))
        await wait_for(lambda: engine.stats().running == 1)

        def broken(*a, **k):
            raise RuntimeError("injected")

        if where == "abort_expired":
            engine.core.abort_expired = broken
        else:
            setattr(engine, where, broken)
        engine._wake.set()
        with pytest.raises(EngineStoppedError, match="injected"):
            await asyncio.wait_for(running, 10)
        await wait_for(lambda: told)
        assert engine.failed and "injected" in told[0]
        with pytest.raises(EngineStoppedError, match="failed"):
            engine.reserve()

    engine_run(plain, body)
