"""Quantized weights held once: the default model kept in its GGUF types agrees with the dequantized fp32
path, and the LLaMA-Adapter reference survives load-time int8/int4 quantization within stated tolerances."""

import math
from pathlib import Path

import pytest
import torch

from models.kernels import quant
from models.kernels.quant import Bf16Weight, QuantWeight
from models.llama import KVCache
from models.loading import load_gguf
from tests.models.conftest import load_reference

TEXT = Path(__file__).resolve().parent.parent / "data" / "text" / "apache-2.0.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are"]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def kept():
    return load_gguf(dtype="fp32", max_seq_len=4096)  # quantization auto: Q4_1 / Q8_0 stay


@pytest.fixture(scope="module")
def dequantized():
    return load_gguf(dtype="fp32", max_seq_len=4096, quantization="none")


def _logits(loaded, ids, chunk=512):
    """Logits of every position as the engine computes them: prefilled in chunks into a bf16 KV cache (the
    fused forward for the kept model; the eager one for the dequantized model)."""
    llama = loaded.model.llama
    cache = KVCache.allocate(llama.args, 1, len(ids), torch.bfloat16)
    with torch.inference_mode():
        return torch.cat([llama(torch.tensor([ids[s : s + chunk]]), torch.arange(s, min(s + chunk, len(ids)))[None],
                                cache=cache, rows=torch.tensor([0]), last_only=False)[0].double()
                          for s in range(0, len(ids), chunk)])


def test_the_kept_model_runs_the_fused_forward_and_it_tracks_the_eager_one(kept, dequantized):
    """The default model serves through the fused kernel; the eager layers are the readable reference. Both
    round activations to int8, so they differ by quantization noise: the fused path must be as close to the
    dequantized fp32 model as the eager one is."""
    llama = kept.model.llama
    assert llama.fused is not None
    ids = kept.tokenizer.encode(TEXT.read_text())[:256]
    fused, ref = _logits(kept, ids), _logits(dequantized, ids)
    saved, llama.fused = llama.fused, None
    try:
        eager = _logits(kept, ids)
    finally:
        llama.fused = saved

    def err(a):
        return ((a - ref).abs().amax(-1) / ref.abs().amax(-1)).median()

    assert err(fused) <= 1.25 * err(eager), (err(fused), err(eager))
    assert (fused.argmax(-1) == eager.argmax(-1)).double().mean() >= 0.95


def test_a_tokens_logits_do_not_depend_on_batching_chunking_or_caching(kept):
    """The same bits for a token prefilled in one chunk, in chunks of 7, decoded one at a time, or in a batch
    with other rows (another length, another slot): what makes seeds reproduce in any configuration."""
    llama = kept.model.llama
    ids = kept.tokenizer.encode(TEXT.read_text())[:40]
    other = kept.tokenizer.encode("A different request sharing the batch, longer than the first one is.")

    def fresh(slots=3):
        return KVCache.allocate(llama.args, slots, 128, torch.bfloat16)

    with torch.inference_mode():
        one = llama(torch.tensor([ids]), torch.arange(len(ids))[None], cache=fresh(), rows=torch.tensor([0]),
                    last_only=False)[0]
        cache = fresh()
        chunks = torch.cat([llama(torch.tensor([ids[s : s + 7]]), torch.arange(s, min(s + 7, len(ids)))[None],
                                  cache=cache, rows=torch.tensor([2]), last_only=False)[0] for s in range(0, 40, 7)])
        cache = fresh()
        llama(torch.tensor([ids[:30]]), torch.arange(30)[None], cache=cache, rows=torch.tensor([1]))
        llama(torch.tensor([other]), torch.arange(len(other))[None], cache=cache, rows=torch.tensor([0]))
        decoded = []
        for i in range(30, 40):  # row 0: the other request, decoding at its own positions
            out = llama(torch.tensor([[ids[i]], [other[-1]]]), torch.tensor([[i], [len(other) + i - 30]]),
                        cache=cache, rows=torch.tensor([1, 0]))
            decoded.append(out[0])
    assert torch.equal(one, chunks)
    assert torch.equal(one[30:], torch.stack(decoded))


def test_every_base_weight_is_held_once_in_its_gguf_type(kept):
    llama = kept.model.llama
    for module, name in llama.linears():
        assert module.weight is None, name  # no plain copy beside the packed one
    for layer in llama.layers:
        assert isinstance(layer.attention.wqkv_packed, QuantWeight) and layer.attention.wqkv_packed.fmt == "Q4_1"
        assert isinstance(layer.feed_forward.w13_packed, QuantWeight)
        assert layer.attention.wo.packed.fmt == "Q4_1" and layer.feed_forward.w2.packed.fmt == "Q4_1"
        for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
            assert lin.packed is None  # they live in the fused weight only
    assert llama.embed_packed is llama.output_packed and llama.embed_packed.fmt == "Q8_0"  # tied, held once
    # 106.2M Q4_1 weights at 5 bits + 28.3M Q8_0 embeddings at 8.5 bits, within 1% (the file's own sizes)
    assert abs(llama.weight_bytes() - (106_168_320 * 20 / 32 + 28_311_552 * 34 / 32)) < 0.01 * llama.weight_bytes()


def test_teacher_forced_agreement_and_perplexity_on_2000_tokens(kept, dequantized):
    ids = kept.tokenizer.encode(TEXT.read_text())[:2048]
    assert len(ids) == 2048
    q, ref = _logits(kept, ids), _logits(dequantized, ids)
    agreement = (q.argmax(-1) == ref.argmax(-1)).double().mean().item()
    assert agreement >= 0.97, agreement  # measured 0.979 (fused), 0.974 (eager)

    def ppl(logits):
        lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
        return math.exp(-lp.mean().item())

    assert abs(ppl(q) / ppl(ref) - 1) < 0.01, (ppl(q), ppl(ref))  # measured -0.2% (fused), +0.25% (eager)
    # where the reference is not near a tie, the quantized model picks the same token
    top2 = ref.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 0.5
    assert (q.argmax(-1) == ref.argmax(-1))[clear].all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_agrees_except_at_near_ties(kept, dequantized, prompt):
    """The reference's greedy continuation (24 tokens), teacher-forced through the kept model: every token the
    reference chose with a margin of at least 0.5 logits is the kept model's choice too."""
    ids = kept.tokenizer.encode(prompt)
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(24):
            seq.append(int(_logits(dequantized, seq)[-1].argmax()))
    ref, q = _logits(dequantized, seq)[len(ids) - 1 : -1], _logits(kept, seq)[len(ids) - 1 : -1]
    top2 = ref.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 0.5
    assert clear.sum() >= 12  # the check has teeth
    assert torch.equal(q.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_reference_golden_with_quantization_none(golden):
    lm = load_reference(quantization="none")
    from tests.models.test_reference import _prefill

    vq = lm.model.encode_image(golden["image_tensor"], 0)
    torch.testing.assert_close(_prefill(lm.model, golden["prompt_tokens"], vq)[0, -1:], golden["last_logits"],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mode", "tolerance"), [("int8", 0.02), ("int4", 0.25)])
def test_reference_logits_under_load_time_quantization(golden, mode, tolerance):
    """The tiny reference (dim 64, random weights) quantized at load: logits within `tolerance` × the logits'
    range of the golden ones (measured: int8 ~0.5%, int4 ~7%); adapter tensors untouched."""
    lm = load_reference(quantization=mode)
    from tests.models.test_reference import _prefill

    llama = lm.model.llama
    assert isinstance(llama.layers[0].attention.wqkv_packed, QuantWeight)
    assert llama.layers[0].attention.wqkv_packed.fmt == mode
    assert llama.layers[0].attention.wq.bias.dtype == torch.float32  # adapter banks stay full precision
    assert lm.model.visual[0].visual_query.weight.dtype == torch.float32
    vq = lm.model.encode_image(golden["image_tensor"], 0)
    got = _prefill(lm.model, golden["prompt_tokens"], vq)[0]
    want = golden["prefix_logits"]
    scale = want.max() - want.min()
    assert (got - want).abs().max() <= tolerance * scale


def test_bf16_weights_are_held_once_in_the_kernel_layout():
    from models import kernels

    lm = load_gguf(dtype="bf16", quantization="none")
    llama = lm.model.llama
    if not kernels.has_bf16():
        assert llama.layers[0].attention.wq.weight is not None  # plain weights for F.linear
        return
    assert isinstance(llama.layers[0].attention.wqkv_packed, Bf16Weight)
    assert all(module.weight is None for module, _ in llama.linears())
    assert abs(llama.weight_bytes() - 134_515_008 * 2) < 0.01 * llama.weight_bytes()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_block_by_block_gives_the_whole_weight_result_and_hands_every_block_back(mode):
    """Load-time quantization works through a weight in blocks of rows (and loading drops each block's file
    pages once read): the packed result must not depend on the block size, padding rows included, and every
    row must be handed to `release` once, as a view of the weight."""
    from models.kernels import quant

    w = (torch.randn(100, 96, generator=torch.Generator().manual_seed(0)) * 0.02).half()  # 100: 4 padding rows
    whole = quant.quantize(w, mode, chunk=w.numel())
    for chunk, rows in ((16 * 96, 16), (40 * 96, 32)):  # blocks are whole multiples of 16 rows
        blocks = []
        part = quant.quantize(w, mode, chunk=chunk, release=blocks.append)
        for name in ("qs", "scales", "mins"):
            a, b = getattr(whole, name), getattr(part, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert [b.data_ptr() for b in blocks] == [w[i].data_ptr() for i in range(0, 100, rows)]
        assert torch.equal(torch.cat(blocks), w)


def test_bf16_packing_block_by_block_is_the_whole_weight_packing():
    """bf16 weights are packed at load block by block (their file pages dropped as they go): the layout must not
    depend on the block size, padding rows included, and every row must be handed to `release` once."""
    from models.kernels import quant

    w = (torch.randn(100, 96, generator=torch.Generator().manual_seed(1)) * 0.02).half()
    whole = quant.pack_bf16(w, chunk=w.numel())
    for chunk, rows in ((16 * 96, 16), (40 * 96, 32)):
        blocks = []
        part = quant.pack_bf16(w, chunk=chunk, release=blocks.append)
        assert torch.equal(whole.packed, part.packed) and (part.n, part.k) == (100, 96)
        assert [b.data_ptr() for b in blocks] == [w[i].data_ptr() for i in range(0, 100, rows)]
    assert torch.equal(whole.dequantize(), w.to(torch.bfloat16).float())


def test_a_bf16_meta_checkpoint_is_packed_as_it_is_read():
    """On a CPU with bf16 kernels, `--dtype bf16` packs the base weights while reading the file: the same layout
    pack_weights gives a loaded bf16 weight, each weight held once."""
    from models.kernels import quant
    from tests.models.conftest import REF, load_reference

    if not quant.kernels.has_bf16():
        pytest.skip("this CPU has no bf16 kernels (AVX512-BF16): bf16 weights stay plain tensors")
    sd = torch.load(REF / "llama" / "tiny" / "consolidated.00.pth", weights_only=True)
    llama = load_reference(dtype="bf16").model.llama
    attn = llama.layers[1].attention
    assert attn.wo.weight is None and isinstance(attn.wo.packed, quant.Bf16Weight)
    assert torch.equal(attn.wo.packed.packed, quant.pack_bf16(sd["layers.1.attention.wo.weight"].to(torch.bfloat16)).packed)
    assert torch.equal(llama.embed_packed.packed, quant.pack_bf16(sd["tok_embeddings.weight"].to(torch.bfloat16)).packed)


def _two_adapters(tmp_path, quantization, dtype="fp32"):
    """The reference adapter and a perturbed copy (other biases, gates, norms and LoRA) on one base (int8, or
    bf16 weights): with two adapters LoRA stays unmerged, so every adapter piece of the fused kernel is
    exercised."""
    from tests.models.conftest import REF

    sd = torch.load(REF / "adapter.pth", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    model = {k: v + 0.5 * torch.randn(v.shape, generator=gen).to(v.dtype) if k.startswith("llama.") else v
             for k, v in sd["model"].items()}
    torch.save({"model": model, "config": sd["config"]}, tmp_path / "other.pth")
    return load_reference(quantization=quantization, dtype=dtype,
                          adapters={"tiny": REF / "adapter.pth", "other": tmp_path / "other.pth"})


def _adapter_prefill(lm, ids, vqs, adapter, cache, row, chunk=64):
    """Logits of every position, prefilled in chunks into cache row `row` as the engine does (with a cache:
    the fused forward when the model has one)."""
    pkv = lm.model.prompt_kv(vqs, adapter)
    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            part = ids[s : s + chunk]
            out.append(lm.model.llama(torch.tensor([part]), torch.arange(s, s + len(part))[None], cache=cache,
                                      rows=torch.tensor([row]), adapter_ids=torch.tensor([adapter]), prompt_kv=pkv,
                                      last_only=False)[0])
    return torch.cat(out)


def test_an_adapter_model_runs_the_fused_forward_and_it_matches_the_eager_one(golden, tmp_path):
    """LLaMA-Adapter V2 through the fused kernel (per-adapter norms, biases, unmerged LoRA, gated adaption
    prompts with the visual query): the same logits as the eager layers over the same int8 weights, for both
    adapters (they round activations to int8 alike; what differs is fp32 summation order)."""
    lm = _two_adapters(tmp_path, "int8")
    llama = lm.model.llama
    assert llama.fused is not None and llama.layers[0].attention.wq.lora_l1 is not None  # LoRA not merged
    ids = golden["prompt_tokens"]
    vq = lm.model.encode_image(golden["image_tensor"], 0)
    for adapter in (0, 1):
        fused = _adapter_prefill(lm, ids, [vq], adapter, KVCache.allocate(llama.args, 2, 128, torch.float32), 1, 5)
        saved, llama.fused = llama.fused, None
        try:
            eager = _adapter_prefill(lm, ids, [vq], adapter, KVCache.allocate(llama.args, 2, 128, torch.float32), 1)
        finally:
            llama.fused = saved
        scale = eager.max() - eager.min()
        assert (fused - eager).abs().max() <= 2e-3 * scale, ((fused - eager).abs().max(), scale)
    # and against the golden (fp32) logits of the first adapter, within int8's tolerance (see above)
    fused = _adapter_prefill(lm, ids, [vq], 0, KVCache.allocate(llama.args, 1, 128, torch.float32), 0)
    want = golden["prefix_logits"]
    assert (fused - want).abs().max() <= 0.02 * (want.max() - want.min())


BF16 = pytest.mark.skipif(not quant.kernels.has_bf16(), reason="bf16 weights are packed (and fused) only on CPUs "
                          "with AVX512-BF16; elsewhere they stay plain tensors for the eager layers")


@BF16
@pytest.mark.parametrize("adapters", ["none", "one", "two"])
def test_a_bf16_model_runs_the_fused_forward_and_it_is_as_close_to_fp32_as_the_eager_one(golden, tmp_path, adapters):
    """bf16 weights (`--dtype bf16`, the default for 16-bit checkpoints on CPUs with native bf16) run the fused
    kernel too: plain, with one adapter and with two (bf16 LoRA and adaption prompts read in place). The eager bf16 layers round every op to bf16, the kernel only each product's input, so
    they differ by bf16 rounding: the fused logits must be as close to the fp32 model's as the eager ones
    (measured: 0.69% vs 0.72% of the range for the reference adapter, 7.1% vs 7.9% for the perturbed one)."""
    from tests.models.conftest import REF

    chosen = {"none": {}, "one": {"tiny": REF / "adapter.pth"}}.get(adapters)
    if chosen is None:
        lm, ref = _two_adapters(tmp_path, "none", "bf16"), _two_adapters(tmp_path, "none", "fp32")
    else:
        lm, ref = (load_reference(quantization="none", dtype=d, adapters=chosen) for d in ("bf16", "fp32"))
    llama = lm.model.llama
    assert llama.fused is not None and ref.model.llama.fused is None
    assert (llama.layers[0].attention.wq.lora_l1 is not None) == (adapters != "none")  # bf16 LoRA, read in place
    ids = golden["prompt_tokens"]
    for adapter in range(max(1, llama.args.n_adapters)):
        vqs = [] if adapters == "none" else [lm.model.encode_image(golden["image_tensor"].to(torch.bfloat16), 0)]
        vqs32 = [] if adapters == "none" else [ref.model.encode_image(golden["image_tensor"], 0)]

        def run(loaded, vq, dtype, chunk=64, adapter=adapter):
            cache = KVCache.allocate(loaded.model.llama.args, 2, 128, dtype)
            if adapters == "none":
                with torch.inference_mode():
                    return torch.cat([loaded.model.llama(torch.tensor([ids[s : s + chunk]]),
                                                         torch.arange(s, min(s + chunk, len(ids)))[None], cache=cache,
                                                         rows=torch.tensor([1]), last_only=False)[0]
                                      for s in range(0, len(ids), chunk)])
            return _adapter_prefill(loaded, ids, vq, adapter, cache, 1, chunk)

        want = run(ref, vqs32, torch.float32)
        fused = run(lm, vqs, torch.bfloat16, chunk=5)
        saved, llama.fused = llama.fused, None
        try:
            eager = run(lm, vqs, torch.bfloat16)
        finally:
            llama.fused = saved
        scale = want.max() - want.min()
        err_fused, err_eager = (fused - want).abs().max() / scale, (eager - want).abs().max() / scale
        assert err_fused <= 1.25 * err_eager, (err_fused, err_eager)
        assert err_fused <= (0.02 if adapter == 0 else 0.12), err_fused
        assert (fused - eager).abs().max() > 0  # two paths were compared


@pytest.mark.parametrize("weights", ["int8", pytest.param("bf16", marks=BF16)])
def test_an_adapter_tokens_logits_do_not_depend_on_batching_or_chunking(golden, tmp_path, weights):
    """Through the fused kernel an adapter model's token has the same bits alone, chunked, or decoded in one
    forward with rows of the other adapter, other images and another number of prompts (int8 weights, and
    bf16 weights with bf16 LoRA and adaption prompts)."""
    from models.llama import PromptKV

    lm = _two_adapters(tmp_path, "int8") if weights == "int8" else _two_adapters(tmp_path, "none", "bf16")
    llama, model = lm.model.llama, lm.model
    assert llama.fused is not None
    ids = golden["prompt_tokens"]
    image = golden["image_tensor"].to(llama.dtype)
    vq = model.encode_image(image, 0)
    flipped = model.encode_image(torch.flip(image, dims=[-1]), 1)
    other = ids[:9]
    one = _adapter_prefill(lm, ids, [vq], 0, KVCache.allocate(llama.args, 3, 128, torch.float32), 2)
    chunked = _adapter_prefill(lm, ids, [vq], 0, KVCache.allocate(llama.args, 3, 128, torch.float32), 0, chunk=3)
    assert torch.equal(one, chunked)
    # decode the last 4 tokens of `ids` in one forward with a row of the other adapter with two images
    cache = KVCache.allocate(llama.args, 3, 128, torch.float32)
    n = len(ids) - 4
    _adapter_prefill(lm, ids[:n], [vq], 0, cache, 2)
    _adapter_prefill(lm, other, [flipped, flipped], 1, cache, 0)
    a, b = model.prompt_kv([vq], 0), model.prompt_kv([flipped, flipped], 1)
    P = b.k.shape[3]
    pad = torch.zeros_like(a.k[:, :, :, :1]).expand(-1, -1, -1, P - a.k.shape[3], -1)
    k = torch.cat([torch.cat([a.k, pad], 3), b.k], 1)  # (n_adapted, 2, K, P, D): rows of 10 and 20 prompts
    v = torch.cat([torch.cat([a.v, pad], 3), b.v], 1)
    pkv = PromptKV(k.contiguous(), v.contiguous(), rows=torch.tensor([0, 1]), lengths=torch.tensor([a.k.shape[3], P]))
    decoded = []
    with torch.inference_mode():
        for i in range(n, len(ids)):
            out = llama(torch.tensor([[ids[i]], [other[-1]]]), torch.tensor([[i], [len(other) + i - n]]),
                        cache=cache, rows=torch.tensor([2, 0]), adapter_ids=torch.tensor([0, 1]), prompt_kv=pkv)
            decoded.append(out[0])
    assert torch.equal(one[n:], torch.stack(decoded))
