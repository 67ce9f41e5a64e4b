"""Packed weights: the one copy of a linear weight that inference keeps, in the layout its kernel reads.

- `QuantWeight`: integer codes in groups of G along k with a scale (and a min) per group and row — GGUF's
  Q8_0, Q4_0, Q4_1, Q4_K and Q6_K repacked losslessly (`from_gguf`), or a 16/32-bit weight quantized at load
  (`quantize`: int8 symmetric per 32, like Q8_0; int4 with scale and offset per 32, like Q4_1).
- `Bf16Weight`: bf16 in the bf16 kernel's layout.
Both multiply activations (`matmul`), hand out dequantized rows (`rows`, for tied embeddings) and report
their bytes. The layouts are described in qmatmul.cpp. `torch_qmm` is the same arithmetic in plain torch
(activations quantized to int8 per 16 values, exact integer dot products, fp32 scaling): the path for CPUs
without a compiled variant, and the reference the tests hold the kernels to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models import kernels

GGUF_KEPT = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")  # GGUF types kept in their own precision


def _pad_rows(t: Tensor, multiple: int = 16) -> Tensor:
    extra = -t.shape[0] % multiple
    return t if not extra else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])


def _interleave(per_row: Tensor) -> Tensor:
    """(Np, ng) per-row group values → (Np/16, ng, 16): the 16 rows of a block side by side."""
    Np, ng = per_row.shape
    return per_row.view(Np // 16, 16, ng).permute(0, 2, 1).contiguous()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(Np, K) uint8 codes (Np a multiple of 16) → the kernel layout (Np/16, K·bits/32, 64)."""
    Np, K = codes.shape
    if bits == 8:
        return codes.view(Np // 16, 16, K // 4, 4).permute(0, 2, 1, 3).reshape(Np // 16, K // 4, 64).contiguous()
    halves = codes.view(Np // 16, 16, K // 8, 2, 4)
    packed = halves[..., 0, :] | (halves[..., 1, :] << 4)  # (nb, 16, K/8, 4)
    return packed.permute(0, 2, 1, 3).reshape(Np // 16, K // 8, 64).contiguous()


def unpack_codes(qs: Tensor, bits: int, blocks: Tensor | slice = slice(None), lanes: Tensor | None = None) -> Tensor:
    """The inverse of `pack_codes`: codes (rows, K) of all rows, or of rows blocks*16 + lanes."""
    nb, lines, _ = qs.shape
    q = qs.view(nb, lines, 16, 4)
    if lanes is None:
        q = q[blocks].permute(0, 2, 1, 3)  # (nb, 16, lines, 4)
        q = q.reshape(-1, lines, 4)
    else:
        q = q[blocks, :, lanes]  # (rows, lines, 4)
    if bits == 8:
        return q.reshape(q.shape[0], -1)
    return torch.stack([q & 15, q >> 4], dim=2).reshape(q.shape[0], -1)  # (rows, lines, 2, 4) → (rows, K)


ACT_GROUP = 16  # activations: one int8 scale per 16 values (see qmatmul.cpp)


def quantize_activations(x: Tensor, group: int = ACT_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) → int8 codes as float (M, K/g, g), scales (M, K/g), code sums (M, K/g): as the kernels do."""
    xg = x.float().view(x.shape[0], -1, group)
    d = xg.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xg * inv[..., None])  # round half to even, as nearbyint
    return q, d, q.sum(-1)


@dataclass(frozen=True, eq=False)
class QuantWeight:
    fmt: str  # where it came from: "Q4_1", "Q8_0", "int8", ...
    n: int  # output rows (the codes may carry padding rows up to a multiple of 16)
    k: int
    bits: int  # 8 or 4
    group: int  # G: values per scale
    zero: int  # symmetric formats: the code of 0 (weight = d * (q - zero)); affine: 0
    big: bool  # codes may exceed 127
    qs: Tensor  # uint8 (Np/16, K·bits/32, 64)
    scales: Tensor  # (Np/16, K/G, 16) fp16 or fp32
    mins: Tensor | None  # affine formats (weight = d * q + m): like scales; None for symmetric ones

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins) if t is not None)

    def matmul(self, x: Tensor, variant: str | None = None) -> Tensor:
        """x (..., K) → x @ W.T (..., N) in x's dtype."""
        if (variant or kernels.isa()) == "torch":
            y = torch_qmm(self, x)
        else:
            y = kernels.qmm(x, self.qs, self.scales, self.mins, self.bits, self.group, self.zero, self.big, variant)
        return y if y.shape[-1] == self.n else y[..., : self.n]

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized rows (…, K) float32 for row indices `ids` (any shape): an embedding lookup."""
        flat = ids.reshape(-1)
        codes = unpack_codes(self.qs, self.bits, flat // 16, flat % 16).float()
        G = self.group
        d = self.scales[flat // 16, :, flat % 16].float()  # (rows, K/G)
        w = codes.view(len(flat), -1, G)
        if self.mins is None:
            out = (w - self.zero) * d[..., None]
        else:
            out = w * d[..., None] + self.mins[flat // 16, :, flat % 16].float()[..., None]
        return out.reshape(*ids.shape, self.k)

    def dequantize(self) -> Tensor:
        return self.rows(torch.arange(self.n))


@dataclass(frozen=True, eq=False)
class Bf16Weight:
    fmt = "bf16"
    n: int
    k: int
    packed: Tensor  # bf16 (Np/16, K/2, 16, 2)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def matmul(self, x: Tensor, variant: str | None = None) -> Tensor:
        y = kernels.mm_bf16(x.to(torch.bfloat16), self.packed, variant).to(x.dtype)
        return y if y.shape[-1] == self.n else y[..., : self.n]

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        r = self.packed[flat // 16, :, flat % 16, :]  # (rows, K/2, 2)
        return r.reshape(*ids.shape, self.k).float()

    def dequantize(self) -> Tensor:
        return self.rows(torch.arange(self.n))


Weight = QuantWeight | Bf16Weight


def torch_qmm(w: QuantWeight, x: Tensor, chunk: int = 8) -> Tensor:
    """The kernels' arithmetic in plain torch: int8 activations per 16, exact integer dot products (in
    fp32, exact below 2^24), fp32 scaling and a sum over groups. Slow (unpacks the codes on every call)."""
    K, G, A = w.k, w.group, ACT_GROUP
    xf = x.reshape(-1, K)
    codes = unpack_codes(w.qs, w.bits).float().view(-1, K // A, A)  # (Np, K/16, 16)
    if w.mins is None:
        codes = codes - w.zero  # integers: still exact
    d_w = w.scales.permute(0, 2, 1).reshape(-1, K // G).float()  # (Np, ng)
    m_w = None if w.mins is None else w.mins.permute(0, 2, 1).reshape(-1, K // G).float()
    out = []
    for i in range(0, xf.shape[0], chunk):
        q, d, s = quantize_activations(xf[i : i + chunk], A)
        isum = torch.einsum("mhk,nhk->mnh", q, codes)  # (m, Np, K/16): exact integers
        part = (isum * d[:, None, :]).view(*isum.shape[:2], K // G, G // A).sum(-1)  # (m, Np, ng)
        y = part * d_w
        if m_w is not None:
            y = y + m_w * (d * s).view(-1, K // G, G // A).sum(-1)[:, None, :]
        out.append(y.sum(-1))
    y = torch.cat(out) if out else xf.new_zeros((0, codes.shape[0]), dtype=torch.float32)
    return y.view(*x.shape[:-1], -1).to(x.dtype)


# ---------------------------------------------------------------------------------------------- makers


def _make(fmt, n, k, bits, group, zero, big, codes, scales, mins) -> QuantWeight:
    """codes (n, K) uint8, scales/mins (n, K/G) → a QuantWeight (rows padded to a multiple of 16)."""
    codes, scales = _pad_rows(codes), _pad_rows(scales)
    mins = None if mins is None else _interleave(_pad_rows(mins))
    return QuantWeight(fmt, n, k, bits, group, zero, big, pack_codes(codes, bits), _interleave(scales), mins)


def _block_rows(chunk: int, k: int) -> int:
    """Rows per conversion block of rows of `k` values: about `chunk` values, a whole multiple of 16 rows (the
    kernels' row blocks)."""
    return max(16, chunk // k // 16 * 16)


def _row_blocks(weight: Tensor, dtype: torch.dtype, chunk: int, release: Callable[[Tensor], None] | None):
    """(first row, block in `dtype`) over `weight` in blocks of about `chunk` values (`_block_rows`); each block
    of `weight` goes to `release` once converted (loading drops its file pages there)."""
    N, K = weight.shape
    rows = _block_rows(chunk, K)
    for i in range(0, N, rows):
        src = weight[i : i + rows]
        block = src.detach().to(dtype)
        if release is not None:
            release(src)
        yield i, block


def quantize(weight: Tensor, mode: str, group: int = 32, chunk: int = 1 << 22,
             release: Callable[[Tensor], None] | None = None) -> QuantWeight:
    """A 16/32-bit (N, K) weight → int8 (symmetric, one fp16 scale per 32: Q8_0's scheme) or int4 (a fp16
    scale and offset per 32: Q4_1's scheme). Rounds to nearest with the stored (fp16) scales.

    Works through the rows in blocks of about `chunk` values, each written straight into the packed layout, so
    the working memory is a few fp32 blocks, not copies of the whole weight. `release`, if given, is called
    with each block of `weight` once it has been read: loading drops its file pages there, so a memory-mapped
    weight is never resident whole (for a 7B's embeddings that was 250 MB on top of the result)."""
    N, K = weight.shape
    if K % group:
        raise ValueError(f"cannot quantize a weight with {K} columns in groups of {group}")
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {mode!r} (int8 or int4)")
    bits = 8 if mode == "int8" else 4
    blocks = -(-N // 16)  # rows are padded to a multiple of 16 (codes, scales and mins of 0)
    qs = torch.empty((blocks, K * bits // 32, 64), dtype=torch.uint8)
    scales = torch.empty((blocks, K // group, 16), dtype=torch.float16)
    mins = torch.empty_like(scales) if mode == "int4" else None
    for i, block in _row_blocks(weight, torch.float32, chunk, release):
        at = slice(i // 16, i // 16 - (-block.shape[0] // 16))  # the block's 16-row blocks, its padding included
        w = block.view(-1, K // group, group)
        if mode == "int8":
            d = (w.abs().amax(-1) / 127.0).half().float()
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            q = torch.round(w * inv[..., None]).clamp(-127, 127) + 128
        else:
            lo, hi = w.amin(-1), w.amax(-1)
            d, m = ((hi - lo) / 15.0).half().float(), lo.half().float()
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            q = torch.round((w - m[..., None]) * inv[..., None]).clamp(0, 15)
            mins[at] = _interleave(_pad_rows(m.half()))
        qs[at] = pack_codes(_pad_rows(q.to(torch.uint8).view(-1, K)), bits)
        scales[at] = _interleave(_pad_rows(d.half()))
    return QuantWeight(mode, N, K, bits, group, 128 if mode == "int8" else 0, mode == "int8", qs, scales, mins)


def _f16(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.float16).astype(np.float16)).squeeze(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(…, 16) bytes → (…, 32) codes: low nibbles are elements 0..15, high nibbles 16..31 (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf(data: np.ndarray, qtype: str, n: int, k: int, chunk: int = 1 << 22,
              release: Callable[[np.ndarray], None] | None = None) -> QuantWeight:
    """A GGUF tensor's raw blocks (n rows of bytes) → the same numbers in the kernels' layout, losslessly.
    Converted in blocks of rows (about `chunk` values, whole multiples of 16 rows) written into the one result:
    the conversion's temporaries (codes unpacked to a byte per value, fp32 scales) stay a block's worth, and
    each block of `data` goes to `release` once converted (loading drops its file pages there, as in
    `quantize`)."""
    rows = np.asarray(data, dtype=np.uint8).reshape(n, -1)
    step = _block_rows(chunk, k)
    if n <= step:
        return _from_gguf_rows(rows, qtype, n, k)

    def convert(i: int) -> QuantWeight:
        part = _from_gguf_rows(rows[i : i + step], qtype, min(step, n - i), k)
        if release is not None:
            release(rows[i : i + step])
        return part

    first = convert(0)
    nb = -(-n // 16)

    def room(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.new_empty((nb, *t.shape[1:]))

    qs, scales, mins = room(first.qs), room(first.scales), room(first.mins)
    for i in range(0, n, step):
        part = first if i == 0 else convert(i)
        at = slice(i // 16, i // 16 + part.qs.shape[0])
        qs[at], scales[at] = part.qs, part.scales
        if mins is not None:
            mins[at] = part.mins
    return QuantWeight(first.fmt, n, k, first.bits, first.group, first.zero, first.big, qs, scales, mins)


def _from_gguf_rows(rows: np.ndarray, qtype: str, n: int, k: int) -> QuantWeight:
    if qtype == "Q8_0":
        b = rows.reshape(n, k // 32, 34)
        codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return _make("Q8_0", n, k, 8, 32, 128, True, torch.from_numpy(codes.reshape(n, k)), _f16(b[..., :2]), None)
    if qtype == "Q4_0":
        b = rows.reshape(n, k // 32, 18)
        codes = _nibbles(b[..., 2:])
        return _make("Q4_0", n, k, 4, 32, 8, False, torch.from_numpy(codes.reshape(n, k)), _f16(b[..., :2]), None)
    if qtype == "Q4_1":
        b = rows.reshape(n, k // 32, 20)
        codes = _nibbles(b[..., 4:])
        return _make("Q4_1", n, k, 4, 32, 0, False, torch.from_numpy(codes.reshape(n, k)), _f16(b[..., :2]),
                     _f16(b[..., 2:4]))
    if qtype == "Q4_K":
        from gguf.quants import Q4_K

        b = rows.reshape(-1, 144)  # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 32)  # chunk c: low nibbles → sub-block 2c, high → 2c + 1
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)
        scale = (d * sc.astype(np.float32)).reshape(n, k // 32)
        m = -(dmin * mn.astype(np.float32)).reshape(n, k // 32)
        return _make("Q4_K", n, k, 4, 32, 0, False, torch.from_numpy(codes), torch.from_numpy(scale),
                     torch.from_numpy(m))
    if qtype == "Q6_K":
        b = rows.reshape(-1, 210)  # super-blocks of 256: ql 128, qh 64, 16 int8 scales, d
        ql, qh = b[:, :128], b[:, 128:192]
        sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        codes = (lo.reshape(-1, 8, 32) | (hi.reshape(-1, 8, 32) << 4)).reshape(n, k)  # 0..63; weight d·sc·(q − 32)
        scale = (d * sc).reshape(n, k // 16)
        return _make("Q6_K", n, k, 8, 16, 32, False, torch.from_numpy(codes), torch.from_numpy(scale), None)
    raise ValueError(f"GGUF type {qtype} is not kept quantized (kept: {', '.join(GGUF_KEPT)})")


def pack_bf16(weight: Tensor, chunk: int = 1 << 22, release: Callable[[Tensor], None] | None = None) -> Bf16Weight:
    """A (N, K) weight in the bf16 kernel's layout, written block by block (about `chunk` values) into the one
    result; `release` gets each block of `weight` once read, as in `quantize`."""
    N, K = weight.shape
    if K % 2:
        raise ValueError("the bf16 layout needs an even number of columns")
    packed = torch.empty((-(-N // 16), K // 2, 16, 2), dtype=torch.bfloat16)
    for i, block in _row_blocks(weight, torch.bfloat16, chunk, release):
        w = _pad_rows(block)
        packed[i // 16 : i // 16 + w.shape[0] // 16] = w.reshape(-1, 16, K // 2, 2).permute(0, 2, 1, 3)
    return Bf16Weight(N, K, packed)


def cat(weights: list[Weight]) -> Weight | None:
    """Weights stacked along N in one packed weight (one product instead of several), or None where their
    formats differ or a part has padding rows."""
    first = weights[0]
    if any(type(w) is not type(first) or w.n % 16 or w.k != first.k for w in weights):
        return None
    if isinstance(first, Bf16Weight):
        return Bf16Weight(sum(w.n for w in weights), first.k, torch.cat([w.packed for w in weights]))
    same = ("bits", "group", "zero", "big")
    if any(getattr(w, a) != getattr(first, a) for w in weights for a in same) or any(
        w.scales.dtype != first.scales.dtype or (w.mins is None) != (first.mins is None) for w in weights
    ):
        return None
    fmt = first.fmt if all(w.fmt == first.fmt for w in weights) else "+".join(w.fmt for w in weights)
    return QuantWeight(fmt, sum(w.n for w in weights), first.k, first.bits, first.group, first.zero, first.big,
                       torch.cat([w.qs for w in weights]), torch.cat([w.scales for w in weights]),
                       None if first.mins is None else torch.cat([w.mins for w in weights]))
