"""What `--deterministic` costs, in the engine (no HTTP), on the default SmolLM2-135M-Instruct weights.

Two forward paths, each with the flag off and on, one after the other in this process:
- fused: the default (the GGUF's Q4_1/Q8_0 weights kept, the fused CPU kernel). Batch-invariant by
  construction, so the flag changes nothing; measured to show it.
- eager: the same file dequantized to fp32 (`--quantization none`), the eager torch layers. With the flag
  every token runs as its own forward.
Per configuration: time to first token of one 256-token prompt, batch-1 decode tok/s, and the aggregate
tok/s of 8 requests admitted together (64 tokens each, greedy). Medians of --rounds.

Usage: python benchmarks/deterministic_bench.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.loading import load_gguf
from server.engine.core import EngineConfig, EngineCore
from server.engine.types import GenerateRequest, SamplingParams


def measure(loaded, deterministic: bool) -> dict:
    core = EngineCore.from_config(loaded, EngineConfig(max_context=512, max_batch=8, prefill_chunk=256,
                                                       dtype="bf16", prefix_caching=False,
                                                       deterministic=deterministic))
    tok = loaded.tokenizer
    words = ("the quick brown fox jumps over the lazy dog while a lighthouse keeper watches the storm " * 40).split()
    prompt = tuple(tok.encode(" ".join(words))[:256])
    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    core.generate_all([(GenerateRequest("ttft", prompt, greedy), 0)])
    ttft = time.perf_counter() - t0
    short = tuple(tok.encode("Write a line about the sea."))
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    core.generate_all([(GenerateRequest("one", short, params), 0)])
    single = 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    core.generate_all([(GenerateRequest(f"b{i}", short + (i,), params), 0) for i in range(8)])
    batch = 8 * 64 / (time.perf_counter() - t0)
    return {"ttft": ttft, "single": single, "batch8": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"fused": load_gguf(dtype="fp32"), "eager": load_gguf(dtype="fp32", quantization="none")}
    assert models["fused"].model.llama.fused is not None and models["eager"].model.llama.fused is None
    print(f"{'path':6} {'--deterministic':>15} {'TTFT 256 tok':>13} {'batch-1 tok/s':>14} {'8 streams tok/s':>16}")
    for name, loaded in models.items():
        measure(loaded, False)  # warm-up
        rows = {}
        for flag in (False, True):
            runs = [measure(loaded, flag) for _ in range(args.rounds)]
            rows[flag] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            r = rows[flag]
            print(f"{name:6} {'on' if flag else 'off':>15} {r['ttft'] * 1e3:11.0f}ms {r['single']:14.1f} "
                  f"{r['batch8']:16.1f}")
        off, on = rows[False], rows[True]
        print(f"{name:6} {'on / off':>15} {on['ttft'] / off['ttft']:12.2f}x {on['single'] / off['single']:13.2f}x "
              f"{on['batch8'] / off['batch8']:15.2f}x")


if __name__ == "__main__":
    main()
