"""Prefix caching: a follow-up prompt reuses a finished sequence's retained K/V — and gets exactly the tokens a
fresh engine gives — but only under the same adapter and images."""

import torch

from .conftest import GREEDY, image, make_core, request, token_ids

FIRST = [1, 5, 9, 22, 40, 7, 3, 60, 61, 17]


def _fresh(loaded, req, adapter=0):
    return token_ids(make_core(loaded).generate_all([(req, adapter)])[req.request_id])


def test_follow_up_turn_reuses_the_cache_and_matches_a_fresh_engine(plain):
    core = make_core(plain, max_batch=2)
    first = token_ids(core.generate_all([(request("t1", FIRST), 0)])["t1"])
    follow = FIRST + first + [44, 45, 46]  # the conversation so far plus a new user turn
    before = core.prompt_tokens_total
    out = token_ids(core.generate_all([(request("t2", follow), 0)])["t2"])
    reused = core.prompt_tokens_cached_total
    assert reused == len(FIRST) + len(first) - 1  # the last sampled token of turn 1 never entered the cache
    assert core.prompt_tokens_total - before == len(follow) - reused
    assert out == _fresh(plain, request("t2", follow))


def test_reuse_survives_row_swaps_and_other_traffic(plain):
    """Finished slots keep their K/V while other sequences come and go (rows are swapped to keep running
    sequences contiguous); every follow-up still matches a fresh engine."""
    core = make_core(plain, max_batch=4, prefill_chunk=5)
    prompts = {f"p{i}": [1 + i, 20 + i, 30, 31, 32 + i, 8, 9][: 5 + i] for i in range(2)}
    firsts = {}
    for rid, p in prompts.items():  # one at a time: slots 0 and 1
        firsts[rid] = token_ids(core.generate_all([(request(rid, p), 0)])[rid])
    # two others in slots 2 and 3: decoding them moves them to cache rows 0 and 1, the retained rows away
    core.generate_all([(request(f"o{i}", [90 + i, 3, 4, 5][: 2 + i]), 0) for i in range(2)])
    assert sorted(core.runner.rows.row_of[:2]) == [2, 3]
    follow = {f"{rid}+": p + firsts[rid] + [50] for rid, p in prompts.items()}
    outs = core.generate_all([(request(rid, p), 0) for rid, p in follow.items()])
    assert core.prompt_tokens_cached_total == sum(len(p) + len(firsts[r]) - 1 for r, p in prompts.items())
    for rid, p in follow.items():
        assert token_ids(outs[rid]) == _fresh(plain, request(rid, p)), rid


def test_another_image_or_adapter_is_never_reused(two_adapters, golden):
    core = make_core(two_adapters)
    a = image(golden["image_tensor"][0], "photo-a")
    b = image(torch.flip(golden["image_tensor"][0], dims=[-1]), "photo-b")
    prompt = golden["prompt_tokens"]
    G = GREEDY
    core.generate_all([(request("a", prompt, G, images=(a,)), 0)])
    assert core.prompt_tokens_cached_total == 0
    other_image = token_ids(core.generate_all([(request("b", prompt, G, images=(b,)), 0)])["b"])
    assert core.prompt_tokens_cached_total == 0  # same tokens, another image: recomputed
    other_adapter = token_ids(core.generate_all([(request("c", prompt, G, images=(a,)), 1)])["c"])
    assert core.prompt_tokens_cached_total == 0  # same tokens and image, another adapter: recomputed
    same = token_ids(core.generate_all([(request("d", prompt, G, images=(a,)), 0)])["d"])
    assert core.prompt_tokens_cached_total == len(prompt) - 1
    assert other_image == _fresh(two_adapters, request("b", prompt, G, images=(b,)))
    assert other_adapter == _fresh(two_adapters, request("c", prompt, G, images=(a,)), 1)
    assert same == _fresh(two_adapters, request("d", prompt, G, images=(a,)))


def test_reused_slot_admitted_while_others_decode(plain):
    """The reused slot joins while another sequence decodes, so the same step moves rows (decode compaction)
    before the follow-up's prefill reads its retained K/V: those positions must move with the slot."""
    from server.engine.types import SamplingParams

    core = make_core(plain, max_batch=2)
    first = token_ids(core.generate_all([(request("t1", FIRST), 0)])["t1"])
    follow = FIRST + first + [44]
    long = request("long", [70, 71], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    core.add_request(long, 0)
    core.step()  # "long" prefilled in slot 1 (cache row 1); its first decode step comes with t2's admission
    core.add_request(request("t2", follow), 0)
    outs = []
    while core.has_work():
        outs += core.step()
    assert core.prompt_tokens_cached_total == len(FIRST) + len(first) - 1
    assert token_ids([o for o in outs if o.request_id == "t2"]) == _fresh(plain, request("t2", follow))
