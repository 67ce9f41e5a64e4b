"""The caption expert: the paper's LLaMA-Adapter captioner when the server provides one, else a caption
grounded in the detection and OCR experts — labelled as such, so nobody mistakes it for a trained captioner.

The paper (LLaMA-Adapter V2 §4.4) captions with a LLaMA-Adapter trained on COCO Caption (`CAPTION-7B`,
prompt `CAPTION_PROMPT`). This package never imports the engine: the server passes a callable
`generate_caption(image) -> str` (in the config under "generate_caption") that runs its engine with that
adapter and prompt. Without one (the offline default) the expert declares `depends_on` on the experts it
grounds in, and the runner hands it their results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from experts.base import Caption, Detection, ExpertResult, OcrLine
from experts.coco import plural

CAPTION_PROMPT = "Generate caption of this image"
GROUNDED_SOURCE = "grounded"

_SOURCE_NAMES = {"detection": "object detection", "ocr": "OCR"}
_NUMBERS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _count_phrase(n: int, label: str) -> str:
    if n == 1:
        return ("an " if label[:1].lower() in "aeiou" else "a ") + label
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {plural(label)}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def grounded_caption(detections: Sequence[Detection], lines: Sequence[OcrLine], max_text_chars: int = 80) -> str:
    """One plain sentence from detections and OCR lines, e.g. 'A picture of three horses and a person.'"""
    counts: dict[str, int] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        counts[d.label] = counts.get(d.label, 0) + 1
    text = " / ".join(ln.text for ln in lines)
    if len(text) > max_text_chars:
        text = text[: max_text_chars - 1].rstrip() + "…"
    if counts and text:
        return f"A picture of {_join([_count_phrase(n, k) for k, n in counts.items()])}, with the text \"{text}\"."
    if counts:
        return f"A picture of {_join([_count_phrase(n, k) for k, n in counts.items()])}."
    if text:
        return f"An image with the text \"{text}\"."
    return ""


class CaptionExpert:
    """Captioner-backed when `generate_caption` is given; otherwise grounded in `grounded_on` experts."""

    uses_question = False

    def __init__(
        self,
        generate_caption: Callable[[Image.Image], str] | None = None,
        *,
        source: str = "LLaMA-Adapter captioner",
        grounded_on: Sequence[str] = ("detection", "ocr"),
        name: str = "caption",
    ) -> None:
        self.name = name
        self._generate, self._source = generate_caption, source
        self.depends_on: tuple[str, ...] = () if generate_caption else tuple(grounded_on)

    @property
    def grounded(self) -> bool:
        return self._generate is None

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        return self.run_with(image, question, {})

    def run_with(self, image: Image.Image, question: str, inputs: Mapping[str, ExpertResult]) -> ExpertResult:
        if self._generate is not None:
            caption = " ".join(self._generate(image).split())
            if not caption:
                return ExpertResult(self.name, "")
            return ExpertResult(self.name, f"Caption: {caption}", (Caption(caption, self._source),))
        detections = [x for r in inputs.values() for x in r.data if isinstance(x, Detection)]
        lines = [x for r in inputs.values() for x in r.data if isinstance(x, OcrLine)]
        caption = grounded_caption(detections, lines)
        if not caption:
            return ExpertResult(self.name, "")
        used = " and ".join(_SOURCE_NAMES.get(n, n) for n in self.depends_on if n in inputs and inputs[n].data)
        label = f"Caption (from {used}, not a trained captioner)"
        return ExpertResult(self.name, f"{label}: {caption}", (Caption(caption, GROUNDED_SOURCE),))


def create(config: Mapping[str, Any] | None = None) -> CaptionExpert:
    """Entry-point factory: `caption = "experts.caption:create"`.

    Config: {"generate_caption": callable (set by the server when a caption checkpoint is loaded),
    "source": "LLaMA-Adapter CAPTION-7B", "grounded_on": ["detection", "ocr"]}.
    """
    cfg = dict(config or {})
    generate = cfg.pop("generate_caption", None)
    if generate is not None and not callable(generate):
        raise TypeError("caption config 'generate_caption' must be a callable image -> str")
    opts = {k: cfg.pop(k) for k in ("source", "grounded_on", "name") if k in cfg}
    if cfg:
        raise ValueError(f"unknown caption options {sorted(cfg)}")
    return CaptionExpert(generate, **opts)
