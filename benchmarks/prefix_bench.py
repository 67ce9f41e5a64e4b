"""Benchmark: a chat's follow-up turn with and without prefix caching (SmolLM2-135M, our engine alone).

    python benchmarks/prefix_bench.py [--dtype bf16] [--paragraphs 40]

Turn 1 is a long user message; turn 2 resends the conversation (turn 1, its answer, a short question), as
OpenAI-style clients do. Prints the follow-up's prompt length, the tokens reused from turn 1's retained K/V and
its time to first token, with prefix caching off and on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--paragraphs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from models.loading import load_gguf
    from server.engine.core import EngineConfig, EngineCore
    from server.engine.types import GenerateRequest, SamplingParams

    torch.set_num_threads(args.threads)
    loaded = load_gguf(dtype=args.dtype)
    tok = loaded.tokenizer
    text = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog near the river bank."
                    for i in range(args.paragraphs))
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ttfts = {}
    for caching in (False, True):
        core = EngineCore.from_config(loaded, EngineConfig(max_context=4096, max_batch=4, prefill_chunk=512,
                                                           prefix_caching=caching))
        core.runner.warmup()
        turn1 = tok.encode(f"User: {text}\nAssistant:", False)
        answer = [t for o in core.generate_all([(GenerateRequest("t1", tuple(turn1), greedy), 0)])["t1"]
                  for t in o.token_ids]
        turn2 = turn1 + answer + tok.encode("\nUser: and what about the dog?\nAssistant:", False)
        core.add_request(GenerateRequest("t2", tuple(turn2), greedy), 0)
        t = time.perf_counter()
        while not any(o.token_ids for o in core.step()):
            pass
        ttfts[caching] = time.perf_counter() - t
        while core.has_work():
            core.step()
        print(f"prefix caching {'on ' if caching else 'off'}: follow-up prompt {len(turn2)} tokens, "
              f"{core.prompt_tokens_cached_total} reused, time to first token {ttfts[caching] * 1e3:.0f} ms")
    print(f"follow-up TTFT {ttfts[False] / ttfts[True]:.1f}x lower with prefix caching")


if __name__ == "__main__":
    main()
