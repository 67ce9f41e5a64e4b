"""The engine's vocabulary: requests, sampling parameters, per-step outputs and typed errors.

Frozen dataclasses only; no FastAPI, no pydantic. The HTTP layer converts its wire types into these and
maps the errors below to HTTP statuses in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class GrammarSpec:
    """A structured-output constraint (see server/engine/grammar.py): json_schema (value: the schema as JSON),
    json_object (any JSON object; value unused), regex, choice (value: a JSON list of strings), grammar (Lark or
    GBNF)."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: str = ""

    @property
    def schema(self) -> str:
        """The JSON schema of a json_schema or json_object spec (any object), as JSON."""
        return '{"type": "object"}' if self.kind == "json_object" else self.value


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off (CTRL-style, on prompt + output tokens)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None  # same seed → same text, whatever else is in the batch
    stop: tuple[str, ...] = ()  # the returned text never contains them (unless include_stop_str_in_output)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # before this many output tokens, stop tokens are never sampled and stop strings not checked
    include_stop_str_in_output: bool = False  # the stop string / stop_token_ids token that ended it ends the text
    grammar: GrammarSpec | None = None  # structured output: every token is one the grammar allows
    n: int = 1  # choices
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class ImageInput:
    """A preprocessed image (3, S, S), keyed by the sha256 of its original bytes."""

    pixels: torch.Tensor
    sha256: str


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    adapter: str | None = None  # None: the only/first adapter (or the plain model)
    images: tuple[ImageInput, ...] = ()  # empty: the text-only convention (zero image) for adapters
    deadline: float | None = None  # time.monotonic() after which the request is aborted


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob) best first
    bytes: bytes = b""  # the token's raw bytes (a byte token is one byte, not the text U+FFFD)
    top_bytes: tuple[bytes, ...] = ()  # of each `top` entry


@dataclass(frozen=True)
class RequestOutput:
    """One step's delta for one choice of a request."""

    request_id: str
    index: int  # choice index (n > 1)
    text: str  # new text since the previous delta (UTF-8 safe; stop strings never included)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache, not a prefill


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    tokens_per_second: float
    prompt_tokens_total: int
    generation_tokens_total: int
    prompt_tokens_cached_total: int = 0  # prompt tokens reused from retained K/V (prefix caching), not prefilled
    weight_bytes: int = 0  # the base weights as held (packed/quantized), each once
    kv_cache_bytes: int = 0  # the KV cache's capacity (on the CPU committed as it fills)


class EngineObserver(Protocol):
    """What the engine tells an observer (the server's metrics), on the engine thread; must be quick."""

    def on_stage(self, stage: str, seconds: float) -> None:
        """A timed stage: "visual_encode" (an image encoded, not a cache hit), "prefill" (one prompt chunk)."""

    def on_admit(self, request_id: str) -> None:
        """A request left the waiting queue and got a KV slot."""


class NullObserver:
    def on_stage(self, stage: str, seconds: float) -> None:
        pass

    def on_admit(self, request_id: str) -> None:
        pass


class EngineError(Exception):
    """Base of the engine's typed errors."""


class QueueFullError(EngineError):
    def __init__(self, waiting: int, limit: int, retry_after: float = 1.0):
        super().__init__(f"server overloaded: {waiting} requests waiting (limit {limit}); retry later")
        self.retry_after = retry_after


class ContextLengthError(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        super().__init__(
            f"this model's context is {context} tokens; the prompt has {prompt_tokens} tokens and "
            f"{max_tokens} more were requested for the completion ({prompt_tokens + max_tokens} in all). "
            "Shorten the prompt or lower max_tokens."
        )
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


class UnknownAdapterError(EngineError):
    def __init__(self, name: str, available: tuple[str, ...]):
        super().__init__(f"the model {name!r} does not exist; available: {', '.join(available) or '-'}")
        self.name = name


class EngineStoppedError(EngineError):
    """The engine is draining or stopped and admits no new requests."""
