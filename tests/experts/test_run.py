"""ExpertRunner: concurrency, timeouts, failures, cache, dependencies, cancellation, metrics hook."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import pytest
from PIL import Image

from experts import ExpertResult, ExpertRunner, UnknownExpertError, format_context
from experts.caption import CaptionExpert


class Echo:
    """Returns fixed text after `delay` seconds; counts its calls."""

    uses_question = False

    def __init__(self, name: str, text: str = "", delay: float = 0.0) -> None:
        self.name, self.text, self.delay, self.calls = name, text or f"{name} says hi", delay, 0

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        self.calls += 1
        time.sleep(self.delay)
        return ExpertResult(self.name, self.text, (question,))


class Hang:
    """Blocks until released (as a wedged model would); releases at teardown so the thread ends."""

    name = "hang"

    def __init__(self) -> None:
        self.release, self.started = threading.Event(), threading.Event()

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        self.started.set()
        self.release.wait(60)
        return ExpertResult(self.name, "too late")


class Boom:
    name = "boom"

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        raise RuntimeError("model exploded")


class Asks(Echo):
    uses_question = True

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        self.calls += 1
        return ExpertResult(self.name, f"answer to {question}")


class Needs:
    """A dependent expert: reports which inputs it received."""

    name = "needs"
    depends_on = ("a", "boom", "not-enabled")

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        return self.run_with(image, question, {})

    def run_with(self, image: Image.Image, question: str, inputs: Mapping[str, ExpertResult]) -> ExpertResult:
        return ExpertResult(self.name, "got " + ",".join(sorted(inputs)))


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (32, 32), (10, 20, 30))


@pytest.fixture
def hang():
    h = Hang()
    yield h
    h.release.set()


def test_hanging_expert_times_out_and_the_others_still_answer(image, hang):
    statuses = []
    runner = ExpertRunner([Echo("a"), hang, Echo("b", delay=0.05)], timeout=0.3,
                          observer=lambda n, s, st: statuses.append((n, st)))
    t0 = time.perf_counter()
    results = asyncio.run(runner.run(image, None, "q"))
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert [(r.name, r.status) for r in results] == [("a", "ok"), ("hang", "timeout"), ("b", "ok")]
    timed_out = results[1]
    assert timed_out.text == "" and "0.30 s" in timed_out.error and 0.25 < timed_out.seconds < 1.5
    assert format_context(results) == "a says hi\nb says hi"
    assert sorted(statuses) == [("a", "ok"), ("b", "ok"), ("hang", "timeout")]


def test_hung_expert_does_not_starve_the_others_on_later_requests(image, hang):
    runner = ExpertRunner([Echo("a"), hang], timeout=0.2)
    for i in range(3):  # the hang lane stays blocked; "a" keeps answering and "hang" keeps timing out
        results = asyncio.run(runner.run(image, f"image-{i}", ""))
        assert [r.status for r in results] == ["ok", "timeout"]


def test_failing_expert_degrades_with_its_error(image, caplog):
    runner = ExpertRunner([Boom(), Echo("a")])
    with caplog.at_level("WARNING", logger="experts.run"):
        results = asyncio.run(runner.run(image, None, ""))
    assert results[0].status == "error" and results[0].error == "RuntimeError: model exploded"
    assert results[1].ok
    assert "boom dropped (error)" in caplog.text
    assert format_context(results) == "a says hi"


def test_wrong_return_type_is_an_error_not_a_crash(image):
    class Bad:
        name = "bad"

        def run(self, image, question):
            return "just a string"

    (result,) = asyncio.run(ExpertRunner([Bad()]).run(image))
    assert result.status == "error" and "not ExpertResult" in result.error


def test_cache_hits_on_the_same_image_bytes(image):
    echo, asks = Echo("a"), Asks("asks")
    runner = ExpertRunner([echo, asks], cache_size=8)
    same_pixels = Image.new("RGB", (32, 32), (10, 20, 30))

    async def go():
        first = await runner.run(image, None, "q1")
        second = await runner.run(same_pixels, None, "q1")
        third = await runner.run(image, None, "q2")  # the question matters only to `asks`
        return first, second, third

    first, second, third = asyncio.run(go())
    assert [r.status for r in first] == ["ok", "ok"]
    assert [r.status for r in second] == ["cached", "cached"]
    assert [r.status for r in third] == ["cached", "ok"]
    assert second[0].text == first[0].text and third[1].text == "answer to q2"
    assert echo.calls == 1 and asks.calls == 2


def test_cache_is_keyed_on_the_given_hash_and_bounded(image):
    echo = Echo("a")
    runner = ExpertRunner([echo], cache_size=2)

    async def go():
        for h in ("h1", "h2", "h1", "h3", "h2"):
            await runner.run(image, h)

    asyncio.run(go())
    assert echo.calls == 4  # h1, h2 miss; h1 hits; h3 evicts h2; h2 misses again
    assert len(runner.cache) == 2


def test_failures_are_not_cached(image):
    flaky = Echo("flaky")
    flaky.fail = True

    def run(image, question):
        flaky.calls += 1
        if flaky.calls == 1:
            raise OSError("transient")
        return ExpertResult("flaky", "fine")

    flaky.run = run
    runner = ExpertRunner([flaky])

    async def go():
        return (await runner.run(image, "h"))[0], (await runner.run(image, "h"))[0]

    first, second = asyncio.run(go())
    assert (first.status, second.status) == ("error", "ok")


def test_request_selection(image):
    runner = ExpertRunner([Echo("a"), Echo("b")], default=["b"])
    assert [r.name for r in asyncio.run(runner.run(image))] == ["b"]
    assert asyncio.run(runner.run(image, names=[])) == []
    assert [r.name for r in asyncio.run(runner.run(image, names=["a", "b", "a"]))] == ["a", "b"]
    with pytest.raises(UnknownExpertError, match=r"unknown or disabled expert\(s\) \['ocr'\]"):
        asyncio.run(runner.run(image, names=["ocr"]))


def test_dependent_expert_gets_successful_inputs_and_partial_results_are_not_cached(image):
    a = Echo("a")
    runner = ExpertRunner([a, Boom(), Needs()])

    async def go():
        return await runner.run(image, "h", names=["needs"]), await runner.run(image, "h", names=["needs"])

    first, second = asyncio.run(go())
    assert [(r.name, r.text) for r in first] == [("needs", "got a")]  # only the requested one is returned
    assert second[0].status == "ok"  # recomputed: its input "boom" had failed
    assert a.calls == 1  # but "a" itself came from the cache


def test_grounded_caption_runs_after_its_inputs(image):
    class Det:
        name = "detection"

        def run(self, image, question):
            from experts.base import Detection

            time.sleep(0.05)
            return ExpertResult("detection", "Objects...", (Detection("horse", 0.9, (0, 0, 5, 5)),) * 2)

    runner = ExpertRunner([CaptionExpert(), Det()])
    caption, det = asyncio.run(runner.run(image, None, "", ["caption", "detection"]))
    assert caption.text == "Caption (from object detection, not a trained captioner): A picture of two horses."
    assert det.ok


def test_total_budget_bounds_the_request(image, hang):
    runner = ExpertRunner([hang, Echo("slow", delay=0.5), Needs(), Echo("a", delay=0.2)], timeout=5.0,
                          total_budget=0.3)
    t0 = time.perf_counter()
    results = asyncio.run(runner.run(image, None, "", ["hang", "needs", "a"]))
    assert time.perf_counter() - t0 < 1.5
    assert {r.name: r.status for r in results} == {"hang": "timeout", "needs": "ok", "a": "ok"}


def test_cancelling_the_request_returns_at_once(image, hang):
    runner = ExpertRunner([hang, Echo("a")], timeout=30)

    async def go():
        task = asyncio.create_task(runner.run(image, None, ""))
        await asyncio.to_thread(hang.started.wait, 5)
        task.cancel()
        t0 = time.perf_counter()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - t0

    assert asyncio.run(go()) < 0.5


def test_observer_errors_do_not_break_requests(image):
    def observer(name, seconds, status):
        raise ValueError("metrics backend down")

    (result,) = asyncio.run(ExpertRunner([Echo("a")], observer=observer).run(image))
    assert result.ok


def test_configuration_errors():
    with pytest.raises(ValueError, match="two experts are named"):
        ExpertRunner([Echo("a"), Echo("a")])

    class Loop:
        def __init__(self, name, dep):
            self.name, self.depends_on = name, (dep,)

        def run(self, image, question): ...

    with pytest.raises(ValueError, match="cycle"):
        ExpertRunner([Loop("x", "y"), Loop("y", "x")])


def test_warmup_reports_errors_per_expert():
    class Cold(Echo):
        def warmup(self):
            raise OSError("weights missing")

    runner = ExpertRunner([Echo("a"), Cold("cold")])
    assert runner.warmup() == {"a": None, "cold": "OSError: weights missing"}


def test_a_hung_expert_backlog_is_bounded(image, hang):
    """Concurrent calls queue behind a running one up to `max_backlog`; more are refused at once."""
    runner = ExpertRunner([hang], timeout=30, total_budget=0.3, max_backlog=2)

    async def go():
        first = asyncio.ensure_future(runner.run(image, "img-0"))
        await asyncio.to_thread(hang.started.wait, 5)  # the worker holds call 0; the next three queue or not
        rest = await asyncio.gather(*(runner.run(image, f"img-{i}") for i in range(1, 4)))
        return [r[0] for r in (await first, *rest)]

    results = asyncio.run(go())
    assert [r.status for r in results] == ["timeout"] * 4
    assert sum("calls already waiting" in r.error for r in results) == 1  # refused instead of queueing forever


def test_a_wedged_expert_refuses_at_once_instead_of_making_requests_wait(image, hang):
    """Once every worker holds a call that overran its timeout, later requests skip the expert at once."""
    runner = ExpertRunner([hang, Echo("a")], timeout=0.05, total_budget=20)

    async def go():
        return [await runner.run(image, f"img-{i}") for i in range(3)]

    t0 = time.monotonic()
    first, *later = asyncio.run(go())
    assert first[0].status == "timeout" and "no result within" in first[0].error
    for r in later:
        assert r[0].status == "timeout" and "overran" in r[0].error and r[1].status == "ok"
    assert time.monotonic() - t0 < 10  # not the 20 s budget per request


def test_an_unreadable_image_degrades_every_expert(tmp_path):
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:60])  # truncated: the header parses, the pixels do not
    results = asyncio.run(ExpertRunner([Echo("a")]).run(Image.open(path)))
    assert results[0].status == "error" and "image could not be read" in results[0].error


def test_eight_concurrent_requests_keep_their_experts_on_one_worker():
    """One worker, a 0.2 s expert, a 1 s timeout, 8 requests at once: the last call waits >= 1.4 s for the
    worker. The timeout counts from the start of the work, so every request keeps its expert (counted from
    submission, as before, the last ones timed out); the waits are reported to the queue observer."""
    waits: list[float] = []
    slow = Echo("slow", delay=0.2)
    runner = ExpertRunner([slow], timeout=1.0, total_budget=30.0, cache_size=0, workers_per_expert=1,
                          queue_observer=lambda name, seconds: waits.append(seconds))
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(8)]

    async def burst():
        return await asyncio.gather(*(runner.run(im, f"img{i}") for i, im in enumerate(images)))

    results = asyncio.run(burst())
    assert [r[0].status for r in results] == ["ok"] * 8, [r[0].error for r in results]
    assert slow.calls == 8 and len(waits) == 8
    assert max(waits) >= 7 * 0.2 - 0.05  # serial on one worker: the last waited for the seven before it
    runner.close()


def test_more_workers_run_an_expert_concurrently():
    """Four workers: four calls meet at a barrier (which only opens when all four run at once)."""
    barrier = threading.Barrier(4, timeout=20)

    class Meet(Echo):
        def run(self, image, question):
            barrier.wait()
            return super().run(image, question)

    runner = ExpertRunner([Meet("meet")], timeout=30.0, cache_size=0, workers_per_expert=4)

    async def burst():
        return await asyncio.gather(*(runner.run(Image.new("RGB", (8, 8), (i, 0, 0)), f"k{i}") for i in range(4)))

    assert [r[0].status for r in asyncio.run(burst())] == ["ok"] * 4
    runner.close()


def test_the_queue_wait_is_bounded_by_the_total_budget(image, hang):
    runner = ExpertRunner([hang], timeout=30.0, total_budget=0.5, workers_per_expert=1)

    async def two():
        first = asyncio.ensure_future(runner.run(image, "a"))
        await asyncio.sleep(0.05)
        second = await runner.run(Image.new("RGB", (4, 4)), "b")
        return second, await first

    second, first = asyncio.run(two())
    assert second[0].status == "timeout" and "for a worker" in second[0].error
    assert first[0].status == "timeout"
