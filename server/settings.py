"""Every knob of the server in one pydantic-settings class.

Values come from (highest first) `lamina serve` flags, `LAMINA_*` environment variables, then the defaults
below. Lists and maps also accept the plain forms a shell user types: `LAMINA_API_KEYS=k1,k2`,
`LAMINA_ADAPTERS=BIAS-7B=/w/bias.pth,CAPTION-7B=/w/cap.pth`, `LAMINA_EXPERTS=none` (JSON works too).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_EXPERTS = ("ocr", "detection", "caption")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def _split(value: Any) -> Any:
    """"a,b" / '["a","b"]' / "none" / "" → list; anything else is left to pydantic."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    if text.lower() in ("", "none", "off"):
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAMINA_", extra="forbid", validate_default=True)

    # --- network and access
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Bearer keys clients must send; empty = no authentication"
    )
    auth_health: bool = Field(False, description="health/readiness endpoints also need a key")
    auth_metrics: bool = Field(False, description="/metrics also needs a key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="'*' = any")
    json_logs: bool = Field(False, description="one JSON object per log line")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    # --- the model: the embedded default (SmolLM2) unless --llama-dir is given
    llama_dir: Path | None = Field(None, description="folder with params.json + consolidated.*.pth")
    tokenizer: Path | None = Field(None, description="tokenizer.model (SentencePiece) for --llama-dir")
    adapters: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict, description="model id → LLaMA-Adapter V2 .pth; the ids clients send as `model`"
    )
    clip_model: str | None = Field(None, description="open_clip model name (ViT-L-14) or model-config JSON")
    clip_weights: Path | None = Field(None, description="OpenAI TorchScript file or open_clip state dict")
    allow_runtime_adapters: bool = Field(
        False, description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) load and unload "
        "LLaMA-Adapter V2 files while serving (--llama-dir with CLIP; the base is served under its folder name)")
    adapter_dir: Path | None = Field(None, description="runtime adapters: files only from this folder (relative "
                                     "paths resolve in it)")
    max_runtime_adapters: int = Field(4, ge=1, le=64, description="bank rows for adapters loaded at run time")
    max_lora_rank: int = Field(16, ge=1, le=256, description="runtime adapters: the LoRA rank the banks hold")
    runtime_query_len: int = Field(10, ge=1, description="runtime adapters with none at start: adaption prompts "
                                   "per layer (10 for the published LLaMA-Adapter V2 files)")
    runtime_query_layer: int = Field(31, ge=1, description="runtime adapters with none at start: layers that "
                                     "take adaption prompts (31 for the published 7B files)")
    gguf: Path | None = Field(None, description="a GGUF chat model instead of the embedded default")
    served_model_name: str | None = Field(None, description="model id of a plain (adapter-less) model; with "
                                          "--allow-runtime-adapters, the base model's id")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where the model runs: auto (a CUDA GPU when torch sees one, else cpu), cpu, cuda[:N]")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of unquantized weights and of activations; auto: with quantized weights fp32, "
        "else on CPU bf16 where it is native (AVX512-BF16, AMX), else fp32; on CUDA bf16 where supported, else fp16")
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto", description="base weights: auto keeps each file's own (a GGUF's quantized tensors stay as they are, "
        "16-bit checkpoints stay in --dtype); int8 (a scale per 32) or int4 (scale and offset per 32) quantize "
        "16-bit weights at load; none dequantizes a GGUF to --dtype. Adapter tensors, norms and the visual path "
        "stay in full precision. CPU only")
    kv_cache_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="KV-cache dtype; auto: bf16 on CPUs with native bf16 and on CUDA, else the activations' "
        "dtype")
    channel_order: Literal["bgr", "rgb"] = Field(
        "bgr", description="bgr reproduces the released LLaMA-Adapter checkpoints' cv2 preprocessing"
    )

    # --- engine
    max_context: int = Field(2048, ge=16, description="context length (prompt + completion) in tokens")
    max_batch: int = Field(16, ge=1, description="sequences decoded together (KV-cache memory is committed as it is "
                           "used, so capacity costs nothing until filled)")
    kv_cache_bytes: ByteSize | None = Field(None, description="KV-cache memory budget, e.g. 2GiB")
    max_waiting: int = Field(64, ge=1, description="admitted requests waiting for a slot (at least 1: the warm-up "
                             "request waits too); more → 429")
    prefill_chunk: int = Field(512, ge=1, description="tokens per engine step, decode rows first (long prompts in chunks)")
    prefix_caching: bool = Field(
        True, description="reuse a finished request's KV cache for a prompt that starts the same way (same adapter "
        "and images): a chat's next turn prefills only what is new")
    compile: bool = Field(
        False, description="compile batch-1 decode with torch.compile (plain models; CPU: ~1.5x faster single-stream "
        "decode, about a minute more at startup)")
    deterministic: bool = Field(
        False, description="the same seeded request gives the same tokens whatever shares its batch and however "
        "its prompt was chunked or cached. Free on the fused CPU forward (quantized weights: the default model, "
        "--quantization int8/int4), which is batch-invariant anyway; elsewhere every token runs as its own "
        "forward (prefill becomes much slower)")
    default_max_tokens: int | None = Field(
        None, ge=1, description="chat completion length when the client sets none (default: rest of context)"
    )
    request_timeout: float = Field(600.0, gt=0, description="seconds; a request is aborted after it")
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    sse_keepalive: float = Field(5.0, gt=0, description="seconds of silence after which a stream sends an SSE comment")
    response_store: int = Field(
        256, ge=0, description="Responses API: responses kept in memory for previous_response_id and GET (oldest "
        "dropped first); 0 = none kept")

    # --- experts
    experts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_EXPERTS), description="experts run on images, comma-separated, or none")
    expert_timeout: float = Field(20.0, gt=0, description="seconds per expert before it is skipped")
    expert_total_timeout: float = Field(30.0, gt=0, description="seconds for all of a request's experts")
    expert_workers: int = Field(0, ge=0, description="worker threads per expert; 0: half the cores (at least 1)")
    expert_budget: int = Field(384, ge=0, description="max prompt tokens of expert findings")
    caption_adapter: str = Field("CAPTION-7B", description="adapter the caption expert uses when loaded")

    # --- limits
    max_body_bytes: ByteSize = Field(ByteSize(128 * 2**20), description="request body size cap (413 above)")
    max_images: int = Field(4, ge=0, description="images per request")
    image_max_bytes: ByteSize = Field(ByteSize(20 * 2**20), description="per image, encoded")
    image_max_pixels: int = Field(40_000_000, ge=1, description="width × height, checked before decoding")
    image_max_side: int = Field(12_000, ge=1, description="longest side in pixels, checked before decoding")
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(IMAGE_FORMATS), description="accepted image formats (Pillow names)")
    image_fetch_timeout: float = Field(5.0, gt=0, description="seconds for a whole http(s) image fetch")
    image_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts, IPs or CIDRs that may be fetched although private/loopback/link-local",
    )

    @field_validator("api_keys", "cors_origins", "experts", "image_allowed_hosts", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("image_formats", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> Any:
        value = _split(value)
        return [str(v).upper().replace("JPG", "JPEG") for v in value] if isinstance(value, list) else value

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            value = _split(text)
        if isinstance(value, list | tuple):  # ["NAME=PATH", ...]
            out = {}
            for item in value:
                name, sep, path = str(item).partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise ValueError(f"adapter {item!r} must be NAME=PATH")
                if name.strip() in out:
                    raise ValueError(f"adapter name {name.strip()!r} given twice")
                out[name.strip()] = path.strip()
            return out
        return value

    @field_validator("image_allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for item in value:
            if "/" in item:
                ipaddress.ip_network(item, strict=False)  # raises on a malformed CIDR
        return [v.lower() for v in value]

    @model_validator(mode="after")
    def _model_choice(self) -> Settings:
        if self.llama_dir is None:
            if self.adapters or self.tokenizer or self.clip_weights or self.clip_model:
                raise ValueError("--adapter/--tokenizer/--clip-* need --llama-dir")
        else:
            if self.gguf is not None:
                raise ValueError("give either --llama-dir or --gguf, not both")
            if self.tokenizer is None:
                raise ValueError("--llama-dir needs --tokenizer PATH (tokenizer.model)")
            if (self.adapters or self.allow_runtime_adapters) and (self.clip_model is None or self.clip_weights is None):
                raise ValueError("LLaMA-Adapter V2 adapters need --clip-model and --clip-weights")
        if self.allow_runtime_adapters and self.llama_dir is None:
            raise ValueError("--allow-runtime-adapters needs a LLaMA-Adapter model: --llama-dir (+ --clip-*)")
        return self

    @property
    def uses_default_model(self) -> bool:
        return self.llama_dir is None and self.gguf is None
