"""`lamina serve` flags and LAMINA_* variables land in the one Settings class; flags win."""

from __future__ import annotations

import pytest

from server.__main__ import build_parser, main, settings_from_args
from server.settings import Settings


def parse(argv, monkeypatch=None, env=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults_are_the_embedded_model_with_experts(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("LAMINA_"):
            monkeypatch.delenv(key)
    s = parse([])
    assert s.uses_default_model and s.experts == ["ocr", "detection", "caption"]
    assert s.host == "127.0.0.1" and s.port == 8000 and s.api_keys == []


def test_llama_adapter_flags(tmp_path):
    s = parse(["--llama-dir", str(tmp_path), "--tokenizer", "/t/tokenizer.model",
               "--adapter", "BIAS-7B=/w/bias.pth", "--adapter", "CAPTION-7B=/w/cap.pth",
               "--clip-model", "ViT-L-14", "--clip-weights", "/w/ViT-L-14.pt", "--dtype", "bf16",
               "--channel-order", "rgb", "--experts", "none", "--max-context", "1024", "--kv-cache-bytes", "2GiB",
               "--api-key", "a", "--api-key", "b", "--cors-origin", "*", "--json-logs", "--no-auth-metrics"])
    assert list(s.adapters) == ["BIAS-7B", "CAPTION-7B"] and str(s.adapters["CAPTION-7B"]) == "/w/cap.pth"
    assert s.dtype == "bf16" and s.channel_order == "rgb" and s.experts == [] and s.max_context == 1024
    assert s.kv_cache_bytes == 2 * 2**30 and s.api_keys == ["a", "b"] and s.cors_origins == ["*"]
    assert s.json_logs and not s.auth_metrics and not s.uses_default_model


def test_environment_and_precedence(monkeypatch):
    s = parse(["--port", "9001", "--experts", "ocr"], monkeypatch, {
        "LAMINA_PORT": "9000", "LAMINA_API_KEYS": "k1,k2", "LAMINA_EXPERTS": "caption",
        "LAMINA_IMAGE_ALLOWED_HOSTS": "10.0.0.0/8,images.internal", "LAMINA_IMAGE_FORMATS": "png,jpg",
        "LAMINA_MAX_WAITING": "7"})
    assert s.port == 9001 and s.experts == ["ocr"]  # flags win
    assert s.api_keys == ["k1", "k2"] and s.max_waiting == 7
    assert s.image_allowed_hosts == ["10.0.0.0/8", "images.internal"] and s.image_formats == ["PNG", "JPEG"]
    monkeypatch.setenv("LAMINA_ADAPTERS", '{"A": "/a.pth"}')
    monkeypatch.setenv("LAMINA_LLAMA_DIR", "/l")
    monkeypatch.setenv("LAMINA_TOKENIZER", "/t")
    monkeypatch.setenv("LAMINA_CLIP_MODEL", "ViT-L-14")
    monkeypatch.setenv("LAMINA_CLIP_WEIGHTS", "/c")
    assert list(Settings().adapters) == ["A"]


@pytest.mark.parametrize("argv,message", [
    (["--adapter", "X=/x.pth"], "--llama-dir"),
    (["--llama-dir", "/l"], "--tokenizer"),
    (["--llama-dir", "/l", "--tokenizer", "/t", "--adapter", "X=/x"], "--clip-model"),
    (["--llama-dir", "/l", "--tokenizer", "/t", "--adapter", "broken"], "NAME=PATH"),
    (["--image-allowed-hosts", "10.0.0.0/99"], "image-allowed-hosts"),
    (["--port", "99999"], "--port"),
    (["--device", "tpu"], "--device"),
    (["--max-waiting", "0"], "--max-waiting"),  # the warm-up request itself waits: 0 could never start
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_every_setting_has_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        flag = {"adapters": "--adapter", "api_keys": "--api-key", "cors_origins": "--cors-origin"}.get(
            name, "--" + name.replace("_", "-"))
        assert flag in help_text, flag
        assert f"LAMINA_{name.upper()}" in help_text.replace("\n", "").replace(" ", "")


def test_auto_dtype_is_bf16_only_with_native_bf16(tmp_path):
    from server.app import weight_dtype

    def cpu(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n")
        return path

    assert parse([]).dtype == "auto"
    assert weight_dtype("auto", "cpu", cpu("avx512f avx512_bf16")) == "bf16"
    assert weight_dtype("auto", "cpu", cpu("avx512f amx_bf16 amx_tile")) == "bf16"
    assert weight_dtype("auto", "cpu", cpu("avx512f avx512bw")) == "fp32"  # bf16 only emulated: slower than fp32
    assert weight_dtype("auto", "cpu", tmp_path / "missing") == "fp32"
    assert weight_dtype("fp16", "cpu", cpu("avx512_bf16")) == "fp16"  # an explicit choice is kept


def test_device_auto_is_the_cpu_without_a_gpu_and_cuda_must_exist():
    import torch

    from server.app import model_device

    assert parse([]).device == "auto" and parse(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(ValueError, match="device"):  # pydantic's ValidationError; `lamina serve` exits 2 on it
        parse(["--device", "tpu"])
    if torch.cuda.is_available():
        assert model_device("auto") == "cuda"
    else:
        assert model_device("auto") == "cpu"
        with pytest.raises(ValueError, match="--device cuda: torch sees 0 CUDA device"):
            model_device("cuda")


def test_quantization_and_kv_cache_flags(capsys):
    s = settings_from_args(build_parser().parse_args(["serve", "--quantization", "int4", "--kv-cache-dtype", "fp32"]))
    assert s.quantization == "int4" and s.kv_cache_dtype == "fp32"
    with pytest.raises(SystemExit) as e:
        main(["serve", "--quantization", "int3"])
    assert e.value.code == 2 and "--quantization" in capsys.readouterr().err


def test_auto_dtypes_follow_the_quantization(tmp_path):
    from server.app import activation_dtype, kv_dtype

    cpu = tmp_path / "cpuinfo"
    cpu.write_text("flags: avx512f avx512_bf16")
    gguf = Settings()  # the embedded GGUF: kept quantized
    assert activation_dtype(gguf, "cpu", cpu) == "fp32" and kv_dtype(gguf, "cpu", "fp32", cpu) == "bf16"
    dense = Settings(llama_dir="/l", tokenizer="/t")  # a 16-bit Meta checkpoint, not quantized
    assert activation_dtype(dense, "cpu", cpu) == "bf16"
    assert activation_dtype(Settings(llama_dir="/l", tokenizer="/t", quantization="int8"), "cpu", cpu) == "fp32"
    cpu.write_text("flags: avx2")
    assert kv_dtype(gguf, "cpu", "fp32", cpu) == "fp32"
