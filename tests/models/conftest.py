"""Fixtures for the model tests: the reference-tiny checkpoint set and its golden outputs."""

from pathlib import Path

import pytest
import torch

from models.loading import load_llama_adapter

REF = Path(__file__).resolve().parent.parent / "data" / "reference-tiny"


@pytest.fixture(scope="session")
def golden():
    return torch.load(REF / "golden.pt", weights_only=True)


def load_reference(**kw):
    return load_llama_adapter(
        llama_dir=REF / "llama" / "tiny",
        tokenizer_path=REF / "tokenizer.model",
        adapters=kw.pop("adapters", {"tiny": REF / "adapter.pth"}),
        clip_model=str(REF / "clip-tiny.json"),
        clip_weights=REF / "clip-tiny.pt",
        **kw,
    )


@pytest.fixture(scope="session")
def reference():
    return load_reference()
