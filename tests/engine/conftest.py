"""Fixtures for the engine tests: a tiny random plain Llama and the reference-tiny adapter model(s)."""

from pathlib import Path

import pytest
import torch

from models.adapter import LlamaAdapterV2
from models.config import ModelArgs
from models.loading import LoadedModel, load_llama_adapter
from models.tokenizer import SentencePieceTokenizer
from server.engine.core import EngineConfig, EngineCore
from server.engine.types import GenerateRequest, ImageInput, RequestOutput, SamplingParams

REF = Path(__file__).resolve().parent.parent / "data" / "reference-tiny"
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def tiny_plain(seed: int = 0) -> LoadedModel:
    """A random 2-layer GQA Llama over the reference-tiny SentencePiece vocabulary (128 tokens)."""
    tok = SentencePieceTokenizer(str(REF / "tokenizer.model"))
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32)
    model = LlamaAdapterV2(args, None, [])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # AdapterLinear weights are torch.empty: initialise every matrix
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "tok_embeddings" in name else 0.1))
    model.eval()
    return LoadedModel(model, tok, (), "alpaca", None, "tiny-plain", frozenset({tok.eos_id}))


def load_reference(adapters=None) -> LoadedModel:
    return load_llama_adapter(
        llama_dir=REF / "llama" / "tiny",
        tokenizer_path=REF / "tokenizer.model",
        adapters=adapters or {"tiny": REF / "adapter.pth"},
        clip_model=str(REF / "clip-tiny.json"),
        clip_weights=REF / "clip-tiny.pt",
    )


@pytest.fixture(scope="session")
def plain() -> LoadedModel:
    return tiny_plain()


@pytest.fixture(scope="session")
def reference() -> LoadedModel:
    return load_reference()


@pytest.fixture(scope="session")
def golden():
    return torch.load(REF / "golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def two_adapters(tmp_path_factory) -> LoadedModel:
    """The reference adapter under two names; the second with perturbed biases, gates and norms."""
    sd = torch.load(REF / "adapter.pth", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    model = {}
    for k, v in sd["model"].items():
        if k.startswith("llama.") and ("bias" in k or "gate" in k or "norm" in k):
            v = v + 0.5 * torch.randn(v.shape, generator=gen).to(v.dtype)
        model[k] = v
    path = tmp_path_factory.mktemp("adapters") / "other.pth"
    torch.save({"model": model, "config": sd["config"]}, path)
    return load_reference({"tiny": REF / "adapter.pth", "other": path})


def make_core(loaded: LoadedModel, **config) -> EngineCore:
    config = {"max_context": 128, "max_batch": 8, "prefill_chunk": 16, **config}
    return EngineCore.from_config(loaded, EngineConfig(**config))


def image(pixels: torch.Tensor, name: str) -> ImageInput:
    return ImageInput(pixels=pixels, sha256=name)


def request(rid: str, ids, sampling: SamplingParams = GREEDY, **kw) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_ids=tuple(ids), sampling=sampling, **kw)


def token_ids(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.token_ids]


def text(outs: list[RequestOutput], index: int = 0) -> str:
    return "".join(o.text for o in outs if o.index == index)


def run(loaded: LoadedModel, reqs, **config) -> dict[str, list[RequestOutput]]:
    """reqs: requests or (request, adapter id) pairs; all admitted together, stepped to completion."""
    pairs = [r if isinstance(r, tuple) else (r, 0) for r in reqs]
    return make_core(loaded, **config).generate_all(pairs)
