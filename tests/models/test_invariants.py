"""Model invariants: zero gates, LoRA merge, adapter banks, chunked/cached paths, early fusion."""

import shutil

import pytest
import torch

from models.llama import KVCache

from .conftest import REF, load_reference

ATOL = 1e-5


def _logits(lm, ids, image, adapter=0, prompts=True):
    model = lm.model
    pkv = model.prompt_kv([model.encode_image(image, adapter)], adapter) if prompts else None
    with torch.inference_mode():
        return model.llama(torch.tensor([ids]), torch.arange(len(ids))[None], adapter_ids=torch.tensor([adapter]),
                           prompt_kv=pkv, last_only=False)[0]


def _save_adapter(tmp_path, name, edit):
    ckpt = torch.load(REF / "adapter.pth", weights_only=True)
    edit(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_zero_gates_equal_no_prompts(golden):
    lm = load_reference()
    for layer in lm.model.llama.layers:
        layer.attention.gate.data.zero_()
    ids = golden["prompt_tokens"]
    torch.testing.assert_close(_logits(lm, ids, golden["image_tensor"]),
                               _logits(lm, ids, golden["image_tensor"], prompts=False), atol=0, rtol=0)


def test_visual_only_adapter_equals_plain_llama(golden, tmp_path):
    """An adapter whose only LLaMA-side tensors are zero gates: biases default to 0, norms to the base, and
    the prompts are gated off → plain LLaMA. (Without the gates the file is refused: see test_loading_errors.)"""

    def visual_only(c):
        for k in list(c["model"]):
            if k.startswith("llama.") and not k.endswith("attention.gate"):
                c["model"].pop(k)
            elif k.endswith("attention.gate"):
                c["model"][k] = torch.zeros_like(c["model"][k])

    path = _save_adapter(tmp_path, "visual-only.pth", visual_only)
    adapted = load_reference_with({"v": path})
    from models.loading import load_llama_adapter

    plain = load_llama_adapter(REF / "llama" / "tiny", REF / "tokenizer.model", adapters={})
    ids = golden["prompt_tokens"]
    with torch.inference_mode():
        want = plain.model.llama(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=False)[0]
    torch.testing.assert_close(_logits(adapted, ids, golden["image_tensor"]), want, atol=ATOL, rtol=0)


def load_reference_with(adapters):
    from models.loading import load_llama_adapter

    return load_llama_adapter(REF / "llama" / "tiny", REF / "tokenizer.model", adapters=adapters,
                              clip_model=str(REF / "clip-tiny.json"), clip_weights=REF / "clip-tiny.pt")


def test_lora_merged_equals_unmerged(golden):
    merged = load_reference(merge_lora=True)
    assert merged.model.llama.layers[0].attention.wq.lora_l1 is None
    ids = golden["prompt_tokens"]
    torch.testing.assert_close(_logits(merged, ids, golden["image_tensor"]),
                               _logits(load_reference(), ids, golden["image_tensor"]), atol=ATOL, rtol=0)


def test_adapter_banks_batch_rows_independently(golden, tmp_path):
    """Two different adapters on one base: a batch with one row each equals each row alone."""
    def perturb(c):
        for k, v in c["model"].items():
            if k.endswith((".bias", ".gate")):
                c["model"][k] = v + 0.5

    other = _save_adapter(tmp_path, "other.pth", perturb)
    both = load_reference_with({"a": REF / "adapter.pth", "b": other})
    ids = golden["prompt_tokens"]
    img = golden["image_tensor"]
    alone = [_logits(both, ids, img, adapter=a)[-1] for a in (0, 1)]
    assert not torch.allclose(alone[0], alone[1])
    torch.testing.assert_close(alone[0], golden["last_logits"][0], atol=ATOL, rtol=0)
    model = both.model
    pk = [model.prompt_kv([model.encode_image(img, a)], a) for a in (0, 1)]
    from models.llama import PromptKV

    pkv = PromptKV(torch.cat([p.k for p in pk], 1), torch.cat([p.v for p in pk], 1))
    with torch.inference_mode():
        batch = model.llama(torch.tensor([ids, ids]), torch.arange(len(ids)).expand(2, -1),
                            adapter_ids=torch.tensor([0, 1]), prompt_kv=pkv)
    torch.testing.assert_close(batch, torch.stack(alone), atol=ATOL, rtol=0)


def test_prompt_mask_pads_rows_with_fewer_images(reference, golden):
    """A row with one image padded to two images' prompts (masked) equals the unpadded row."""
    model = reference.model
    img = golden["image_tensor"]
    one = model.prompt_kv([model.encode_image(img, 0)], 0)
    from models.llama import PromptKV

    padded = PromptKV(torch.cat([one.k, torch.randn_like(one.k)], 3), torch.cat([one.v, torch.randn_like(one.v)], 3),
                      mask=torch.tensor([[True] * one.k.shape[3] + [False] * one.k.shape[3]]))
    ids = golden["prompt_tokens"]
    with torch.inference_mode():
        a = model.llama(torch.tensor([ids]), torch.arange(len(ids))[None], adapter_ids=torch.tensor([0]), prompt_kv=one)
        b = model.llama(torch.tensor([ids]), torch.arange(len(ids))[None], adapter_ids=torch.tensor([0]),
                        prompt_kv=padded)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_early_fusion_moves_prompts_to_first_layers(golden):
    late, early = load_reference(), load_reference(early_fusion=True)
    assert list(late.model.args.adapted_layers) == [1, 2, 3]
    assert list(early.model.args.adapted_layers) == [0, 1, 2]
    ids = golden["prompt_tokens"]
    assert not torch.allclose(_logits(late, ids, golden["image_tensor"]), _logits(early, ids, golden["image_tensor"]))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_loads_and_tracks_fp32(golden, dtype):
    lm = load_reference(dtype=dtype)
    assert lm.model.llama.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    logits = _logits(lm, golden["prompt_tokens"], golden["image_tensor"])[-1]
    assert int(logits.argmax()) == int(golden["last_logits"][0].argmax())
    assert (logits - golden["last_logits"][0]).abs().max() < 0.1


def test_cache_slots_are_isolated(reference, golden):
    """Writing one slot never changes another slot's results."""
    model = reference.model
    cache = KVCache.allocate(model.args, 2, 64, torch.float32)
    pkv = model.prompt_kv([model.encode_image(golden["image_tensor"], 0)], 0)
    ids = golden["prompt_tokens"]
    kw = dict(cache=cache, adapter_ids=torch.tensor([0]), prompt_kv=pkv)
    with torch.inference_mode():
        first = model.llama(torch.tensor([ids]), torch.arange(len(ids))[None], rows=torch.tensor([0]), **kw)
        model.llama(torch.tensor([ids[::-1]]), torch.arange(len(ids))[None], rows=torch.tensor([1]), **kw)
        again = model.llama(torch.tensor([ids[-1:]]), torch.tensor([[len(ids) - 1]]), rows=torch.tensor([0]), **kw)
    torch.testing.assert_close(first, again, atol=ATOL, rtol=0)


def test_sharded_base_merges(golden, tmp_path):
    """Meta model-parallel shards (column-parallel on dim 0, row-parallel on dim 1) merge to the same model."""
    base = torch.load(REF / "llama" / "tiny" / "consolidated.00.pth", weights_only=True)
    shards = [{}, {}]
    for k, v in base.items():
        if v.dim() == 1:
            parts = (v, v)
        elif k.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
            parts = v.chunk(2, dim=1)
        else:
            parts = v.chunk(2, dim=0)
        for s, p in zip(shards, parts, strict=True):
            s[k] = p.clone()
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(REF / "llama" / "tiny" / "params.json", d / "params.json")
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.0{i}.pth")
    from models.loading import load_llama_adapter

    lm = load_llama_adapter(d, REF / "tokenizer.model", {"tiny": REF / "adapter.pth"},
                            clip_model=str(REF / "clip-tiny.json"), clip_weights=REF / "clip-tiny.pt")
    torch.testing.assert_close(_logits(lm, golden["prompt_tokens"], golden["image_tensor"])[-1:],
                               golden["last_logits"], atol=ATOL, rtol=0)
