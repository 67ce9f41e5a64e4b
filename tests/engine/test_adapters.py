"""The engine on the reference-tiny LLaMA-Adapter V2: golden outputs, images, several adapters, vision cache."""

import torch

from server.engine.types import SamplingParams

from .conftest import image, make_core, request, run, token_ids

G = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_golden_greedy_ids(reference, golden):
    img = golden["image_tensor"][0]
    req = request("g", golden["prompt_tokens"], SamplingParams(max_tokens=12, temperature=0),
                  images=(image(img, "a"),))
    for chunk in (64, 5):
        outs = run(reference, [req], prefill_chunk=chunk)["g"]
        n = len(golden["greedy_ids"])
        assert token_ids(outs)[:n] == golden["greedy_ids"]


def test_golden_batch_ids(reference, golden):
    tok = reference.tokenizer
    img = golden["image_tensor"][0]
    images = [image(img, "a"), image(torch.flip(img, dims=[-1]), "a-flipped")]
    reqs = [request(f"b{i}", tok.encode(p, bos=True), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                    images=(images[i],)) for i, p in enumerate(golden["batch_prompts"])]
    outs = run(reference, reqs, prefill_chunk=7)
    assert [token_ids(outs[f"b{i}"]) for i in range(2)] == golden["batch_ids"]


def test_two_adapters_batched_equal_sequential(two_adapters, golden):
    tok = two_adapters.tokenizer
    img = golden["image_tensor"][0]
    imgs = [(), (image(img, "a"),), (image(torch.flip(img, dims=[-1]), "b"),), (image(img, "a"), image(img, "c"))]
    prompts = [tok.encode(p, bos=True) for p in ("a cat", "what is in the image? describe it", "hi", "two")]
    reqs = [(request(f"r{i}_{a}", prompts[i], G, images=imgs[i]), a) for a in (0, 1) for i in range(4)]
    alone = {r.request_id: token_ids(run(two_adapters, [(r, a)], max_batch=1)[r.request_id]) for r, a in reqs}
    together = run(two_adapters, reqs, prefill_chunk=6)
    assert {rid: token_ids(o) for rid, o in together.items()} == alone
    assert alone["r1_0"] != alone["r1_1"]  # the adapters differ


def test_repeated_image_hits_cache(reference, golden):
    img = image(golden["image_tensor"][0], "same-bytes")
    core = make_core(reference)
    first = core.generate_all([(request("a", golden["prompt_tokens"], G, images=(img,)), 0)])
    misses = core.runner.vision_misses
    second = core.generate_all([(request("b", golden["prompt_tokens"], G, images=(img,)), 0)])
    assert core.runner.vision_misses == misses and core.runner.vision_hits >= 1
    assert token_ids(first["a"]) == token_ids(second["b"])


def test_text_only_uses_zero_image(reference, golden):
    zero = image(reference.model.zero_image()[0], "zero")
    a = run(reference, [request("a", golden["prompt_tokens"], G)])["a"]
    b = run(reference, [request("b", golden["prompt_tokens"], G, images=(zero,))])["b"]
    assert token_ids(a) == token_ids(b)
