"""Structured outputs: what a token mask costs per decode step at batch 16, on SmolLM2's 49,152-token
vocabulary, for the grammar engines that were candidates (llguidance, which Lamina uses, and xgrammar when it is
importable), against a decode step of the engine at batch 16.

The model first writes a JSON object under a schema (greedy, constrained); that token sequence is then replayed
through 16 matchers at once per engine: per step, the masks of all 16 rows, applied to (16, vocab) logits,
and each row's token accepted.
Medians over the sequence's steps.

Usage: python benchmarks/grammar_bench.py
(xgrammar is not a dependency: `pip install xgrammar` into the environment to measure it too.)
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from models.loading import load_gguf
from server.engine.core import EngineConfig, EngineCore
from server.engine.types import GenerateRequest, GrammarSpec, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "colour", "tags", "address"],
    "additionalProperties": False,
}
B = 16


def replay_llguidance(core: EngineCore, ids: list[int]) -> float:
    g = core.grammars
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    matchers = [g.matcher(spec) for _ in range(B)]
    logits = torch.randn(B, g.vocab_size)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        logits.masked_fill(~g.allowed(matchers), float("-inf"))  # as the sampler applies them
        for m in matchers:
            m.consume_token(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def replay_xgrammar(lm, ids: list[int]) -> float | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    tok, vocab = lm.tokenizer, lm.model.llama.args.vocab_size
    info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(vocab)], xgr.VocabType.RAW, vocab_size=vocab,
                             stop_token_ids=sorted(lm.stop_ids))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(B)]
    bitmask = xgr.allocate_token_bitmask(B, vocab)
    logits = torch.randn(B, vocab)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        for m in matchers:
            m.accept_token(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_step(lm) -> float:
    core = EngineCore.from_config(lm, EngineConfig(max_context=512, max_batch=B, dtype="bf16", prefix_caching=False))
    p = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    for i in range(B):
        core.add_request(GenerateRequest(f"r{i}", tuple(lm.tokenizer.encode(f"Tell me about number {i}.")), p), 0)
    times = []
    while core.has_work():
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    torch.set_num_threads(2)
    lm = load_gguf(dtype="fp32")
    core = EngineCore.from_config(lm, EngineConfig(max_context=512, max_batch=4, dtype="bf16"))
    prompt = lm.tokenizer.encode("<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n")
    t0 = time.perf_counter()
    core.grammars.validate(GrammarSpec("json_object"))  # builds the vocabulary once
    print(f"llguidance vocabulary built in {time.perf_counter() - t0:.2f} s")
    p = SamplingParams(max_tokens=300, temperature=0, grammar=GrammarSpec("json_schema", json.dumps(SCHEMA)))
    outs = core.generate_all([(GenerateRequest("a", tuple(prompt), p), 0)])["a"]
    ids = [t for o in outs for t in o.token_ids]
    print(f"the sequence: {len(ids)} tokens, {''.join(o.text for o in outs)!r}")
    step = decode_step(lm)
    print(f"\ndecode step at batch {B} (engine, greedy, no grammar): {step * 1e3:.1f} ms median")
    for name, t in (("llguidance", replay_llguidance(core, ids)), ("xgrammar", replay_xgrammar(lm, ids))):
        if t is None:
            print(f"{name}: not installed")
        else:
            print(f"{name}: masks + accepts for {B} rows {t * 1e3:.2f} ms per step median = {t / step:.1%} of a step")


if __name__ == "__main__":
    main()
