"""Batched prefill: the prompts admitted in one step are prefilled in one forward, with the running decode rows
— packed rows on the fused CPU path, padded batches on the eager path — and give what one-at-a-time gives."""

import pytest
import torch

from server.engine.runner import Chunk, ModelRunner, _pad_groups
from tests.engine.conftest import GREEDY, image, make_core, request, tiny_plain, token_ids

PROMPTS = [[5, 9, 17, 33, 2, 8, 40], [7, 7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [60, 61, 62, 63, 64],
           [90, 3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def fused():
    """The tiny plain model quantized to int8: it runs the fused CPU forward, as the default model does."""
    loaded = tiny_plain(seed=3)
    loaded.model.llama.pack_weights("int8")
    assert loaded.model.llama.fused is not None  # this CPU has a kernel variant (avx2 at least)
    return loaded


def _count_forwards(core, monkeypatch) -> list[int]:
    """Counts the model's forwards (the fused kernel's calls for the fused model, which the runner makes
    through `forward_fused`), recording the rows (tokens) of each."""
    calls: list[int] = []
    llama = core.runner.llama
    real, real_fused = llama.forward, llama.forward_fused

    def counted(tokens, positions, **kw):
        calls.append(tokens.numel())
        return real(tokens, positions, **kw)

    def counted_fused(cache, tokens, *args):
        calls.append(len(tokens))
        return real_fused(cache, tokens, *args)

    monkeypatch.setattr(llama, "forward", counted)
    monkeypatch.setattr(llama, "forward_fused", counted_fused)
    return calls


def _sequential(loaded, prompts, params=GREEDY):
    return [token_ids(make_core(loaded).generate_all([(request("s", p, params), 0)])["s"]) for p in prompts]


@pytest.mark.parametrize("model", ["fused", "plain"])
def test_a_burst_is_prefilled_in_one_forward_and_equals_one_at_a_time(model, request_fixture, monkeypatch):
    loaded = request_fixture(model)
    core = make_core(loaded, max_batch=8, prefill_chunk=64)
    calls = _count_forwards(core, monkeypatch)
    outs = core.generate_all([(request(f"r{i}", p), 0) for i, p in enumerate(PROMPTS)])
    steps = GREEDY.max_tokens  # one step prefills all five prompts (their first tokens), then 7 decode steps
    if model == "fused":
        assert calls[0] == sum(map(len, PROMPTS)) and len(calls) == steps
    else:  # eager: lengths 11, 7, 6, 5, 3 pad into three batches (11, 7 | 6, 5 | 3: <= 25% padding each)
        assert calls[:3] == [2 * 11, 2 * 6, 3] and len(calls) == 3 + steps - 1
    assert [token_ids(outs[f"r{i}"]) for i in range(len(PROMPTS))] == _sequential(loaded, PROMPTS)


def test_a_joining_prompt_shares_the_running_rows_forward(fused, monkeypatch):
    """Continuous batching on the fused path: a prompt admitted while others decode costs no extra forward."""
    core = make_core(fused, max_batch=8, prefill_chunk=64)
    core.add_request(request("a", PROMPTS[0]), 0)
    core.step()  # a prefilled
    calls = _count_forwards(core, monkeypatch)
    core.add_request(request("b", PROMPTS[2]), 0)
    outs = {}
    for out in core.step():  # a decodes one token while b prefills: one forward of 1 + 11 rows
        outs.setdefault(out.request_id, []).append(out)
    assert calls == [1 + len(PROMPTS[2])]
    while core.has_work():
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
    assert token_ids(outs["b"]) == _sequential(fused, [PROMPTS[2]])[0]


def test_padded_prefill_logits_equal_one_sequence_at_a_time(two_adapters, golden):
    """The eager path's padded batches, with two adapters and images (adaption prompts per row): padding reads
    nothing and changes nothing."""
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    pixels = golden["image_tensor"][0]
    imgs = [(image(pixels, "img"),), (), (image(pixels, "img"), image(torch.flip(pixels, dims=[-1]), "flipped"))]
    adapters = [0, 1, 1]

    def runner():
        return ModelRunner(two_adapters, n_slots=4, max_context=64, kv_dtype=torch.float32)

    alone = []
    for i, p in enumerate(prompts):
        r = runner()
        r.admit(0, adapters[i], imgs[i])
        alone.append(r.forward([Chunk(0, tuple(p), 0)])[0])
    r = runner()
    for i in range(3):
        r.admit(i, adapters[i], imgs[i])
    together = r.forward([Chunk(i, tuple(p), 0) for i, p in enumerate(prompts)])
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-4, rtol=1e-4)
    # and decoding after a padded prefill reads the right K/V (padding went to the scratch row)
    nxt = together.argmax(-1).tolist()
    step = r.forward([Chunk(i, (nxt[i],), len(p)) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        one = runner()
        one.admit(0, adapters[i], imgs[i])
        one.forward([Chunk(0, tuple(p), 0)])
        torch.testing.assert_close(step[i], one.forward([Chunk(0, (nxt[i],), len(p))])[0], atol=1e-4, rtol=1e-4)


def test_pad_groups_keep_padding_small():
    chunks = [Chunk(i, tuple(range(n)), 0) for i, n in enumerate([30, 28, 29, 31, 4, 200, 5])]
    groups = _pad_groups(list(range(len(chunks))), chunks)
    assert groups[0] == [5]  # the long chunk alone
    assert sorted(groups[1]) == [0, 1, 2, 3]  # similar lengths together
    assert sorted(i for g in groups for i in g) == list(range(len(chunks)))
    for g in groups:
        T = max(len(chunks[i].tokens) for i in g)
        assert T * len(g) <= 1.25 * sum(len(chunks[i].tokens) for i in g)


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue
