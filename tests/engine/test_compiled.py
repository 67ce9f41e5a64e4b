"""Compiled batch-1 decode (`compile_decode`): the same logits and tokens as eager, one graph for every length."""

import pytest
import torch
from torch._dynamo.utils import counters

from server.engine.runner import ModelRunner
from tests.engine.conftest import request, run, token_ids

pytestmark = pytest.mark.timeout(900)


def _runners(loaded):
    kw = {"n_slots": 4, "max_context": 96, "kv_dtype": torch.float32}
    return ModelRunner(loaded, **kw), ModelRunner(loaded, compile_decode=True, **kw)


def _decode_both(eager, compiled, slot, prompt, steps, admit=None):
    for runner in (eager, compiled):
        if admit:
            admit(runner)
        runner.prefill(slot, prompt, 0)
    token, diffs = prompt[-1], []
    for i in range(steps):
        pos = len(prompt) + i
        a, b = eager.decode([slot], [token], [pos]), compiled.decode([slot], [token], [pos])
        diffs.append((a - b).abs().max().item())
        token = int(a.argmax())
        assert token == int(b.argmax())
    return max(diffs)


def test_compiled_decode_equals_eager_across_lengths_and_slots(plain):
    torch._dynamo.reset()
    eager, compiled = _runners(plain)
    assert _decode_both(eager, compiled, 2, [1, 5, 9, 13, 17], 20) < 1e-4  # slot 2: moved to cache row 0
    assert _decode_both(eager, compiled, 0, list(range(3, 40)), 30) < 1e-4  # other lengths, other slot
    assert counters["stats"]["unique_graphs"] == 1  # every key length through one dynamic graph


def test_adapter_models_decode_eagerly_with_a_warning(reference, caplog):
    """Inductor's prepack pass fails on the adapter graph: the setting is refused loudly, not half-applied."""
    runner = ModelRunner(reference, n_slots=2, max_context=64, kv_dtype=torch.float32, compile_decode=True)
    assert runner.compiled is None
    assert "not available for adapter models" in caplog.text


def test_engine_with_compiled_decode_matches_eager(plain):
    """Through the engine: rows join and leave, so steps switch between batch 1 (compiled) and batch > 1."""
    reqs = [request(f"r{i}", [1 + i, 7, 9, 11][: 2 + i]) for i in range(3)]
    eager = run(plain, reqs, max_batch=2)
    compiled = run(plain, reqs, max_batch=2, compile_decode=True)
    for r in reqs:
        assert token_ids(compiled[r.request_id]) == token_ids(eager[r.request_id])


def test_a_failed_compile_falls_back_to_eager_loudly(plain, monkeypatch, caplog):
    import server.engine.runner as runner_module

    def no_compiler(fn):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(runner_module, "_compile", no_compiler)
    runner = ModelRunner(plain, n_slots=2, max_context=64, kv_dtype=torch.float32, compile_decode=True)
    runner.warmup()
    assert runner.compiled is None
    assert "compiling failed, decoding eagerly" in caplog.text and "No working C++ compiler" in caplog.text
    runner.prefill(1, [3, 4, 5], 0)
    assert runner.decode([1], [5], [3]).shape == (1, plain.tokenizer.vocab_size)
