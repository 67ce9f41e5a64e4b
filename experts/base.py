"""The Expert protocol and the frozen records experts return.

An expert turns an image (and the user's question) into short prompt-ready text plus structured data.
Experts know images and text only: nothing of tokens, the engine or HTTP.

Optional attributes an expert may declare (the runner reads them with defaults):
- `uses_question: bool = False` — its output depends on the question (part of the cache key).
- `depends_on: tuple[str, ...] = ()` — names of experts whose results it consumes; the runner then calls
  `run_with(image, question, inputs)` with the results of those that are enabled (see `DependentExpert`).
- `warmup() -> None` — load models now instead of on the first request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image the expert was given
Status = Literal["ok", "cached", "timeout", "error"]


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object."""

    label: str
    score: float
    box: Box


@dataclasses.dataclass(frozen=True)
class OcrLine:
    """One line of recognised text, in reading order within the result."""

    text: str
    score: float
    box: Box


@dataclasses.dataclass(frozen=True)
class Caption:
    """A caption and where it came from (a trained captioner, or grounded in other experts)."""

    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class ExpertResult:
    """What one expert produced for one image.

    Experts fill `name`, `text` and `data`; the runner fills `seconds`, `status` and `error`.
    `text` is prompt-ready (it carries its own label, e.g. "Objects detected: ..."); it is "" when the
    expert found nothing worth saying or failed.
    """

    name: str
    text: str
    data: tuple[Any, ...] = ()
    seconds: float = 0.0
    status: Status = "ok"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "cached")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the response's transparency field."""
        return {
            "name": self.name,
            "text": self.text,
            "seconds": round(self.seconds, 4),
            "status": self.status,
            "error": self.error,
            "data": [_item_to_dict(item) for item in self.data],
        }


def _item_to_dict(item: Any) -> Any:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {"type": type(item).__name__, **dataclasses.asdict(item)}
    return item


@runtime_checkable
class Expert(Protocol):
    """image + question -> ExpertResult. Must be safe to call from a worker thread."""

    name: str

    def run(self, image: Image.Image, question: str) -> ExpertResult: ...


@runtime_checkable
class DependentExpert(Expert, Protocol):
    """An expert that consumes other experts' results (e.g. a caption grounded in detection and OCR)."""

    depends_on: tuple[str, ...]

    def run_with(
        self, image: Image.Image, question: str, inputs: Mapping[str, ExpertResult]
    ) -> ExpertResult: ...


class ExpertError(Exception):
    """Base of the errors this package raises on purpose."""


class UnknownExpertError(ExpertError, KeyError):
    """A requested expert is not installed or not enabled (the server maps this to HTTP 400)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingAssetError(ExpertError, FileNotFoundError):
    """A model file an expert needs is not there; the message says how to get it."""
