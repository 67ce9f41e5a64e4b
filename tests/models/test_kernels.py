"""The bf16 GEMV kernel (models/kernels): built here, numerically a bf16 GEMV, and what batch-1 decode uses."""

import shutil
from pathlib import Path

import pytest
import torch

from models import kernels
from models.llama import linear, pack_weight

HAS_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
pytestmark = pytest.mark.timeout(600)


def test_builds_wherever_it_can_run():
    """On a CPU with AVX512-BF16 and a C++ compiler the kernel must build (a broken build would otherwise only
    show up as slower decode); elsewhere the model keeps oneDNN."""
    assert kernels.available() == (HAS_BF16 and shutil.which("c++") is not None)


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (48, 6), (16, 2)])
def test_gemv_matches_a_float32_reference_to_bf16_precision(shape):
    if not kernels.available():
        assert kernels.pack(torch.ones(shape, dtype=torch.bfloat16)) is None
        return
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).bfloat16()
    x = torch.randn(1, 1, shape[1], generator=gen).bfloat16()
    y = kernels.gemv(x, kernels.pack(w))
    ref = x.float() @ w.float().T
    assert y.shape == (1, 1, shape[0]) and y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 8e-3 * ref.abs().max()
    onednn = torch.nn.functional.linear(x, w)
    assert (y.float() - onednn.float()).abs().max() <= 8e-3 * ref.abs().max()


def test_linear_uses_it_for_one_row_only():
    w = torch.randn(64, 32).bfloat16()
    packed = pack_weight(w)
    assert (packed.gemv is not None) == kernels.available()
    rows = torch.randn(3, 2, 32).bfloat16()  # several rows: oneDNN
    assert torch.allclose(linear(rows, w, packed).float(), torch.nn.functional.linear(rows, w).float(), atol=0.05)
    one = rows[:1, :1]
    assert torch.allclose(linear(one, w, packed).float(), torch.nn.functional.linear(one, w).float(), atol=0.05)
    assert pack_weight(torch.randn(50, 32).bfloat16()).gemv is None  # rows not a multiple of 16
    assert pack_weight(torch.randn(64, 32)).gemv is None  # fp32: oneDNN only


def test_batch_one_decode_with_the_kernel_tracks_onednn(monkeypatch):
    """SmolLM2 in bf16, decoding greedily: logits with the kernel stay within bf16 noise of oneDNN's."""
    from models.loading import load_gguf
    from server.engine.runner import ModelRunner

    logits = {}
    for use in (True, False):
        if not use:
            monkeypatch.setattr(kernels, "pack", lambda w: None)
        runner = ModelRunner(load_gguf(dtype="bf16"), n_slots=1, max_context=64, kv_dtype=torch.bfloat16)
        assert any(l.attention.wqkv_packed.gemv is not None for l in runner.llama.layers) == (
            use and kernels.available())
        prompt = [1, 504, 3240, 282, 1173, 314]
        out, token = [], prompt[-1]
        runner.prefill(0, prompt, 0)
        for i in range(8):
            step = runner.decode([0], [token], [len(prompt) + i])[0]
            out.append(step)
            token = 504 + i  # a fixed continuation: both runs see the same tokens
        logits[use] = torch.stack(out)
    diff = (logits[True] - logits[False]).abs().max() / logits[False].abs().max()
    assert diff < 0.05
    assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() >= 0.75
