"""Every strict-loading failure is provoked and its message checked: never silently random weights."""

import hashlib
import json
import re
import shutil

import pytest
import torch

from models.loading import CheckpointError, load_gguf, load_llama_adapter

from .conftest import REF


@pytest.fixture
def files(tmp_path):
    """A writable copy of the reference-tiny checkpoint set."""
    shutil.copytree(REF, tmp_path / "ref")
    return tmp_path / "ref"


def load(files, adapter=None, llama_dir=None, **kw):
    return load_llama_adapter(
        llama_dir or files / "llama" / "tiny", files / "tokenizer.model", {"tiny": adapter or files / "adapter.pth"},
        clip_model=str(files / "clip-tiny.json"), clip_weights=files / "clip-tiny.pt", **kw,
    )


def edit_base(files, fn):
    path = files / "llama" / "tiny" / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def edit_adapter(files, fn):
    path = files / "adapter.pth"
    ckpt = torch.load(path, weights_only=True)
    fn(ckpt)
    torch.save(ckpt, path)


def test_missing_base_weight(files):
    edit_base(files, lambda sd: sd.pop("layers.1.attention.wq.weight"))
    with pytest.raises(CheckpointError, match=r"missing: layers\.1\.attention\.wq\.weight.*Refusing to run with random"):
        load(files)


def test_base_shape_mismatch(files):
    edit_base(files, lambda sd: sd.__setitem__("layers.2.feed_forward.w1.weight", torch.zeros(100, 64)))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*layers\.2\.feed_forward\.w1\.weight"):
        load(files)


def test_unexpected_base_key(files):
    edit_base(files, lambda sd: sd.__setitem__("layers.0.attention.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*layers\.0\.attention\.extra\.weight"):
        load(files)


def test_rope_freqs_is_ignored(files):
    """Meta's checkpoints carry a rope.freqs buffer: it is skipped, and the model is the same as without it."""
    before = load(files)
    edit_base(files, lambda sd: sd.__setitem__("layers.0.attention.inner_attention.rope.freqs", torch.zeros(8)))
    after = load(files)
    ids, pos = torch.tensor([[1, 5, 9]]), torch.arange(3)[None]
    with torch.inference_mode():
        torch.testing.assert_close(after.model.llama(ids, pos), before.model.llama(ids, pos), rtol=0, atol=0)


def test_adapter_shape_mismatch(files):
    edit_adapter(files, lambda c: c["model"].__setitem__("llama.layers.0.attention.wq.bias", torch.zeros(65)))
    with pytest.raises(CheckpointError, match=r"adapter\.pth: shape mismatch for llama\.layers\.0\.attention\.wq\.bias"):
        load(files)


def test_adapter_unexpected_key(files):
    edit_adapter(files, lambda c: c["model"].__setitem__("llama.layers.0.attention.wk.bias", torch.zeros(64)))
    with pytest.raises(CheckpointError, match=r"unexpected keys llama\.layers\.0\.attention\.wk\.bias"):
        load(files)


def test_adapter_unexpected_visual_key(files):
    edit_adapter(files, lambda c: c["model"].__setitem__("visual_blocks.0.attn.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"adapter\.pth.*unexpected keys \[visual_blocks\.0\.attn\.extra\]"):
        load(files)


def test_adapter_without_visual_modules(files):
    edit_adapter(files, lambda c: c["model"].pop("visual_query.weight"))
    with pytest.raises(CheckpointError, match=r"visual modules are missing \(visual_query\.weight\)"):
        load(files)


def test_truncated_base(files):
    path = files / "llama" / "tiny" / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot be read.*truncated"):
        load(files)


def test_truncated_adapter(files):
    path = files / "adapter.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"adapter\.pth: cannot be read"):
        load(files)


@pytest.mark.parametrize("extra", [{"n_kv_heads": 4}, {"norm_eps": 1e-5}, {"rope_theta": 500000.0}])
def test_llama2_or_3_params_under_a_llama1_adapter(files, extra):
    path = files / "llama" / "tiny" / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    with pytest.raises(CheckpointError, match=r"params\.json: this is not a LLaMA-1 base.*trained on LLaMA-1"):
        load(files)


def test_no_weights_in_llama_dir(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(files / "llama" / "tiny" / "params.json", empty)
    with pytest.raises(CheckpointError, match=r"no consolidated\.\*\.pth files"):
        load(files, llama_dir=empty)


def test_sha256_prefix_is_checked(files):
    data = (files / "adapter.pth").read_bytes()
    good = files / f"{hashlib.sha256(data).hexdigest()}_TINY.pth"
    good.write_bytes(data)
    load(files, adapter=good)
    bad = files / f"{'0' * 64}_TINY.pth"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"SHA256 does not match"):
        load(files, adapter=bad)


def test_not_an_adapter_file(files):
    with pytest.raises(CheckpointError, match=r"not a LLaMA-Adapter checkpoint"):
        load(files, adapter=files / "llama" / "tiny" / "consolidated.00.pth")


def test_missing_clip(files):
    with pytest.raises(CheckpointError, match=r"needs a CLIP tower"):
        load_llama_adapter(files / "llama" / "tiny", files / "tokenizer.model", {"tiny": files / "adapter.pth"})


def test_clip_weights_must_match_the_architecture(files):
    sd = torch.load(files / "clip-tiny.pt", weights_only=True)
    sd["visual.proj"] = torch.zeros(128, 16)
    torch.save(sd, files / "clip-tiny.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: visual\.proj"):
        load(files)


def test_unknown_clip_model_name(files):
    with pytest.raises(CheckpointError, match=r"unknown CLIP model 'ViT-Nope'"):
        load_llama_adapter(files / "llama" / "tiny", files / "tokenizer.model", {"tiny": files / "adapter.pth"},
                           clip_model="ViT-Nope", clip_weights=files / "clip-tiny.pt")


def test_config_is_inferred_from_shapes(files, golden):
    """Without a config, shapes give query_len/layer/depth/rank; heads come from the release default (16)."""
    from models.loading import AdapterSpec, adapter_hparams

    sd = torch.load(files / "adapter.pth", weights_only=True)["model"]
    hp = adapter_hparams(AdapterSpec("t", files / "adapter.pth", {}), sd)
    assert (hp["query_len"], hp["query_layer"], hp["v_depth"], hp["lora_rank"]) == (5, 3, 2, 4)
    assert hp["w_lora"] and hp["w_new_gate"] and hp["w_bias"]
    assert (hp["v_num_heads"], hp["v_mlp_ratio"]) == (16, 4.0)


def test_truncated_gguf(tmp_path):
    from models.loading import default_gguf_path

    src = default_gguf_path()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(2_000_000))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: not a readable GGUF file"):
        load_gguf(bad)


@pytest.mark.parametrize("key", [
    "llama.layers.2.attention.wq.bias",
    "llama.layers.0.feed_forward.lora_w2_l1.weight",
    "llama.layers.3.ffn_norm.weight",
    "llama.layers.1.attention.new_gate",
    "llama.layers.2.attention.gate",
])
def test_a_tensor_missing_for_one_layer_is_an_error_naming_it(files, key):
    """A bias, LoRA factor, norm or gate the file has for the other layers, missing for one: it would load as
    its default there (0, no LoRA, the base norm, gate 0) — refused, naming the file and the key."""
    edit_adapter(files, lambda c: c["model"].pop(key))
    with pytest.raises(CheckpointError, match=rf"adapter\.pth: {re.escape(key)} is missing.*download it again"):
        load(files)
