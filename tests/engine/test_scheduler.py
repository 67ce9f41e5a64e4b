"""The scheduler alone, without torch: admission, chunked prefill budget, stops, aborts."""

from server.engine.scheduler import Scheduler, Sequence


def seq(rid, n_prompt, max_tokens=4, stop=frozenset({99})):
    return Sequence(rid, 0, list(range(n_prompt)), max_tokens, stop)


def step(sched, token=7):
    """Runs a plan with a fake model that always samples `token`."""
    out = sched.schedule()
    sched.computed(out)
    sampled = [s for s in out.decode] + [c.seq for c in out.prefill if c.last]
    reasons = {s.request_id: sched.append_token(s, token) for s in sampled}
    return out, reasons


def test_admission_is_bounded_by_slots_and_batch():
    sched = Scheduler(n_slots=2, max_batch=8, prefill_budget=100, max_context=64)
    sched.add([seq("a", 3), seq("b", 3), seq("c", 3)])
    out, _ = step(sched)
    assert [s.request_id for s in out.admitted] == ["a", "b"]
    assert len(sched.waiting) == 1 and sched.slots_in_use == 2
    assert {s.slot for s in out.admitted} == {0, 1}


def test_long_prompt_is_chunked_and_decode_keeps_running():
    sched = Scheduler(n_slots=4, max_batch=4, prefill_budget=8, max_context=64)
    sched.add([seq("short", 3, max_tokens=10)])
    step(sched)  # short prefilled, first token sampled
    sched.add([seq("long", 20)])
    chunks = []
    for _ in range(3):
        out, _ = step(sched)
        assert [s.request_id for s in out.decode][:1] == ["short"]  # never stalled by the long prompt
        chunks += [(c.start, c.end) for c in out.prefill]
    assert chunks == [(0, 7), (7, 14), (14, 20)]  # one budget of 8: the decode row takes one, prompts the rest
    long = next(s for s in sched.running if s.request_id == "long")
    assert long.num_computed == 20 and long.output_ids == [7]


def test_budget_is_shared_between_prefills():
    sched = Scheduler(n_slots=4, max_batch=4, prefill_budget=10, max_context=64)
    sched.add([seq("a", 6), seq("b", 6)])
    out, _ = sched.schedule(), None
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("a", 0, 6), ("b", 0, 4)]


def test_stop_token_and_length_free_the_slot():
    sched = Scheduler(n_slots=1, max_batch=1, prefill_budget=16, max_context=64)
    sched.add([seq("a", 3, max_tokens=2), seq("b", 3)])
    _, reasons = step(sched)
    assert reasons == {"a": None}
    _, reasons = step(sched)
    assert reasons == {"a": "length"} and sched.free_slots == [0]
    out, reasons = step(sched, token=99)
    assert [s.request_id for s in out.admitted] == ["b"] and reasons == {"b": "stop"}
    assert not sched.has_work()


def test_context_limit_finishes_with_length():
    sched = Scheduler(n_slots=1, max_batch=1, prefill_budget=16, max_context=6)
    sched.add([seq("a", 4, max_tokens=100)])
    step(sched)
    _, reasons = step(sched)
    assert reasons == {"a": "length"}


def test_abort_frees_slot_for_waiting_request():
    sched = Scheduler(n_slots=1, max_batch=1, prefill_budget=16, max_context=64)
    sched.add([seq("a", 3, max_tokens=50), seq("b", 3)])
    step(sched)
    aborted = sched.abort("a")
    assert [s.finish_reason for s in aborted] == ["abort"] and sched.free_slots == [0]
    out, _ = step(sched)
    assert [s.request_id for s in out.admitted] == ["b"]
    assert sched.abort("missing") == []


def test_abort_of_waiting_request():
    sched = Scheduler(n_slots=1, max_batch=1, prefill_budget=16, max_context=64)
    sched.add([seq("a", 3), seq("b", 3)])
    step(sched)
    assert [s.request_id for s in sched.abort("b")] == ["b"] and not sched.waiting


def test_a_freed_slot_is_reused_for_the_longest_prefix_under_the_same_key():
    sched = Scheduler(n_slots=3, max_batch=3, prefill_budget=100, max_context=64)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], 2, frozenset(), cache_key=("adapter0", ("img1",)))
    b = Sequence("b", 0, [1, 2, 9], 2, frozenset(), cache_key=("adapter0", ("img1",)))
    sched.add([a, b])
    while sched.has_work():
        step(sched)
    assert sched.retained[a_slot := 0] == (a.cache_key, [1, 2, 3, 4, 5, 7])  # prompt + computed outputs
    # longest prefix under the same key: a's slot; its prefill starts after the reused tokens
    c = Sequence("c", 0, [1, 2, 3, 4, 5, 7, 7, 8], 2, frozenset(), cache_key=("adapter0", ("img1",)))
    sched.add([c])
    out = sched.schedule()
    assert c.slot == a_slot and c.num_cached == 6 and out.prefill[0].start == 6
    # another image: the same tokens are not reusable (the image enters every adapted layer)
    d = Sequence("d", 0, [1, 2, 9, 4], 2, frozenset(), cache_key=("adapter0", ("img2",)))
    sched.add([d])
    out = sched.schedule()
    chunk = next(c for c in out.prefill if c.seq is d)
    assert d.num_cached == 0 and chunk.start == 0 and d.slot == 2  # the never-used slot, not b's
    # an exact repeat recomputes its last prompt token (its logits give the first output)
    e = Sequence("e", 0, [1, 2, 9], 2, frozenset(), cache_key=("adapter0", ("img1",)))
    sched.add([e])
    sched.schedule()
    assert e.slot == 1 and e.num_cached == 2


def test_prefix_caching_off_never_reuses():
    sched = Scheduler(n_slots=1, max_batch=1, prefill_budget=100, max_context=64, prefix_caching=False)
    sched.add([seq("a", 5)])
    while sched.has_work():
        step(sched)
    sched.add([again := seq("b", 8)])
    assert sched.schedule().prefill[0].start == 0 and again.num_cached == 0
