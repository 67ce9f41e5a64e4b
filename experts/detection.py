"""The object-detection expert: counts, labels, confidence and coarse position of COCO objects.

Default backend: a MobileNetV3 CenterNet (80 COCO classes) converted once from its TF.js release to ONNX by
`scripts/setup-experts.sh` and run with onnxruntime — no TensorFlow at serve time. Users with their own
weights pick another backend by configuration:

- "onnx": any ONNX detector whose output is one of the documented formats:
    "xyxy_score_class": [..., N, 6] rows of x1, y1, x2, y2, score, class index, box coordinates in the
        model's input pixels (CenterNet, ultralytics `export(format="onnx", nms=True)`, most end-to-end exports);
    "yolov8": raw ultralytics YOLOv8/11 output [1, 4 + num_classes, anchors] of cx, cy, w, h, class scores
        (`export(format="onnx")`); NMS is ours.
  Input options: "input_size" [w, h], "layout" NHWC | NCHW, "input_scale" (1.0 for 0..255, 1/255 for 0..1),
  "mean"/"std" per channel (after scaling), "resize" stretch | letterbox.
- "torchvision": a torchvision detection architecture ("arch", e.g. "fasterrcnn_mobilenet_v3_large_fpn") with
  a local state_dict ("model_path"); torchvision is imported only when this backend is used.
- "ultralytics": a local YOLO `.pt` through the `ultralytics` package (imported lazily, not a dependency).

Labels: "coco80" (default), "coco91" (torchvision's ids), a list of names, or a path to a file with one name
per line. Class-agnostic NMS by default, so one object is not reported as both "car" and "truck".
"""

from __future__ import annotations

import inspect
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from experts.assets import centernet_path, require_file
from experts.base import Detection, ExpertResult
from experts.coco import COCO_80, COCO_91, plural


class DetectorBackend(Protocol):
    """Returns candidate detections (score >= min_score) in pixels of `image`; NMS is done by the expert."""

    def detect(self, image: Image.Image, min_score: float) -> list[Detection]: ...


def resolve_labels(labels: str | Sequence[str] | None, default: Sequence[str] = COCO_80) -> tuple[str, ...]:
    if labels is None:
        return tuple(default)
    if isinstance(labels, str):
        if labels.lower() == "coco80":
            return COCO_80
        if labels.lower() == "coco91":
            return COCO_91
        lines = Path(labels).expanduser().read_text().splitlines()
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(labels)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best first. boxes: (N, 4) x1, y1, x2, y2."""
    order = np.argsort(-scores, kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return keep


class OnnxDetector:
    """An ONNX detector run with onnxruntime (CPU); see the module docstring for the output formats."""

    FORMATS = ("xyxy_score_class", "yolov8")

    def __init__(
        self,
        model_path: str | Path,
        labels: Sequence[str] = COCO_80,
        *,
        input_size: Sequence[int] = (640, 640),
        layout: str = "NCHW",
        input_scale: float = 1.0 / 255.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize: str = "letterbox",
        output_format: str = "yolov8",
        input_name: str | None = None,
        output_name: str | None = None,
        threads: int = 0,
    ) -> None:
        if output_format not in self.FORMATS:
            raise ValueError(f"output_format must be one of {self.FORMATS}, got {output_format!r}")
        if layout not in ("NCHW", "NHWC") or resize not in ("stretch", "letterbox"):
            raise ValueError(f"layout must be NCHW|NHWC and resize stretch|letterbox, got {layout}, {resize}")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        self._session = ort.InferenceSession(str(require_file(model_path, "ONNX detector")), options,
                                             providers=["CPUExecutionProvider"])
        self._input = input_name or self._session.get_inputs()[0].name
        self._output = output_name or self._session.get_outputs()[0].name
        self.labels = tuple(labels)
        self._size = (int(input_size[0]), int(input_size[1]))
        self._layout, self._scale, self._resize, self._format = layout, float(input_scale), resize, output_format
        self._mean = None if mean is None else np.asarray(mean, np.float32)
        self._std = None if std is None else np.asarray(std, np.float32)

    def _preprocess(self, image: Image.Image) -> tuple[np.ndarray, float, float, float, float]:
        """Returns the input tensor and (sx, sy, px, py): image x = (input x - px) / sx."""
        (w, h), (iw, ih) = image.size, self._size
        if self._resize == "stretch":
            canvas, sx, sy, px, py = image.resize((iw, ih), Image.BILINEAR), iw / w, ih / h, 0.0, 0.0
        else:
            s = min(iw / w, ih / h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            px, py = (iw - nw) // 2, (ih - nh) // 2
            canvas = Image.new("RGB", (iw, ih), (114, 114, 114))
            canvas.paste(image.resize((nw, nh), Image.BILINEAR), (px, py))
            sx, sy = nw / w, nh / h
        x = np.asarray(canvas, np.float32) * self._scale  # (H, W, 3) RGB
        if self._mean is not None:
            x = x - self._mean
        if self._std is not None:
            x = x / self._std
        x = x[None] if self._layout == "NHWC" else x.transpose(2, 0, 1)[None]
        return np.ascontiguousarray(x), sx, sy, float(px), float(py)

    def _rows(self, out: np.ndarray, min_score: float) -> np.ndarray:
        """Model output -> (N, 6) rows of x1, y1, x2, y2, score, class in input pixels."""
        if self._format == "xyxy_score_class":
            rows = out.reshape(-1, 6).astype(np.float32)
            return rows[rows[:, 4] >= min_score]
        pred = out.reshape(out.shape[-2], out.shape[-1]).T  # (anchors, 4 + classes)
        cls = pred[:, 4:].argmax(axis=1)
        score = pred[np.arange(len(pred)), 4 + cls]
        pred, cls, score = pred[score >= min_score], cls[score >= min_score], score[score >= min_score]
        cx, cy, bw, bh = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
        return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, score, cls], axis=1)

    def detect(self, image: Image.Image, min_score: float) -> list[Detection]:
        x, sx, sy, px, py = self._preprocess(image)
        (out,) = self._session.run([self._output], {self._input: x})
        w, h = image.size
        dets = []
        for x1, y1, x2, y2, score, cls in self._rows(np.asarray(out), min_score):
            c = int(cls)
            label = self.labels[c] if 0 <= c < len(self.labels) else f"class {c}"
            box = (float(np.clip((x1 - px) / sx, 0, w)), float(np.clip((y1 - py) / sy, 0, h)),
                   float(np.clip((x2 - px) / sx, 0, w)), float(np.clip((y2 - py) / sy, 0, h)))
            dets.append(Detection(label, float(score), box))
        return dets


def centernet(model_path: str | Path | None = None, threads: int = 0) -> OnnxDetector:
    """The default detector: MobileNetV3 CenterNet, 512x512 RGB 0..255 NHWC in, [1, 100, 6] out."""
    return OnnxDetector(
        model_path or centernet_path(), COCO_80, input_size=(512, 512), layout="NHWC", input_scale=1.0,
        resize="stretch", output_format="xyxy_score_class", input_name="tower_0/images",
        output_name="tower_0/detections", threads=threads,
    )


class TorchvisionDetector:
    """A torchvision detection model built without downloading anything, weights from a local file."""

    def __init__(self, arch: str, model_path: str | Path, labels: Sequence[str] = COCO_91, **kwargs: Any) -> None:
        import torch
        import torchvision

        state = torch.load(require_file(model_path, "torchvision detector weights"), map_location="cpu",
                           weights_only=True)
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None,
                                             num_classes=len(labels), **kwargs)
        model.load_state_dict(state)  # strict: a mismatched checkpoint fails loudly
        self._model, self._torch, self.labels = model.eval(), torch, tuple(labels)

    def detect(self, image: Image.Image, min_score: float) -> list[Detection]:
        x = self._torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
        with self._torch.inference_mode():
            (out,) = self._model([x])
        return [
            Detection(self.labels[int(c)] if int(c) < len(self.labels) else f"class {int(c)}", float(s),
                      tuple(float(v) for v in b))
            for b, s, c in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True)
            if s >= min_score
        ]


class UltralyticsDetector:
    """A local YOLO checkpoint through the `ultralytics` package (installed by the user, imported lazily)."""

    def __init__(self, model_path: str | Path, labels: Sequence[str] | None = None) -> None:
        from ultralytics import YOLO

        self._model = YOLO(str(require_file(model_path, "ultralytics weights")))
        names = getattr(self._model, "names", None) or {}
        self.labels = tuple(labels) if labels else tuple(names[i] for i in sorted(names))

    def detect(self, image: Image.Image, min_score: float) -> list[Detection]:
        (result,) = self._model.predict(image, conf=min_score, verbose=False)
        boxes = result.boxes
        return [
            Detection(self.labels[int(c)] if int(c) < len(self.labels) else f"class {int(c)}", float(s),
                      tuple(float(v) for v in b))
            for b, s, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
        ]


def _position(box: Sequence[float], width: int, height: int) -> str:
    """Coarse position of a box's centre on a 3x3 grid: 'left', 'top right', 'bottom centre', ..."""
    cx = (box[0] + box[2]) / 2 / max(width, 1)
    cy = (box[1] + box[3]) / 2 / max(height, 1)
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    return f"{row} {col}" if row else col


def describe_detections(dets: Sequence[Detection], width: int, height: int) -> str:
    """'Objects detected (position, confidence): 3 horses (left 57%, centre 36%, right 66%), 1 person (...)'.

    Groups by label (most confident group first); instances within a group read left to right.
    """
    if not dets:
        return ""
    groups: dict[str, list[Detection]] = defaultdict(list)
    for d in dets:
        groups[d.label].append(d)
    parts = []
    for label, items in sorted(groups.items(), key=lambda kv: -max(d.score for d in kv[1])):
        items.sort(key=lambda d: d.box[0] + d.box[2])
        where = ", ".join(f"{_position(d.box, width, height)} {round(100 * d.score)}%" for d in items)
        parts.append(f"{len(items)} {label if len(items) == 1 else plural(label)} ({where})")
    return "Objects detected (position, confidence): " + ", ".join(parts)


class DetectionExpert:
    """Detector + NMS + text; the backend loads on first use, calls are serialised by a lock."""

    uses_question = False

    def __init__(self, load_backend: Callable[[], DetectorBackend], *, min_score: float = 0.3, iou: float = 0.4,
                 max_objects: int = 20, class_agnostic: bool = True, name: str = "detection") -> None:
        self.name = name
        self._load_backend = load_backend
        self._min_score, self._iou, self._max, self._agnostic = min_score, iou, max_objects, class_agnostic
        self._backend: DetectorBackend | None = None
        self._lock = threading.Lock()

    def warmup(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> DetectorBackend:
        if self._backend is None:
            self._backend = self._load_backend()
        return self._backend

    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections after the score threshold and NMS, most confident first."""
        image = image.convert("RGB")
        with self._lock:
            cands = self._load().detect(image, self._min_score)
        if not cands:
            return []
        boxes = np.array([d.box for d in cands], np.float32)
        scores = np.array([d.score for d in cands], np.float32)
        if self._agnostic:
            keep = nms(boxes, scores, self._iou)
        else:  # offset boxes per label so different labels never overlap
            ids = {label: i for i, label in enumerate(sorted({d.label for d in cands}))}
            offset = np.array([ids[d.label] for d in cands], np.float32)[:, None] * (boxes.max() + 1)
            keep = nms(boxes + offset, scores, self._iou)
        return [cands[i] for i in keep[: self._max]]

    def run(self, image: Image.Image, question: str) -> ExpertResult:
        dets = self.detect(image)
        return ExpertResult(self.name, describe_detections(dets, *image.size), tuple(dets))


def _reject_unknown(kind: str, cfg: Mapping[str, Any], allowed: set[str] = frozenset()) -> None:
    if unknown := set(cfg) - set(allowed):
        raise ValueError(f"unknown options for detection backend {kind!r}: {sorted(unknown)}")


def _backend_loader(cfg: dict[str, Any]) -> Callable[[], DetectorBackend]:
    """Validate the config now (so mistakes surface at startup) and return a loader for later."""
    kind = cfg.pop("backend", "centernet")
    threads = int(cfg.pop("threads", 0))
    if kind == "centernet":
        path = Path(cfg.pop("model_path", None) or centernet_path())
        _reject_unknown(kind, cfg)
        require_file(path, "CenterNet detector (converted ONNX)")
        return lambda: centernet(path, threads)
    if kind == "onnx":
        path = require_file(cfg.pop("model_path"), "ONNX detector")
        labels = resolve_labels(cfg.pop("labels", None))
        _reject_unknown(kind, cfg, set(inspect.signature(OnnxDetector).parameters) - {"model_path", "labels"})
        return lambda: OnnxDetector(path, labels, threads=threads, **cfg)
    if kind == "torchvision":  # remaining keys go to torchvision.models.get_model (e.g. box_score_thresh)
        arch, path = cfg.pop("arch"), cfg.pop("model_path")
        labels = resolve_labels(cfg.pop("labels", None), COCO_91)
        return lambda: TorchvisionDetector(arch, path, labels, **cfg)
    if kind == "ultralytics":
        path, labels = cfg.pop("model_path"), cfg.pop("labels", None)
        _reject_unknown(kind, cfg)
        return lambda: UltralyticsDetector(path, resolve_labels(labels) if labels else None)
    raise ValueError(f"unknown detection backend {kind!r}; choose centernet, onnx, torchvision or ultralytics")


def create(config: Mapping[str, Any] | None = None) -> DetectionExpert:
    """Entry-point factory: `detection = "experts.detection:create"`."""
    cfg = dict(config or {})
    expert_opts = {k: cfg.pop(k) for k in ("min_score", "iou", "max_objects", "class_agnostic", "name") if k in cfg}
    return DetectionExpert(_backend_loader(cfg), **expert_opts)
