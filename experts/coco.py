"""COCO class names, in the two index orders detectors use, and their English plurals.

`COCO_91` is the original 91-id category list (with "N/A" gaps and a background slot) that torchvision's
detectors index; `COCO_80` is the contiguous 80-class order that CenterNet, YOLO and most ONNX exports use.
"""

from __future__ import annotations

COCO_91: tuple[str, ...] = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

COCO_80: tuple[str, ...] = tuple(c for c in COCO_91 if c not in ("__background__", "N/A"))

_IRREGULAR = {
    "person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
    "scissors": "scissors", "hair drier": "hair driers", "tv": "TVs", "broccoli": "broccoli",
}


def plural(label: str) -> str:
    """English plural of a class name ("horse" -> "horses", "bus" -> "buses", "person" -> "people")."""
    if label in _IRREGULAR:
        return _IRREGULAR[label]
    head, sep, last = label.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return head + sep + last


assert len(COCO_80) == 80
