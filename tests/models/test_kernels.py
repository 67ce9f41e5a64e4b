"""The packed-weight kernels (models/kernels): every variant this CPU can run, and the plain-torch path, against
an fp32 reference; lossless GGUF repacking; batch invariance; and the fallback when a build fails."""

import logging
import shutil

import numpy as np
import pytest
import torch

from models import kernels
from models.kernels import quant

pytestmark = pytest.mark.timeout(900)

RUNNABLE = [v for v in kernels.ORDER if kernels.supported(v)]
PATHS = ["torch", *RUNNABLE]


def test_every_variant_this_cpu_supports_builds():
    """A broken build would otherwise show up only as slow decode: where a compiler exists, each variant the
    CPU supports must build, and the best one is chosen."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the torch path is covered by the other tests")
    for v in RUNNABLE:
        assert kernels.load_variant(v) is not None, v
    assert kernels.isa() == (RUNNABLE[0] if RUNNABLE else "torch")


def _ref(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


def _quant_error_bound(x, w_deq, group):
    """What int8 activations per group of 16 may cost: |x - x_q| ≤ d_x/2 per element, summed against |w|."""
    xg = x.double().view(x.shape[0], -1, group)
    half_step = (xg.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(xg).reshape(x.shape)
    return half_step @ w_deq.double().abs().T


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(48, 64), (576, 576), (100, 1536)])  # 100: padding rows
def test_quantized_product_is_exact_up_to_activation_quantization(path, mode, shape):
    gen = torch.Generator().manual_seed(hash((mode, shape)) % 2**31)
    w = torch.randn(shape, generator=gen)
    x = torch.randn(5, shape[1], generator=gen)
    q = quant.quantize(w, mode)
    deq = q.dequantize()
    # the weights themselves: within half a quantization step of the original
    step = (w.view(shape[0], -1, 32).abs().amax(-1) / 127 if mode == "int8"
            else (w.view(shape[0], -1, 32).amax(-1) - w.view(shape[0], -1, 32).amin(-1)) / 15)
    assert ((deq - w).view(shape[0], -1, 32).abs() <= step[..., None] * 0.5 + 1e-3).all()
    y = q.matmul(x, variant=path)
    assert y.shape == (5, shape[0]) and y.dtype == torch.float32
    err = (y.double() - _ref(deq, x)).abs()
    assert (err <= _quant_error_bound(x, deq, quant.ACT_GROUP) + 1e-4).all()


@pytest.mark.parametrize("path", RUNNABLE)
def test_kernels_compute_what_the_torch_path_computes(path):
    """Same arithmetic (integer dot products per group, fp32 scaling): equal up to fp32 summation order."""
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 256, generator=gen), torch.randn(7, 256, generator=gen)
    for mode in ("int8", "int4"):
        q = quant.quantize(w, mode)
        a, b = q.matmul(x, variant=path), q.matmul(x, variant="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_a_rows_result_does_not_depend_on_its_batch(path):
    """Fixed reduction order: row i computed alone, in a batch of 13, or in a batch of 2 is the same, bit for
    bit. This is what lets a seeded request reproduce whatever else is running."""
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(64, 320, generator=gen), torch.randn(13, 320, generator=gen).bfloat16()
    weights = [quant.quantize(w, "int8"), quant.quantize(w, "int4")]
    if path != "torch" and kernels.has_bf16(path):
        weights.append(quant.pack_bf16(w))
    for q in weights:
        full = q.matmul(x, variant=path)
        for i in (0, 5, 12):
            assert torch.equal(q.matmul(x[i : i + 1], variant=path), full[i : i + 1]), (q.fmt, i)
        assert torch.equal(q.matmul(x[3:5], variant=path), full[3:5])


@pytest.mark.skipif(not kernels.has_bf16(), reason="bf16 kernel needs AVX512-BF16 and the avx512 build")
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (48, 6), (20, 2)])
def test_bf16_product_matches_fp32_to_bf16_precision(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).bfloat16()
    x = torch.randn(3, 1, shape[1], generator=gen).bfloat16()
    packed = quant.pack_bf16(w)
    y = packed.matmul(x)
    ref = x.double() @ w.double().T
    assert y.shape == (3, 1, shape[0]) and y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= 8e-3 * ref.abs().max()
    assert torch.equal(packed.dequantize(), w.float())


def _gguf_blocks(qtype: str, n: int, k: int) -> np.ndarray:
    """Raw GGUF bytes of an (n, k) tensor: gguf's own quantizer where it has one, else random blocks with
    sane fp16 scales (every bit pattern of the codes is valid)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    t = GGMLQuantizationType[qtype]
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        return quantize(rng.standard_normal((n, k)).astype(np.float32), t)
    size = {"Q4_K": 144, "Q6_K": 210}[qtype]
    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (n, k // 256, 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        raw[..., 0:4] = scales.reshape(n, k // 256, 4)  # d, dmin
    else:
        raw[..., 208:210] = scales[..., 0, :].reshape(n, k // 256, 2)  # d
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", quant.GGUF_KEPT)
def test_gguf_tensors_repack_losslessly_and_multiply_right(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n, k = 40, 512
    raw = _gguf_blocks(qtype, n, k)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32))
    w = quant.from_gguf(raw, qtype, n, k)
    assert w.shape == (n, k) and w.fmt == qtype
    torch.testing.assert_close(w.dequantize(), want, rtol=0, atol=0)
    released = []
    blocks = quant.from_gguf(raw, qtype, n, k, chunk=16 * k, release=released.append)  # 16 rows at a time
    for name in ("qs", "scales", "mins"):  # the same bytes
        a, b = getattr(w, name), getattr(blocks, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    # each block of the source goes back (loading drops its file pages) once converted, every row once
    assert [r.__array_interface__["data"][0] for r in released] == [raw[i].ctypes.data for i in (0, 16, 32)]
    assert np.array_equal(np.concatenate(released), raw)
    ids = torch.tensor([[3, 39], [0, 17]])
    torch.testing.assert_close(w.rows(ids), want[ids], rtol=0, atol=0)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(3))
    for path in PATHS:
        err = (w.matmul(x, variant=path).double() - _ref(want, x)).abs()
        assert (err <= _quant_error_bound(x, want, quant.ACT_GROUP) + 1e-4).all(), path


def test_fused_weights_concatenate_rows_and_refuse_mixed_formats():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)
    qa, qb = quant.quantize(a, "int4"), quant.quantize(b, "int4")
    fused = quant.cat([qa, qb])
    x = torch.randn(2, 64, generator=gen)
    torch.testing.assert_close(fused.matmul(x), torch.cat([qa.matmul(x), qb.matmul(x)], -1))
    assert quant.cat([qa, quant.quantize(b, "int8")]) is None
    assert quant.cat([quant.quantize(torch.randn(20, 64), "int4"), qb]) is None  # padding rows inside


def test_a_failing_build_falls_back_with_a_warning(monkeypatch, caplog):
    """No compiler, an exception with an empty message: the next variant down is used, then plain torch, and
    the model still computes (issue: an IndexError on an empty message used to stop the engine)."""
    def broken(variant):
        raise RuntimeError("")

    monkeypatch.setattr(kernels, "_build", broken)
    kernels.load_variant.cache_clear()
    kernels.isa.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lamina.kernels"):
            assert kernels.isa() == "torch"
        assert any("unavailable" in r.message for r in caplog.records) == bool(RUNNABLE)
        q = quant.quantize(torch.randn(16, 64), "int8")
        x = torch.randn(1, 64)
        torch.testing.assert_close(q.matmul(x), q.matmul(x, variant="torch"))
    finally:
        kernels.load_variant.cache_clear()
        kernels.isa.cache_clear()


def test_forcing_a_variant(monkeypatch):
    monkeypatch.setenv("LAMINA_KERNELS", "torch")
    kernels.isa.cache_clear()
    try:
        assert kernels.isa() == "torch"
        if "avx2" in RUNNABLE and shutil.which("c++"):
            monkeypatch.setenv("LAMINA_KERNELS", "avx2")
            kernels.isa.cache_clear()
            assert kernels.isa() == "avx2"
    finally:
        kernels.isa.cache_clear()


def test_build_cache_is_keyed_by_cpu_flags(monkeypatch, tmp_path):
    """Code built for one CPU's flags is never loaded on another: the key covers them (and torch, the source)."""
    seen = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, **kw):
        seen.append(build_directory)
        raise RuntimeError("stop here")

    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setenv("LAMINA_KERNEL_DIR", str(tmp_path))
    for flags in (frozenset({"avx2", "fma", "f16c"}), frozenset({"avx2", "fma", "f16c", "avx512f"})):
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: flags)
        with pytest.raises(RuntimeError):
            kernels._build("avx2")
    assert len(set(seen)) == 2


def test_a_first_start_says_it_compiles_only_when_the_build_is_not_cached(monkeypatch, tmp_path):
    """`lamina serve` reports the ~2-minute kernel build before it starts it (server.app.load_model): the variant
    to compile when its build is not in the cache, nothing once it is, or with the kernels turned off."""
    monkeypatch.setenv("LAMINA_KERNEL_DIR", str(tmp_path))
    kernels.isa.cache_clear()
    try:
        first = next((v for v in kernels.ORDER if kernels.supported(v)), None)
        assert kernels.to_compile() == first  # an empty cache
        if first is not None:
            kernels.build_dir(first).mkdir(parents=True)
            kernels.built_library(first).touch()
            assert kernels.to_compile() is None
            monkeypatch.setenv("LAMINA_KERNEL_DIR", str(tmp_path / "other"))
            assert kernels.to_compile() == first
        monkeypatch.setenv("LAMINA_KERNELS", "torch")
        assert kernels.to_compile() is None
    finally:
        kernels.isa.cache_clear()
