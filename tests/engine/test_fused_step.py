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
