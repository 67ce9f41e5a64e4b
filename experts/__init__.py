"""Expert plug-ins (caption, OCR, object detection) whose text joins the model's context (LLaMA-Adapter V2 §4.4).

Experts know images and text only — nothing of tokens, the engine or HTTP — and this package never imports
`server` or `models`. What the server uses:

    runner = create_runner(enabled, config, default=..., timeout=..., total_budget=..., observer=...)
    results = await runner.run(image, image_hash, question, names)    # list[ExpertResult]
    text = truncate_to_budget(format_context(results), budget, count_tokens)

Heavy libraries (onnxruntime, torch, OCR engines) are imported by the experts that need them, on first use.
"""

from experts.base import (
    Caption,
    DependentExpert,
    Detection,
    Expert,
    ExpertError,
    ExpertResult,
    MissingAssetError,
    OcrLine,
    UnknownExpertError,
)
from experts.caption import CAPTION_PROMPT
from experts.context import CHAT_HEADER, TRUNCATION_MARKER, format_context, truncate_to_budget
from experts.registry import GROUP, available_experts, create_expert, create_experts, create_runner
from experts.run import ExpertRunner, Observer, image_digest

__all__ = [
    "CAPTION_PROMPT",
    "CHAT_HEADER",
    "GROUP",
    "TRUNCATION_MARKER",
    "Caption",
    "DependentExpert",
    "Detection",
    "Expert",
    "ExpertError",
    "ExpertResult",
    "ExpertRunner",
    "MissingAssetError",
    "Observer",
    "OcrLine",
    "UnknownExpertError",
    "available_experts",
    "create_expert",
    "create_experts",
    "create_runner",
    "format_context",
    "image_digest",
    "truncate_to_budget",
]
