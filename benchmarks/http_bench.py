"""What the HTTP layer costs: N concurrent streaming clients through `lamina serve` vs the engine alone.

In one run, on the same weights and engine settings:
- engine alone: this process drives `AsyncEngine.generate` with N concurrent requests (the same prompt ids
  the server would build);
- HTTP: `lamina serve` runs in a subprocess (one uvicorn worker, experts off) and N clients stream
  `/v1/chat/completions` over loopback with httpx.
The phases alternate (engine, HTTP, engine, HTTP, …) so drifting machine load hits both alike. Reported:
output tokens/s end to end, the HTTP/engine ratio (target ≥ 0.90, i.e. the HTTP layer costs < 10 %), and
time to first token p50/p99.

    python benchmarks/http_bench.py                    # embedded SmolLM2-135M, 16 clients × 64 tokens
    python benchmarks/http_bench.py --clients 16 --max-tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Tell me about the history of the bicycle.", "Explain how rain forms.", "Write a short poem about the sea.",
    "What is a prime number?", "Describe a busy market.", "How do plants grow?", "Why is the sky blue?",
    "Give me three tips for studying.", "What do cats eat?", "Explain what a computer does.",
    "Describe your favourite season.", "How does a train work?", "What is the moon made of?",
    "Tell me a story about a dragon.", "What is democracy?", "How do bees make honey?",
]


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


# ---------------------------------------------------------------------------------------- engine alone


async def engine_round(engine, builder, clients: int, max_tokens: int) -> dict:
    from server.api.prompting import parse_messages
    from server.api.schemas import ChatMessage
    from server.engine.types import GenerateRequest, SamplingParams

    prompts = [builder.encode(builder.render(parse_messages([ChatMessage(**m) for m in messages(i)]), None))
               for i in range(clients)]
    ttft: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        request = GenerateRequest(f"bench-{time.monotonic_ns()}-{i}", tuple(prompts[i]),
                                  SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        t0, first = time.perf_counter(), None
        async for out in engine.generate(request):
            if first is None and out.token_ids:
                first = time.perf_counter()
                ttft.append(first - t0)
            tokens += len(out.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": wall, "tps": tokens / wall, "ttft": ttft}


# ------------------------------------------------------------------------------------------------ HTTP


async def http_round(base: str, model: str, clients: int, max_tokens: int) -> dict:
    ttft: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        t0, first = time.perf_counter(), None
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                    ttft.append(first - t0)
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": wall, "tps": tokens / wall, "ttft": ttft}


async def raw_round(base: str, model: str, clients: int, max_tokens: int) -> dict:
    """`http_round` through a lean client: one HTTP/1.1 connection per stream on asyncio's own sockets, the
    chunked body de-chunked by hand and only the last event (the usage) parsed. The client runs on the same
    CPUs as the server: httpx's per-event line splitting and JSON parsing took ~0.35 ms of CPU per token here,
    which a 2-core machine takes from the kernel's threads, so this measures the server more closely."""
    host, port = base.removeprefix("http://").split(":")
    ttft: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        body = json.dumps({"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
        t0, first = time.perf_counter(), None
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        events = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            data = (await reader.readexactly(size + 2))[:-2]
            if first is None and b'"content":"' in data and b'"content":""' not in data:
                first = time.perf_counter()
                ttft.append(first - t0)
            events = events[-4096:] + data
        writer.close()
        usage = [e for e in events.split(b"\n\n") if b'"usage":{' in e]
        tokens += json.loads(usage[-1].removeprefix(b"data: "))["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": wall, "tps": tokens / wall, "ttft": ttft}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--experts", "none",
           "--max-batch", str(args.clients), "--max-context", str(args.max_context), "--log-level", "warning",
           "--max-waiting", str(4 * args.clients)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lamina serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("lamina serve did not become ready")


async def main_async(args) -> None:
    from server.api.prompting import PromptBuilder
    from server.app import build_engine, load_model
    from server.settings import Settings

    proc, base = start_server(args)
    try:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        # the server's own settings, model loading and engine configuration (activation and KV-cache dtypes), and
        # as it does, the model loaded on the engine thread: this thread runs no torch op in parallel, since a
        # second OpenMP thread team in the process makes libgomp's workers sleep between parallel regions
        # instead of spinning (it throttles them once it manages more threads than CPUs), and the kernel then
        # ran 25-40% slower (measured: 6.1 → 7.5-8.8 ms per batch-1 step)
        settings = Settings(max_batch=args.clients, max_context=args.max_context, max_waiting=4 * args.clients,
                            experts=[])
        engine = build_engine(lambda: load_model(settings, lambda message: None), settings)
        await engine.start()
        loaded = engine.loaded
        builder = PromptBuilder(loaded.prompt_format, loaded.chat_template, loaded.tokenizer, args.max_context)
        http = {"httpx": http_round, "raw": raw_round}[args.client]
        await engine_round(engine, builder, 2, 4)  # warm both paths
        await http(base, model, 2, 4)
        results = {"engine": [], "http": []}
        for r in range(args.rounds):
            results["engine"].append(await engine_round(engine, builder, args.clients, args.max_tokens))
            results["http"].append(await http(base, model, args.clients, args.max_tokens))
            e, h = results["engine"][-1], results["http"][-1]
            print(f"round {r + 1}: engine {e['tps']:.1f} tok/s, HTTP {h['tps']:.1f} tok/s "
                  f"(ratio {h['tps'] / e['tps']:.3f})", flush=True)
        await engine.shutdown(5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"\n{args.clients} concurrent streaming clients ({args.client}) × {args.max_tokens} tokens, {args.rounds} "
          f"rounds, model {model}, {os.cpu_count()} CPUs")
    print(f"{'path':<8}{'tok/s (median)':>16}{'TTFT p50 (s)':>14}{'TTFT p99 (s)':>14}")
    summary = {}
    for path in ("engine", "http"):
        tps = statistics.median(x["tps"] for x in results[path])
        ttft = [t for x in results[path] for t in x["ttft"]]
        summary[path] = tps
        print(f"{path:<8}{tps:>16.1f}{percentile(ttft, 50):>14.3f}{percentile(ttft, 99):>14.3f}")
    ratio = summary["http"] / summary["engine"]
    print(f"HTTP / engine throughput: {ratio:.3f} (HTTP layer cost {100 * (1 - ratio):.1f} %; target < 10 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="HTTP client: raw (lean, see raw_round) or httpx (what Python users run)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
