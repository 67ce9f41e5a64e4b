"""The engine's step on the fused CPU forward: the runner calls `Transformer.forward_fused` with plain lists,
greedy rows take `argmax_rows`. Both must give what the tensor paths give, and bad indices must be refused
before the kernel writes anything."""

import pytest
import torch

from models.llama import KVCache
from models.loading import load_gguf
from server.engine.sampling import argmax_rows

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def smol():
    loaded = load_gguf(dtype="fp32")
    assert loaded.model.llama.fused is not None  # this CPU has a kernel variant (avx2 at least)
    return loaded


def test_argmax_rows_is_torchs_first_maximum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=g)
    logits[3, 10] = logits[3, 700] = 50.0  # a tie: the first one
    logits[5, 42] = float("nan")  # a NaN counts as the maximum, as in torch
    logits[7] = float("-inf")
    want = logits.argmax(-1).tolist()
    assert argmax_rows(logits) == want and want[3] == 10 and want[5] == 42 and want[7] == 0
    view = logits[::2, 1:999]  # not contiguous
    assert argmax_rows(view) == view.argmax(-1).tolist()
    half = logits.half()  # other dtypes go through torch
    assert argmax_rows(half) == half.argmax(-1).tolist()


@pytest.mark.parametrize("V", [1, 7, 16, 17, 1000, 49152])
def test_the_kernels_argmax_is_torchs_first_maximum(V):
    """The kernels' own argmax (AVX-512 variants; what argmax_rows uses there): per-lane maxima merged to the
    first index, ties across lanes and within one, NaNs anywhere (the first wins), all -inf, a tail past the
    last 16; one row and sixteen."""
    from models import kernels

    module = kernels.classes()
    if not hasattr(module, "argmax_rows"):
        pytest.skip(f"the {kernels.isa()} kernels have no argmax (AVX-512 only): argmax_rows uses numpy's")
    g = torch.Generator().manual_seed(V)
    rows = torch.randn(16, V, generator=g)
    rows[1] = 3.0  # every value tied: the first
    rows[2, V // 2] = rows[2, V - 1] = 99.0  # a tie in other lanes (or the tail)
    rows[3, -1] = 99.0  # the maximum in the tail
    rows[4] = float("-inf")
    rows[5, V - 1] = float("nan")
    rows[6, V // 3] = rows[6, V - 1] = float("nan")
    rows[7, 0] = float("nan")
    rows[8, V // 2] = float("inf")
    want = rows.argmax(-1).tolist()
    assert module.argmax_rows(rows) == want
    assert [module.argmax_rows(r[None])[0] for r in rows] == want
    assert argmax_rows(rows) == want


def test_forward_fused_from_lists_is_forward_from_tensors(smol):
    """Two rows (cache rows 1 and 0) of three tokens each, all logits: the list entry and `forward` agree
    bit for bit, and so do their cache writes."""
    llama = smol.model.llama
    tokens, positions, rows = [[5, 17, 300], [9, 1000, 42]], [[0, 1, 2], [0, 1, 2]], [1, 0]
    a = KVCache.allocate(llama.args, 2, 16, torch.bfloat16)
    b = KVCache.allocate(llama.args, 2, 16, torch.bfloat16)
    want = llama(torch.tensor(tokens), torch.tensor(positions), cache=a, rows=torch.tensor(rows), last_only=False)
    got = llama.forward_fused(b, sum(tokens, []), rows, sum(positions, []), list(range(6)))
    assert torch.equal(got.view(2, 3, -1), want)
    assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v, strict=True))


@pytest.mark.parametrize("bad", ["position", "row", "logit_index", "token", "mismatch"])
def test_forward_fused_refuses_bad_indices_before_writing(smol, bad):
    llama = smol.model.llama
    cache = KVCache.allocate(llama.args, 2, 8, torch.bfloat16)
    args = {"tokens": [5, 6], "rows": [0, 1], "positions": [0, 3], "logit_index": [0, 1]}
    args.update({"position": {"positions": [0, 8]}, "row": {"rows": [0, 2]}, "logit_index": {"logit_index": [2]},
                 "token": {"tokens": [5, llama.args.vocab_size]}, "mismatch": {"positions": [0]}}[bad])
    with pytest.raises(RuntimeError, match="forward_plain"):
        llama.forward_fused(cache, args["tokens"], args["rows"], args["positions"], args["logit_index"])
    assert all(not t.any() for t in cache.k + cache.v)  # nothing was written
