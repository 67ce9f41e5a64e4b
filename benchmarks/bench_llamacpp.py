"""llama.cpp peer for engine_bench.py, run by the llama-cpp-python venv's interpreter (stdlib + llama_cpp only).

Usage: python bench_llamacpp.py WORKLOAD.json OUT.json. llama-cpp-python's Python API serves one sequence at
a time, so the staggered load is served first come, first served (like a one-slot llama-server).
"""

import json
import resource
import sys
import time

from llama_cpp import Llama


def stream(llm, prompt, max_tokens, bias, on_token):
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True, logit_bias=bias):
        on_token(time.perf_counter())


def main(workload_path, out_path):
    w = json.load(open(workload_path))
    llm = Llama(model_path=w["gguf"], n_ctx=2048, n_threads=w["threads"], n_batch=512, verbose=False)
    bias = {int(t): -100.0 for t in w["stop_ids"]}  # generate exactly max_tokens, like the other peers
    stream(llm, "warm up", 4, bias, lambda t: None)

    times = []
    stream(llm, w["single_prompt"], w["single_tokens"], bias, times.append)
    single = (len(times) - 1) / (times[-1] - times[0])

    t0 = time.perf_counter()
    ttft, done, n_tokens = [], [], 0
    for prompt, arrival in zip(w["prompts"], w["arrivals"], strict=True):
        wait = t0 + arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        stamps = []
        stream(llm, prompt, w["max_tokens"], bias, stamps.append)
        ttft.append(stamps[0] - (t0 + arrival))
        done.append(stamps[-1])
        n_tokens += len(stamps)
    aggregate = n_tokens / (max(done) - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump({"single": single, "aggregate": aggregate, "ttft": ttft, "tokens": n_tokens, "rss": rss},
              open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
