"""Benchmark: our engine against HF transformers generate() and llama.cpp on the same SmolLM2-135M weights.

    python benchmarks/engine_bench.py [--dtype bf16] [--requests 16] [--max-tokens 64] [--skip-llamacpp]
    python benchmarks/engine_bench.py --direct   # just our runner's decode loop, B=1 and B=16 (~30 s)
    python benchmarks/engine_bench.py --direct --profile  # and where each step's time goes
    python benchmarks/engine_bench.py --compile  # our engine with compiled batch-1 decode (+~1.5 min warmup)

Prints, per peer: decode tokens/s at batch 1; aggregate tokens/s with N requests arriving at staggered
(Poisson) times; TTFT p50/p99 under that load; peak RSS; and every figure as a ratio to the peers. Also the
machine's memory bandwidth (a large torch copy, right before and after our run: it drifts on this shared
machine) and the batch-1 roofline it implies (weight bytes per token / bandwidth), with the read-only streaming
rate beside it. Each peer runs in its own subprocess (clean peak RSS, no shared threads).

llama.cpp runs through llama-cpp-python from a separate venv (not a project dependency); build it once:
    python -m venv ~/.cache/lamina-bench/venv-llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" ~/.cache/lamina-bench/venv-llamacpp/bin/pip install llama-cpp-python
(~7 minutes on 2 cores; pip caches the wheel). HF static batching: whatever has arrived when the model is
idle runs as one left-padded batch to completion; TTFT is when that batch samples its first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LLAMACPP_PY = Path.home() / ".cache" / "lamina-bench" / "venv-llamacpp" / "bin" / "python"

TOPICS = ["the ocean", "a small robot", "volcanoes", "the history of tea", "a city at night", "bees",
          "chess openings", "the moon landing", "rain forests", "bread baking", "glaciers", "jazz",
          "old lighthouses", "desert foxes", "paper airplanes", "northern lights"]


def workload(n: int, max_tokens: int, rate: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    prompts, arrivals, t = [], [], 0.0
    for i in range(n):
        body = " ".join(["Write a few sentences about", TOPICS[i % len(TOPICS)] + "."] * rng.randint(1, 12))
        prompts.append(body)
        arrivals.append(t)
        t += rng.expovariate(rate)
    return {"prompts": prompts, "arrivals": arrivals, "max_tokens": max_tokens,
            "single_prompt": "Tell me a long story about a brave little cat who sails across the sea.",
            "single_tokens": 128}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------------------------------------- peers


def server_kv_dtype(dtype: str) -> str:
    """The KV-cache dtype `lamina serve` picks by default for `dtype` activations on this CPU (bf16 where the
    CPU has native bf16): the benchmark measures the default step."""
    from server.app import kv_dtype
    from server.settings import Settings

    return kv_dtype(Settings(), "cpu", dtype)


def peer_ours(w: dict, dtype: str, compile_decode: bool = False) -> dict:
    import torch

    from models.loading import load_gguf
    from server.engine.engine import AsyncEngine, EngineConfig
    from server.engine.types import GenerateRequest, SamplingParams

    torch.set_num_threads(w["threads"])
    # the engine thread loads the model and is the only thread running torch (as in the server): torch on a
    # second thread that also ran OpenMP work made decode ~1.4x slower here
    tok = None
    config = EngineConfig(max_context=1024, max_batch=16, prefill_chunk=256, max_waiting=64,
                          compile_decode=compile_decode, dtype=server_kv_dtype(dtype))

    async def one(engine, rid, prompt, max_tokens, arrival_t, ttft, stamps):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        req = GenerateRequest(rid, tuple(tok.encode(prompt, False)), params)
        async for out in engine.generate(req):
            now = time.perf_counter()
            for _ in out.token_ids:
                stamps.append(now)
            if ttft is not None and len(ttft) == 0 and out.token_ids:
                ttft.append(now - arrival_t)

    async def main():
        nonlocal tok
        engine = AsyncEngine(lambda: load_gguf(dtype=dtype), config)  # loaded on the engine thread, as served
        await engine.start()
        tok = engine.tokenizer
        await one(engine, "warm", "warm up", 8, time.perf_counter(), None, [])
        stamps = []
        await one(engine, "single", w["single_prompt"], w["single_tokens"], time.perf_counter(), None, stamps)
        single = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        t0 = time.perf_counter()
        ttfts, all_stamps = [[] for _ in w["prompts"]], [[] for _ in w["prompts"]]

        async def arrive(i):
            await asyncio.sleep(max(0.0, t0 + w["arrivals"][i] - time.perf_counter()))
            await one(engine, f"r{i}", w["prompts"][i], w["max_tokens"], t0 + w["arrivals"][i], ttfts[i],
                      all_stamps[i])

        await asyncio.gather(*(arrive(i) for i in range(len(w["prompts"]))))
        end = max(s[-1] for s in all_stamps)
        await engine.shutdown(1.0)
        return {"single": single, "aggregate": sum(map(len, all_stamps)) / (end - t0),
                "ttft": [t[0] for t in ttfts], "tokens": sum(map(len, all_stamps))}

    result = asyncio.run(main())
    result["rss"] = peak_rss()
    return result


def direct_decode(dtype: str, threads: int, compile_decode: bool, steps: int = 60, profile: bool = False,
                  quantization: str = "auto", eager: bool = False) -> None:
    """Model-runner decode loop without the engine (no scheduler, sampling, detokenizer): ms/step at B=1, 16.
    `quantization` none: the GGUF dequantized to `dtype` (bf16: the bf16 kernel's weights); `eager`: the eager
    layers even where the fused forward could run (what it is measured against)."""
    import statistics

    import torch

    from models.loading import DTYPES, load_gguf
    from server.engine.runner import ModelRunner
    from server.engine.sampling import argmax_rows

    torch.set_num_threads(threads)
    kv = server_kv_dtype(dtype)
    print(f"activations {dtype}, KV cache {kv} (the server's defaults)")
    loaded = load_gguf(dtype=dtype, quantization=quantization)
    if eager:
        loaded.model.llama.fused = None
    runner = ModelRunner(loaded, n_slots=16, max_context=1024, kv_dtype=DTYPES[kv], compile_decode=compile_decode)
    print(f"weights {quantization}: {'fused CPU forward' if runner.llama.fused is not None else 'eager layers'}")
    t = time.perf_counter()
    runner.warmup()
    print(f"warmup {time.perf_counter() - t:.1f} s")
    for B in (1, 16):
        slots = list(range(B))
        for s in slots:
            runner.prefill(s, list(range(100, 140 + 3 * s)), 0)
        positions, tokens, times = [40 + 3 * s for s in slots], [5] * B, []
        for _ in range(steps):
            t = time.perf_counter()
            tokens = argmax_rows(runner.decode(slots, tokens, positions))
            times.append(time.perf_counter() - t)
            positions = [p + 1 for p in positions]
        med = statistics.median(times[5:])
        print(f"direct decode B={B}: median {med * 1e3:.1f} ms/step = {B / med:.1f} tok/s "
              f"(best {min(times[5:]) * 1e3:.1f} ms)")
        if profile:
            profile_step(runner, slots, tokens, positions, steps)


PHASES = ("norm", "qkv", "rope", "attend", "wo", "w13", "silu", "w2", "residual", "setup", "output head")
GEMMS = ("qkv", "wo", "w13", "w2", "output head")


def profile_step(runner, slots: list[int], tokens: list[int], positions: list[int], steps: int) -> None:
    """Where a decode step's time goes: the fused kernel's phase timers (models/kernels profile_plain; the
    output head is the final norm + the vocabulary projection) and the rest of `runner.decode` (Python, the
    argmax here). Means over `steps` steps, so noise spikes count."""
    from models import kernels
    from server.engine.sampling import argmax_rows

    if runner.llama.fused is None:
        print("profile: the model does not run the fused CPU forward; nothing to break down")
        return
    op = kernels.ops()
    op.profile_plain(True)
    t = time.perf_counter()
    for _ in range(steps):
        tokens = argmax_rows(runner.decode(slots, tokens, positions))
        positions = [p + 1 for p in positions]
    step = (time.perf_counter() - t) / steps
    phases = dict(zip(PHASES, (v / steps for v in op.profile_plain(False)), strict=True))
    rows = [*phases.items(), ("rest (Python, the engine's argmax)", step - sum(phases.values()))]
    print(f"profile B={len(slots)}: {step * 1e3:.2f} ms/step (mean of {steps})")
    for name, v in rows:
        print(f"  {name:30s} {v * 1e3:6.2f} ms  {v / step:6.1%}")
    weights = sum(phases[g] for g in GEMMS)
    print(f"  weight products (incl. head)   {weights * 1e3:6.2f} ms  {weights / step:6.1%}; outside them "
          f"{(step - weights) / step:.1%}")


def hf_model(dtype: str):
    """LlamaForCausalLM from our dequantised GGUF weights (q/k rows from Meta's interleaved RoPE layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.loading import load_gguf

    loaded = load_gguf(dtype="fp32")
    a, sd = loaded.model.llama.args, loaded.model.llama.state_dict()
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                      rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=2048,
                      tie_word_embeddings=True, attn_implementation="sdpa", torch_dtype=torch.float32)

    def unpermute(w, heads):
        return w.view(heads, a.head_dim // 2, 2, a.dim).transpose(1, 2).reshape(-1, a.dim)

    names = {"attention.wo": "self_attn.o_proj", "attention.wv": "self_attn.v_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"][0]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = unpermute(sd[p + "attention.wq.weight"], a.n_heads)
        hf[q + "self_attn.k_proj.weight"] = unpermute(sd[p + "attention.wk.weight"], a.kv_heads)
        for ours, theirs in names.items():
            hf[q + theirs + ".weight"] = sd[p + ours + ".weight"]
        hf[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"][0]
        hf[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"][0]
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    ids = loaded.tokenizer.encode("The capital of France is", False)
    with torch.inference_mode():
        ours = loaded.model.llama(torch.tensor([ids]), torch.arange(len(ids))[None])
        theirs = model(torch.tensor([ids])).logits[0, -1].float()
    return model, loaded, float((ours[0] - theirs).abs().max())


def peer_hf(w: dict, dtype: str) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(w["threads"])
    model, loaded, diff = hf_model(dtype)
    tok = loaded.tokenizer
    eos = loaded.tokenizer.eos_id

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(prompts: list[str], max_tokens: int) -> list[float]:
        ids = [tok.encode(p, False) for p in prompts]
        T = max(map(len, ids))
        input_ids = torch.tensor([[eos] * (T - len(x)) + x for x in ids])  # left padding
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])
        stamp = Stamp()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, do_sample=False, pad_token_id=eos,
                           logits_processor=LogitsProcessorList([stamp]))
        return stamp.times

    generate(["warm up"], 4)
    times = generate([w["single_prompt"]], w["single_tokens"])
    single = (len(times) - 1) / (times[-1] - times[0])

    t0 = time.perf_counter()
    pending = list(range(len(w["prompts"])))
    ttft, n_tokens, end = [0.0] * len(pending), 0, t0
    while pending:
        now = time.perf_counter() - t0
        batch = [i for i in pending if w["arrivals"][i] <= now]
        if not batch:
            time.sleep(w["arrivals"][pending[0]] - now)
            continue
        times = generate([w["prompts"][i] for i in batch], w["max_tokens"])
        for i in batch:
            ttft[i] = times[0] - (t0 + w["arrivals"][i])
        n_tokens += len(batch) * len(times)
        end = times[-1]
        pending = [i for i in pending if i not in batch]
    return {"single": single, "aggregate": n_tokens / (end - t0), "ttft": ttft, "tokens": n_tokens,
            "rss": peak_rss(), "logit_diff": diff}


def peer_llamacpp(w: dict) -> dict | None:
    if not LLAMACPP_PY.exists():
        print(f"llama.cpp skipped: {LLAMACPP_PY} missing (see the docstring to build it)", file=sys.stderr)
        return None
    from models.loading import default_gguf_path, load_gguf

    loaded = load_gguf(dtype="fp32")
    w = {**w, "gguf": str(default_gguf_path()), "stop_ids": sorted(loaded.stop_ids)}
    with tempfile.TemporaryDirectory() as d:
        wp, op = Path(d) / "w.json", Path(d) / "o.json"
        wp.write_text(json.dumps(w))
        subprocess.run([str(LLAMACPP_PY), str(Path(__file__).parent / "bench_llamacpp.py"), str(wp), str(op)],
                       check=True)
        return json.loads(op.read_text())


# -------------------------------------------------------------------------------------- machine facts


def bandwidth_gbs() -> float:
    """Median of large tensor copies: (read + write) bytes per second."""
    import torch

    a = torch.ones(64 * 1024 * 1024)  # 256 MiB
    b = torch.empty_like(a)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / sorted(times)[3] / 1e9


def read_bandwidth_gbs() -> float:
    """Median of large tensor sums: bytes read per second (what streaming weights needs)."""
    import torch

    a = torch.ones(64 * 1024 * 1024)  # 256 MiB
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / sorted(times)[3] / 1e9


def gemv_floor_ms(dtype: str, threads: int) -> float:
    """A batch-1 decode step's matrix-vector products alone, as our model holds them (packed: the GGUF's own
    quantized types, or bf16, in models/kernels' layouts), in layer order, so each weight streams from DRAM as
    in a real step: the floor under our batch-1 step before any norm, RoPE, attention or Python overhead.
    LAMINA_KERNELS=torch|avx2|avxvnni|avx512 picks the kernel variant."""
    import statistics

    import torch

    from models.loading import load_gguf

    torch.set_num_threads(threads)
    llama = load_gguf(dtype=dtype).model.llama
    mats = []
    for layer in llama.layers:
        attn, ffn = layer.attention, layer.feed_forward
        mats += [attn.wqkv_packed, attn.wo.packed, ffn.w13_packed, ffn.w2.packed]
    mats.append(llama.output_packed)
    xs = [torch.randn(1, 1, w.k).to(llama.dtype) for w in mats]
    times = []
    with torch.inference_mode():
        for _ in range(30):
            t = time.perf_counter()
            for w, x in zip(mats, xs, strict=True):
                w.matmul(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times[3:]) * 1e3


def gemv_name() -> str:
    from models import kernels

    return f"{kernels.isa()} kernels"


def weight_bytes_per_token(elem: int) -> float:
    """Bytes a batch-1 decode step must read: every layer matrix and the (tied) output matrix."""
    from models.loading import load_gguf

    a = load_gguf(dtype="fp32").model.llama.args
    per_layer = a.dim * (a.n_heads + 2 * a.kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim \
        + 3 * a.dim * a.ffn_hidden
    return (a.n_layers * per_layer + a.vocab_size * a.dim) * elem


# ------------------------------------------------------------------------------------------------ main


def run_peer(name: str, args) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--peer", name, "--out", out, "--dtype", args.dtype,
           "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--rate", str(args.rate),
           "--threads", str(args.threads), *(["--compile"] if args.compile else [])]
    t = time.time()
    proc = subprocess.run(cmd)
    print(f"[{name}: {time.time() - t:.0f} s]", file=sys.stderr)
    if proc.returncode != 0:
        return None
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="our activations (fp32: what `lamina serve` runs the quantized default model in)")
    ap.add_argument("--hf-dtype", choices=["fp32", "bf16"], help="HF's weights (default: the same as ours)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rate", type=float, default=16.0,
                    help="Poisson arrivals per second (at 4/s the arrivals span ~5.5 s and cap any server near "
                         "150 tok/s: the benchmark would measure the arrival process, not the engine)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="our engine with compile_decode (torch.compile, batch 1)")
    ap.add_argument("--direct", action="store_true", help="only our runner's decode loop at B=1 and B=16")
    ap.add_argument("--profile", action="store_true", help="with --direct: where a decode step's time goes")
    ap.add_argument("--quantization", default="auto", choices=["auto", "none"],
                    help="with --direct: none dequantizes the GGUF to --dtype (bf16: bf16 weights)")
    ap.add_argument("--eager", action="store_true", help="with --direct: the eager layers, not the fused forward")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.hf_dtype = args.hf_dtype or args.dtype
    w = {**workload(args.requests, args.max_tokens, args.rate), "threads": args.threads}
    if args.direct:
        direct_decode(args.dtype, args.threads, args.compile, profile=args.profile, quantization=args.quantization,
                      eager=args.eager)
        print(f"the model's GEMVs alone ({gemv_name()}, cold): {gemv_floor_ms(args.dtype, args.threads):.1f} ms")
        return

    if args.peer:
        result = {"ours": lambda: peer_ours(w, args.dtype, args.compile), "hf": lambda: peer_hf(w, args.dtype),
                  "llamacpp": lambda: peer_llamacpp(w)}[args.peer]()
        Path(args.out).write_text(json.dumps(result))
        return

    # this shared machine's bandwidth changes by ~1.5x between phases lasting minutes: bracket our run
    bws = [(bandwidth_gbs(), read_bandwidth_gbs())]
    results = {"ours": run_peer("ours", args)}
    bws.append((bandwidth_gbs(), read_bandwidth_gbs()))
    bw, bw_read = (sum(b[0] for b in bws) / 2), (sum(b[1] for b in bws) / 2)
    if not args.skip_hf:
        hf_args = argparse.Namespace(**{**vars(args), "dtype": args.hf_dtype})
        results["hf"] = run_peer("hf", hf_args)
    if not args.skip_llamacpp:
        results["llamacpp"] = run_peer("llamacpp", args)
    results = {k: v for k, v in results.items() if v}

    elem = {"fp32": 4, "bf16": 2}[args.dtype]
    wb = weight_bytes_per_token(elem)
    roofline = bw * 1e9 / wb
    floor = gemv_floor_ms(args.dtype, args.threads)
    labels = {"ours": f"lamina ({args.dtype}, continuous batching)", "hf": f"HF generate ({args.hf_dtype}, static)",
              "llamacpp": "llama.cpp (same GGUF, Q4_1)"}
    print(f"\nmemory bandwidth around our run (copy, r+w): {bws[0][0]:.1f} / {bws[1][0]:.1f} GB/s; batch-1 weight "
          f"bytes/token ({args.dtype}): {wb / 1e6:.0f} MB -> roofline {roofline:.0f} tok/s (read-only streaming: "
          f"{bw_read:.1f} GB/s -> {bw_read * 1e9 / wb:.0f} tok/s)")
    print(f"the model's GEMVs alone ({gemv_name()}, cold): {floor:.1f} ms/token -> at most {1e3 / floor:.0f} "
          f"tok/s = {1e3 / floor / roofline:.0%} of the roofline")
    span = w["arrivals"][-1]
    print(f"workload: batch-1 decode of {w['single_tokens']} tokens; {args.requests} requests, Poisson "
          f"{args.rate}/s, {args.max_tokens} tokens each (arrivals span {span:.1f} s), greedy, {args.threads} threads\n")
    head = f"{'peer':42} {'b1 tok/s':>9} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'peak RSS':>9}"
    print(head)
    print("-" * len(head))
    for k, r in results.items():
        print(f"{labels[k]:42} {r['single']:9.1f} {r['aggregate']:10.1f} {percentile(r['ttft'], 50):8.2f}s "
              f"{percentile(r['ttft'], 99):8.2f}s {r['rss'] / 2**20:7.0f}MB")
    ours = results["ours"]
    print(f"\nlamina batch-1 = {ours['single'] / roofline:.0%} of the {args.dtype} roofline "
          f"({ours['single'] / (bw_read * 1e9 / wb):.0%} of the read-only one)")
    for k, r in results.items():
        if k == "ours":
            continue
        print(f"lamina / {labels[k]}: batch-1 {ours['single'] / r['single']:.2f}x, aggregate "
              f"{ours['aggregate'] / r['aggregate']:.2f}x, TTFT p50 {percentile(r['ttft'], 50) / percentile(ours['ttft'], 50):.2f}x "
              f"lower, p99 {percentile(r['ttft'], 99) / percentile(ours['ttft'], 99):.2f}x lower, "
              f"RSS {ours['rss'] / r['rss']:.2f}x")
    if "hf" in results:
        print(f"(HF vs our model, max |logit diff| on a prompt: {results['hf']['logit_diff']:.2e})")


if __name__ == "__main__":
    main()
