"""Our model against the golden outputs of the unmodified reference (tiny dims, fp32, CPU)."""

import torch

from models.llama import KVCache

ATOL = 1e-5


def _prefill(model, ids, vq, adapter=0):
    pkv = model.prompt_kv([vq], adapter)
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    with torch.inference_mode():
        return model.llama(tokens, positions, adapter_ids=torch.tensor([adapter]), prompt_kv=pkv, last_only=False)


def test_prompt_tokens(reference, golden):
    assert reference.tokenizer.encode(golden["prompt"], bos=True) == golden["prompt_tokens"]


def test_visual_query(reference, golden):
    vq = reference.model.encode_image(golden["image_tensor"], 0)
    torch.testing.assert_close(vq, golden["visual_query"], atol=ATOL, rtol=0)
    vq0 = reference.model.encode_image(reference.model.zero_image(), 0)
    torch.testing.assert_close(vq0, golden["visual_query_zero_image"], atol=ATOL, rtol=0)


def test_last_and_prefix_logits(reference, golden):
    model = reference.model
    vq = model.encode_image(golden["image_tensor"], 0)
    logits = _prefill(model, golden["prompt_tokens"], vq)[0]  # (T, vocab)
    torch.testing.assert_close(logits[-1:], golden["last_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, golden["prefix_logits"], atol=ATOL, rtol=0)
    # the prefix property holds for real prefills too, not only thanks to the causal mask
    for n in (1, 7, 20):
        short = _prefill(model, golden["prompt_tokens"][:n], vq)[0, -1]
        torch.testing.assert_close(short, golden["prefix_logits"][n - 1], atol=ATOL, rtol=0)


def greedy(model, prompts, images, n_new, chunk=None):
    """Greedy decoding of several rows in one batch with a slot KV cache (rows of unequal length)."""
    B = len(prompts)
    cache = KVCache.allocate(model.args, n_slots=B, max_len=128, dtype=torch.float32)
    vqs = [model.encode_image(img[None], 0) for img in images]
    pkvs = [model.prompt_kv([vq], 0) for vq in vqs]
    out = [[] for _ in range(B)]
    last = []
    with torch.inference_mode():
        for b, ids in enumerate(prompts):  # prefill each row into its slot (optionally in chunks)
            step = chunk or len(ids)
            for s in range(0, len(ids), step):
                piece = ids[s : s + step]
                logits = model.llama(
                    torch.tensor([piece]), torch.arange(s, s + len(piece))[None], cache=cache,
                    rows=torch.tensor([b]), adapter_ids=torch.tensor([0]), prompt_kv=pkvs[b],
                )
            last.append(logits[0])
        k = torch.cat([p.k for p in pkvs], dim=1)
        v = torch.cat([p.v for p in pkvs], dim=1)
        from models.llama import PromptKV

        pkv = PromptKV(k, v)
        lengths = [len(p) for p in prompts]
        logits = torch.stack(last)
        for _ in range(n_new):
            nxt = logits.argmax(-1)
            for b in range(B):
                out[b].append(int(nxt[b]))
            positions = torch.tensor(lengths)[:, None]
            logits = model.llama(
                nxt[:, None], positions, cache=cache, rows=torch.arange(B),
                adapter_ids=torch.zeros(B, dtype=torch.long), prompt_kv=pkv,
            )
            lengths = [n + 1 for n in lengths]
    return out


def test_greedy_ids_with_cache(reference, golden):
    ids = greedy(reference.model, [golden["prompt_tokens"]], golden["image_tensor"], 12)[0]
    assert ids == golden["greedy_ids"]
    assert reference.tokenizer.decode(ids) == golden["greedy_text"]


def test_chunked_prefill_matches(reference, golden):
    ids = greedy(reference.model, [golden["prompt_tokens"]], golden["image_tensor"], 12, chunk=5)[0]
    assert ids == golden["greedy_ids"]


def test_batched_rows(reference, golden):
    tok = reference.tokenizer
    prompts = [tok.encode(p, bos=True) for p in golden["batch_prompts"]]
    image = golden["image_tensor"][0]
    images = torch.stack([image, torch.flip(image, dims=[-1])])
    out = greedy(reference.model, prompts, images, 6)
    assert out == golden["batch_ids"]
    assert [tok.decode(o) for o in out] == golden["batch_texts"]


def test_cached_decode_equals_full_forward(reference, golden):
    model = reference.model
    vq = model.encode_image(golden["image_tensor"], 0)
    ids = golden["prompt_tokens"] + golden["greedy_ids"]
    full = _prefill(model, ids, vq)[0]
    cache = KVCache.allocate(model.args, 1, 64, torch.float32)
    pkv = model.prompt_kv([vq], 0)
    with torch.inference_mode():
        for t, tok in enumerate(ids):
            step = model.llama(torch.tensor([[tok]]), torch.tensor([[t]]), cache=cache, rows=torch.tensor([0]),
                               adapter_ids=torch.tensor([0]), prompt_kv=pkv)
            torch.testing.assert_close(step[0], full[t], atol=ATOL, rtol=0)
