"""The CUDA path, checked in one run (a few minutes on one GPU), with torch and the project only (no FastAPI).

1. golden: the reference-tiny LLaMA-Adapter V2 (tests/data/reference-tiny) in fp32 on the device, TF32 off:
   its prefix logits against the golden ones of the unmodified reference code (max |diff| <= 1e-4).
2. batched == sequential: the same model through the engine (EngineCore) on the device, greedy, four prompts
   with images: each alone, then all together, prefilled in chunks of 5. The same tokens.
3. speed: a LLaMA-7B-shaped model (32 layers, dim 4096, vocabulary 32000) with random bf16 weights built on the
   device (nothing read from disk): decode steps of the model runner at batch 1 and batch 16 (KV cache in
   bf16), against the bandwidth roofline (weight bytes per step over the device's measured copy bandwidth).

Prints one JSON object; exits 1 when check 1 or 2 fails. `--device cpu --dims tiny` runs the same code at tiny
dimensions on the CPU: the test suite does (tests/test_gpu_check.py), so the script cannot rot.

Usage: python scripts/gpu_check.py [--device cuda] [--dims 7b|tiny] [--steps 32] [--json OUT]
The CLIP tower of check 1 needs open_clip_torch; on a machine without it, carry its wheel (pip download
--no-deps open_clip_torch) and add it to PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.adapter import LlamaAdapterV2  # noqa: E402
from models.config import ModelArgs  # noqa: E402
from models.loading import LoadedModel, load_llama_adapter  # noqa: E402
from server.engine.core import EngineConfig, EngineCore  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.engine.types import GenerateRequest, ImageInput, SamplingParams  # noqa: E402

REF = ROOT / "tests" / "data" / "reference-tiny"
DIMS = {
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000, "multiple_of": 256},
    "tiny": {"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "multiple_of": 32},
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reference(device: str) -> LoadedModel:
    lm = load_llama_adapter(REF / "llama" / "tiny", REF / "tokenizer.model", {"tiny": REF / "adapter.pth"},
                            clip_model=str(REF / "clip-tiny.json"), clip_weights=REF / "clip-tiny.pt",
                            progress=lambda _: None)
    lm.model.to(device)
    return lm


def check_golden(lm: LoadedModel, device: str) -> dict:
    golden = torch.load(REF / "golden.pt", weights_only=True)
    model = lm.model
    vq = model.encode_image(golden["image_tensor"].to(device), 0)
    ids = golden["prompt_tokens"]
    with torch.inference_mode():
        logits = model.llama(torch.tensor([ids], device=device), torch.arange(len(ids), device=device)[None],
                             adapter_ids=torch.tensor([0], device=device), prompt_kv=model.prompt_kv([vq], 0),
                             last_only=False)[0]
    err = (logits.float().cpu() - golden["prefix_logits"]).abs().max().item()
    return {"max_abs_err": err, "ok": err <= 1e-4}


def check_batched(lm: LoadedModel) -> dict:
    tok = lm.tokenizer
    golden = torch.load(REF / "golden.pt", weights_only=True)
    img = golden["image_tensor"][0]
    images = [(ImageInput(img, "a"),), (ImageInput(torch.flip(img, dims=[-1]), "b"),), (), (ImageInput(img, "a"),)]
    prompts = ["what is in the image?", "describe it", "hi", "two words"]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def core(**kw):
        return EngineCore.from_config(lm, EngineConfig(**{"max_context": 128, "max_batch": 4, "dtype": "fp32", **kw}))

    def ids(outs):
        return [t for o in outs for t in o.token_ids]

    reqs = [GenerateRequest(f"r{i}", tuple(tok.encode(p, bos=True)), greedy, images=images[i])
            for i, p in enumerate(prompts)]
    alone = {r.request_id: ids(core(max_batch=1).generate_all([(r, 0)])[r.request_id]) for r in reqs}
    together = {k: ids(v) for k, v in core(prefill_chunk=5).generate_all([(r, 0) for r in reqs]).items()}
    return {"ok": together == alone, "sequences": len(reqs), "tokens_each": greedy.max_tokens}


def random_model(dims: str, device: str) -> LoadedModel:
    args = ModelArgs(**DIMS[dims], max_seq_len=2048)
    with torch.device("meta"):
        model = LlamaAdapterV2(args, None, [])
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.to(torch.bfloat16).eval()
    return LoadedModel(model, None, (), "chat", None, f"random-{dims}", frozenset())


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy, best of 5: the memory roofline's
    bandwidth (reads and writes share it, so a decode step's read-only stream gets about the same)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bench(dims: str, device: str, steps: int) -> dict:
    lm = random_model(dims, device)
    runner = ModelRunner(lm, n_slots=16, max_context=512, kv_dtype=torch.bfloat16)
    vocab = lm.model.llama.args.vocab_size
    for s in range(16):
        runner.prefill(s, [(7 * s + i) % vocab for i in range(8)], 0)
    out = {"weight_bytes": runner.weight_bytes}
    for batch in (1, 16):
        slots, pos = list(range(batch)), 8
        runner.decode(slots, [1] * batch, [pos] * batch)  # warm-up
        pos += 1
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = runner.decode(slots, [1] * batch, [pos] * batch)
            pos += 1
        sync(device)
        step = (time.perf_counter() - t0) / steps
        out[f"batch{batch}"] = {"step_ms": step * 1e3, "tok_s": batch / step, "logits_finite": bool(logits.isfinite().all())}
    bw = copy_bandwidth(device, 1 << 30 if device.startswith("cuda") else 1 << 26)
    out["copy_bandwidth_gbs"] = bw / 1e9
    out["roofline_tok_s"] = bw / runner.weight_bytes  # a decode step reads every weight once
    out["batch1_pct_roofline"] = 100 * out["batch1"]["tok_s"] / out["roofline_tok_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", default="7b", choices=sorted(DIMS))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("torch sees no CUDA device (use --device cpu --dims tiny to run the checks on the CPU)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    result: dict = {"device": args.device, "torch": torch.__version__, "dims": args.dims}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(args.device)
    lm = reference(args.device)
    result["golden"] = check_golden(lm, args.device)
    result["batched_equals_sequential"] = check_batched(lm)
    del lm
    result["speed"] = bench(args.dims, args.device, args.steps)
    result["ok"] = result["golden"]["ok"] and result["batched_equals_sequential"]["ok"]
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
