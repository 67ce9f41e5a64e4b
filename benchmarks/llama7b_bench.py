"""Lamina vs llama.cpp's llama-server on a LLaMA-7B-shaped checkpoint with random weights (CPU, batch 1).

Writes (once, cached under ~/.cache/lamina/bench-7b[-L<N>]/) a Meta-layout checkpoint (params.json +
consolidated.00.pth, fp16, values ~N(0, 0.02), norms 1), a 32000-piece SentencePiece tokenizer and Q8_0/Q4_0
GGUF files of the same weights; then serves each config over HTTP, one server at a time, and streams
/v1/completions ("Hello", 24 tokens, greedy, ignore_eos): time to ready, decode tok/s (median of 2 after a
warm-up), RSS after load, VmHWM, weight bytes, roofline (weight bytes per token / measured read bandwidth).

Usage: python benchmarks/llama7b_bench.py [--layers N] [--json OUT] [--llama-args=-nr] [--only lamina-none,llama.cpp-q8_0,...]
"""

import argparse
import http.client
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LLAMA_SERVER = Path.home() / ".cache/lamina/llama.cpp-0.3.36/bin/llama-server"
VOCAB_GGUF_CANDIDATES = [LLAMA_SERVER.parent.parent / "models/ggml-vocab-llama-spm.gguf",
                         Path("/tmp/llsd/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"),
                         Path("/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")]
DIM, HIDDEN, HEADS, VOCAB = 4096, 11008, 32, 32000
PROMPT, MAX_TOKENS = "Hello", 24


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- files

def meta_shapes(n_layers):
    yield "tok_embeddings.weight", (VOCAB, DIM)
    for i in range(n_layers):
        p = f"layers.{i}."
        for k in ("wq", "wk", "wv", "wo"):
            yield p + f"attention.{k}.weight", (DIM, DIM)
        yield p + "feed_forward.w1.weight", (HIDDEN, DIM)
        yield p + "feed_forward.w2.weight", (DIM, HIDDEN)
        yield p + "feed_forward.w3.weight", (HIDDEN, DIM)
        yield p + "attention_norm.weight", (DIM,)
        yield p + "ffn_norm.weight", (DIM,)
    yield "norm.weight", (DIM,)
    yield "output.weight", (VOCAB, DIM)


def write_checkpoint(d, n_layers):
    mdir = d / "llama-7b"
    pth = mdir / "consolidated.00.pth"
    if pth.exists():
        return
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "params.json").write_text(json.dumps({"dim": DIM, "multiple_of": 256, "n_heads": HEADS,
                                                   "n_layers": n_layers, "norm_eps": 1e-06, "vocab_size": VOCAB}))
    g = torch.Generator().manual_seed(0)
    sd, t0 = {}, time.perf_counter()
    for name, shape in meta_shapes(n_layers):
        if len(shape) == 1:
            sd[name] = torch.ones(shape, dtype=torch.float16)
        else:
            t = torch.empty(shape, dtype=torch.float16)
            for r in range(0, shape[0], 1024):  # fp32 scratch of 1024 rows at a time
                t[r:r + 1024] = (torch.randn((min(1024, shape[0] - r), shape[1]), generator=g) * 0.02).half()
            sd[name] = t
        if name.endswith("w3.weight"):
            log(f"  generated {name} ({time.perf_counter() - t0:.0f} s)")
    tmp = pth.with_suffix(".tmp")
    torch.save(sd, tmp)
    del sd
    tmp.rename(pth)
    log(f"wrote {pth} ({pth.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)")


def write_tokenizer(d):
    path = d / "tokenizer.model"
    if path.exists():
        return
    import sentencepiece as spm
    d.mkdir(parents=True, exist_ok=True)
    n_pad = VOCAB - 1000
    spm.SentencePieceTrainer.train(
        input=str(ROOT / "tests/data/text/apache-2.0.txt"), model_prefix=str(d / "tok"), model_type="bpe",
        vocab_size=VOCAB, user_defined_symbols=[f"<pad_{i}>" for i in range(n_pad)], byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    if sp.vocab_size() != VOCAB:  # learned fewer merges than asked: top up with more symbols
        extra = VOCAB - sp.vocab_size()
        spm.SentencePieceTrainer.train(
            input=str(ROOT / "tests/data/text/apache-2.0.txt"), model_prefix=str(d / "tok"), model_type="bpe",
            vocab_size=VOCAB, user_defined_symbols=[f"<pad_{i}>" for i in range(n_pad + extra)],
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    assert sp.vocab_size() == VOCAB, sp.vocab_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    (d / "tok.model").rename(path)
    (d / "tok.vocab").unlink(missing_ok=True)
    log(f"wrote {path} ({sp.vocab_size()} pieces)")


GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(meta):
    if meta == "tok_embeddings.weight":
        return "token_embd.weight"
    if meta == "norm.weight":
        return "output_norm.weight"
    if meta == "output.weight":
        return "output.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", meta)
    return f"blk.{m[1]}.{GGUF_NAMES[m[2]]}.weight"  # Meta q/k rows are already GGUF's interleaved RoPE layout


def write_gguf(d, n_layers, qtype_name):
    import gguf
    from gguf.quants import quantize
    qt = getattr(gguf.GGMLQuantizationType, qtype_name.upper())
    path = d / f"llama-7b-{qtype_name}.gguf"
    if path.exists():
        return path
    vocab_path = next((p for p in VOCAB_GGUF_CANDIDATES if p.exists()), None)
    if vocab_path is None:
        sys.exit("ggml-vocab-llama-spm.gguf not found: run scripts/build-llama-server.sh (it keeps a copy), or "
                 "pip download --no-deps --no-binary :all: "
                 "llama-cpp-python==0.3.36 -d /tmp/lcp and untar it there")
    vocab = gguf.GGUFReader(str(vocab_path))
    sd = torch.load(d / "llama-7b/consolidated.00.pth", mmap=True, weights_only=True)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("llama-7b-random")
    w.add_context_length(2048)
    w.add_embedding_length(DIM)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype_name])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    f = vocab.fields
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_scores(f["tokenizer.ggml.scores"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
    w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
    w.add_unk_token_id(f["tokenizer.ggml.unknown_token_id"].contents())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # tensor infos first, then the data tensor by tensor (only one quantized tensor in memory at a time)
    order = [n for n, _ in meta_shapes(n_layers)]
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
    for n in order:
        shape = tuple(sd[n].shape)
        if len(shape) == 1:
            w.add_tensor_info(gguf_name(n), shape, np.dtype(np.float32), shape[0] * 4)
        else:
            nbytes = shape[0] * shape[1] // block * tsize
            w.add_tensor_info(gguf_name(n), (shape[0], shape[1] // block * tsize), np.dtype(np.uint8), nbytes,
                              raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for i, n in enumerate(order):
        a = sd[n].float().numpy()
        w.write_tensor_data(a if a.ndim == 1 else quantize(a, qt))
        if i % 20 == 0 or i == len(order) - 1:
            log(f"  {qtype_name}: {i + 1}/{len(order)} tensors ({time.perf_counter() - t0:.0f} s)")
    w.close()
    tmp.rename(path)
    log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return path


# ---------------------------------------------------------------- measurements

def read_bandwidth():
    torch.set_num_threads(2)
    x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    del x
    return 2**30 / best


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def proc_status(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_rss():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.Popen([sys.executable, "-c", "import torch, server.app, sys, time; print('ok', flush=True); "
                          "time.sleep(120)"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    time.sleep(0.5)
    rss = proc_status(p.pid)["VmRSS"]
    p.kill()
    p.wait()
    return rss


def model_id(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/models")
    r = c.getresponse()
    data = json.loads(r.read())
    c.close()
    return data["data"][0]["id"]


def stream_completion(port, model):
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}, "model": model})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    t_send = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    stamps, usage, text = [], None, ""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            usage = obj["usage"]
        ch = obj.get("choices") or []
        if ch and ch[0].get("text"):
            stamps.append(time.perf_counter())
            text += ch[0]["text"]
    conn.close()
    n = (usage or {}).get("completion_tokens") or len(stamps)
    tps = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"tokens": n, "chunks": len(stamps), "ttft_s": stamps[0] - t_send if stamps else None,
            "tok_s": tps, "text": text}


def wait_ready(proc, port, path, logfile, timeout):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n" + tail(logfile))
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout} s:\n" + tail(logfile))


def tail(logfile, n=25):
    return "\n".join(Path(logfile).read_text(errors="replace").splitlines()[-n:])


def run_server(name, cmd, env, ready_path, logfile, timeout):
    port = int(cmd[cmd.index("--port") + 1])
    log(f"{name}: {' '.join(cmd)}")
    with open(logfile, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(proc, port, ready_path, logfile, timeout)
        ready_s = time.perf_counter() - t0
        rss_load = proc_status(proc.pid)["VmRSS"]
        log(f"{name}: ready in {ready_s:.1f} s, RSS {rss_load / 2**30:.2f} GiB")
        model = model_id(port)
        warm = stream_completion(port, model)
        runs = [stream_completion(port, model) for _ in range(2)]
        st = proc_status(proc.pid)
        res = {"ready_s": ready_s, "rss_load": rss_load, "vm_hwm": st["VmHWM"], "warmup": warm, "runs": runs,
               "tok_s": statistics.median(r["tok_s"] for r in runs), "log": str(logfile)}
        log(f"{name}: {res['tok_s']:.2f} tok/s ({[round(r['tok_s'], 2) for r in runs]}), tokens "
            f"{[r['tokens'] for r in runs]}, HWM {st['VmHWM'] / 2**30:.2f} GiB")
        return res, tail(logfile, 60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gguf_weight_bytes(path):
    import gguf
    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--only", help="comma-separated configs: lamina-none,lamina-int8,lamina-int4,"
                                   "llama.cpp-q8_0,llama.cpp-q4_0")
    ap.add_argument("--ready-timeout", type=float, default=1800)
    ap.add_argument("--llama-args", default="", help="extra llama-server flags, passed through as is (e.g. -nr)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    d = Path.home() / ".cache/lamina" / ("bench-7b" if args.layers == 32 else f"bench-7b-L{args.layers}")
    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer(d)
    write_checkpoint(d, args.layers)
    ggufs = {q: write_gguf(d, args.layers, q) for q in ("q8_0", "q4_0")}
    log(f"files ready ({time.perf_counter() - t_start:.0f} s)")

    bw = read_bandwidth()
    base = baseline_rss()
    log(f"read bandwidth {bw / 1e9:.1f} GB/s (2 threads, best of 5); idle torch+server.app RSS {base / 2**20:.0f} MiB")

    lamina = str(VENV_BIN / "lamina")
    configs = []
    for q in ("none", "int8", "int4"):
        port = free_port()
        configs.append((f"lamina-{q}", [lamina, "serve", "--llama-dir", str(d / "llama-7b"), "--tokenizer",
                                        str(d / "tokenizer.model"), "--experts", "none", "--max-batch", "1",
                                        "--max-context", "512", "--port", str(port), "--quantization", q],
                        "/ready", None))
    for q in ("q8_0", "q4_0"):
        port = free_port()
        configs.append((f"llama.cpp-{q}", [str(LLAMA_SERVER), "-m", str(ggufs[q]), "-np", "1", "-t", "2", "-c", "512",
                                           "--port", str(port)] + shlex.split(args.llama_args), "/health", gguf_weight_bytes(ggufs[q])))
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if c[0] in keep]

    env = dict(os.environ, OMP_NUM_THREADS="2")
    results, failures = {}, {}
    logdir = d / "logs"
    logdir.mkdir(exist_ok=True)
    for name, cmd, ready_path, wbytes in configs:
        logfile = logdir / f"{name}.log"
        try:
            res, logtail = run_server(name, cmd, env, ready_path, logfile, args.ready_timeout)
        except Exception as e:  # noqa: BLE001 — report and go on with the next server
            log(f"{name}: FAILED: {e}")
            failures[name] = str(e)
            continue
        if wbytes is None:
            m = re.search(r"base weights: ([\d.]+) MiB held", Path(logfile).read_text(errors="replace"))
            wbytes = float(m[1]) * 2**20 if m else float("nan")
        res["cmd"] = cmd
        res["weight_bytes"] = wbytes
        res["roofline_tok_s"] = bw / wbytes
        res["pct_roofline"] = 100 * res["tok_s"] / res["roofline_tok_s"]
        marg = res["rss_load"] - (base if name.startswith("lamina") else 0)
        res["marginal_rss"] = marg
        res["mem_ratio"] = marg / wbytes
        results[name] = res

    total = time.perf_counter() - t_start
    print(f"\n## LLaMA-7B-shaped, random weights, {args.layers} layers, batch 1, prompt {PROMPT!r}, "
          f"{MAX_TOKENS} tokens, 2 threads\n")
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; idle `import torch, server.app` RSS {base / 2**30:.2f} GiB "
          "(subtracted for Lamina only)\n")
    print("| config | ready s | decode tok/s | weights GiB | roofline tok/s | % roofline | RSS load GiB | "
          "VmHWM GiB | marginal/weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ready_s']:.1f} | {r['tok_s']:.2f} | {r['weight_bytes'] / 2**30:.2f} | "
              f"{r['roofline_tok_s']:.2f} | {r['pct_roofline']:.0f}% | {r['rss_load'] / 2**30:.2f} | "
              f"{r['vm_hwm'] / 2**30:.2f} | {r['mem_ratio']:.2f} |")
    for name in failures:
        print(f"| {name} | FAILED | | | | | | | |")
    print("\nCommands (OMP_NUM_THREADS=2):")
    for name, cmd, *_ in configs:
        print(f"- {name}: `{' '.join(cmd)}`")
    print(f"\ntotal {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": args.layers, "bandwidth": bw, "baseline_rss": base,
                                               "results": results, "failures": failures, "total_s": total},
                                              indent=1))


if __name__ == "__main__":
    main()
