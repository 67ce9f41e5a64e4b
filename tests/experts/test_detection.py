"""Object detection: the converted CenterNet on real photos, NMS, the text, and the pluggable backends."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from experts import detection
from experts.base import Detection
from experts.coco import COCO_80, COCO_91, plural
from tests.experts.conftest import load_image


@pytest.fixture(scope="module")
def centernet_expert(centernet_file):
    expert = detection.create({"backend": "centernet", "model_path": str(centernet_file)})
    expert.warmup()
    return expert


def _labels(dets):
    return [d.label for d in dets]


def test_finds_the_dog_in_dog_jpg(centernet_expert):
    image = load_image("dog.jpg")
    dets = centernet_expert.detect(image)
    assert "dog" in _labels(dets)
    assert "bicycle" in _labels(dets)
    # The published results of this model on this photo: car 0.56, bicycle 0.51, dog 0.42.
    scores = {d.label: d.score for d in dets}
    assert scores["dog"] == pytest.approx(0.42, abs=0.02)
    assert scores["bicycle"] == pytest.approx(0.51, abs=0.02)
    dog = next(d for d in dets if d.label == "dog")
    x1, y1, x2, y2 = dog.box  # the dog sits in the lower left of the 768x576 photo
    assert 0 <= x1 < x2 <= image.width / 2 and image.height / 3 < y2 <= image.height


def test_finds_the_horses_in_horses_jpg(centernet_expert):
    result = centernet_expert.run(load_image("horses.jpg"), "")
    horses = [d for d in result.data if d.label == "horse"]
    assert len(horses) == 3
    assert result.text.startswith("Objects detected (position, confidence): 3 horses (left ")
    positions = result.text.split("3 horses (")[1].split(")")[0]
    assert [p.rsplit(" ", 1)[0] for p in positions.split(", ")] == ["left", "centre", "right"]


def test_giraffe_and_zebra(centernet_expert):
    labels = _labels(centernet_expert.detect(load_image("giraffe.jpg")))
    assert labels[:2] == ["zebra", "giraffe"]


def test_text_only_image_has_no_objects(centernet_expert):
    result = centernet_expert.run(load_image("text.png"), "")
    assert result.data == () and result.text == ""


def test_missing_model_fails_at_creation_with_setup_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup-experts.sh"):
        detection.create({"backend": "centernet", "model_path": str(tmp_path / "absent.onnx")})


def test_unknown_options_are_rejected(centernet_file):
    with pytest.raises(ValueError, match="unknown options"):
        detection.create({"backend": "centernet", "modle_path": "typo"})
    with pytest.raises(ValueError, match="unknown detection backend"):
        detection.create({"backend": "darknet"})


def test_nms_class_agnostic_and_per_class():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert detection.nms(boxes, scores, 0.4) == [0, 2]
    assert detection.nms(boxes, scores, 0.95) == [0, 1, 2]

    class Fixed:
        def detect(self, image, min_score):
            return [Detection("car", 0.9, (0, 0, 10, 10)), Detection("truck", 0.8, (1, 1, 10, 10))]

    image = Image.new("RGB", (100, 100))
    agnostic = detection.DetectionExpert(Fixed)
    per_class = detection.DetectionExpert(Fixed, class_agnostic=False)
    assert _labels(agnostic.detect(image)) == ["car"]
    assert _labels(per_class.detect(image)) == ["car", "truck"]


def test_describe_detections_counts_positions_and_plurals():
    dets = [
        Detection("person", 0.75, (250, 10, 290, 90)),
        Detection("horse", 0.66, (200, 40, 280, 60)),
        Detection("horse", 0.9, (0, 40, 60, 60)),
    ]
    text = detection.describe_detections(dets, 300, 100)
    assert text == (
        "Objects detected (position, confidence): 2 horses (left 90%, right 66%), 1 person (right 75%)"
    )
    assert detection.describe_detections([Detection("dog", 0.5, (0, 0, 10, 10))], 300, 300) == (
        "Objects detected (position, confidence): 1 dog (top left 50%)"
    )
    assert detection.describe_detections([], 10, 10) == ""
    assert [plural(x) for x in ("person", "bus", "knife", "wine glass", "sheep", "toothbrush")] == [
        "people", "buses", "knives", "wine glasses", "sheep", "toothbrushes"]
    assert len(COCO_80) == 80 and len(COCO_91) == 91


def _constant_onnx(path, output: np.ndarray, input_shape) -> None:
    """An ONNX 'detector' that ignores its input and returns `output` (tests the output contracts)."""
    graph = helper.make_graph(
        [helper.make_node("Shape", ["images"], ["shape"]), helper.make_node("Identity", ["const"], ["out"])],
        "constant", [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(output.shape))],
        initializer=[numpy_helper.from_array(output.astype(np.float32), "const")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)


def test_onnx_backend_xyxy_format_maps_boxes_back_through_stretch(tmp_path):
    rows = np.array([[[100, 50, 200, 150, 0.9, 16], [0, 0, 10, 10, 0.1, 2]]], np.float32)  # [1, N, 6]
    _constant_onnx(tmp_path / "det.onnx", rows, [1, 256, 256, 3])
    expert = detection.create({
        "backend": "onnx", "model_path": str(tmp_path / "det.onnx"), "output_format": "xyxy_score_class",
        "input_size": [256, 256], "layout": "NHWC", "input_scale": 1.0, "resize": "stretch",
    })
    (det,) = expert.detect(Image.new("RGB", (512, 1024)))  # x scaled by 2, y by 4
    assert det.label == "dog" and det.score == pytest.approx(0.9)
    assert det.box == pytest.approx((200, 200, 400, 600))


def test_onnx_backend_yolov8_format_with_letterbox(tmp_path):
    pred = np.zeros((1, 4 + 80, 3), np.float32)  # 3 anchors: cx, cy, w, h, 80 class scores
    pred[0, :4, 0] = [320, 320, 64, 32]
    pred[0, 4 + 17, 0] = 0.8  # horse
    pred[0, :4, 1] = [322, 321, 64, 32]
    pred[0, 4 + 17, 1] = 0.7  # the same horse again: removed by NMS
    pred[0, 4 + 0, 2] = 0.05  # below the threshold
    _constant_onnx(tmp_path / "yolo.onnx", pred, [1, 3, 640, 640])
    expert = detection.create({"backend": "onnx", "model_path": str(tmp_path / "yolo.onnx"), "labels": "coco80"})
    # 1280x640 image -> scale 0.5, resized 640x320, padded 160 px at the top.
    (det,) = expert.detect(Image.new("RGB", (1280, 640)))
    assert det.label == "horse" and det.score == pytest.approx(0.8)
    assert det.box == pytest.approx(((320 - 32) * 2, (320 - 16 - 160) * 2, (320 + 32) * 2, (320 + 16 - 160) * 2))


@pytest.mark.slow
def test_torchvision_backend_loads_local_weights_lazily(tmp_path):
    torch = pytest.importorskip("torch")  # a dependency of the project: present in CI
    import torchvision

    model = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         num_classes=91)
    torch.save(model.state_dict(), tmp_path / "ssd.pt")
    expert = detection.create({"backend": "torchvision", "arch": "ssdlite320_mobilenet_v3_large",
                               "model_path": str(tmp_path / "ssd.pt"), "min_score": 0.0,
                               "score_thresh": 0.0, "topk_candidates": 2})  # keyword args for get_model
    dets = expert.detect(load_image("dog.jpg"))  # random weights: only the wiring is checked
    assert dets and all(d.label in COCO_91 and 0 <= d.box[0] <= d.box[2] <= 768 for d in dets)

    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pt")
    bad = detection.create({"backend": "torchvision", "arch": "ssdlite320_mobilenet_v3_large",
                            "model_path": str(tmp_path / "bad.pt")})
    with pytest.raises(RuntimeError, match="state_dict"):
        bad.warmup()


def test_ultralytics_backend_adapts_results(monkeypatch, tmp_path):
    weights = tmp_path / "yolo.pt"
    weights.write_bytes(b"stub")

    class Boxes:
        xyxy = np.array([[10.0, 20.0, 30.0, 40.0]])
        conf = np.array([0.77])
        cls = np.array([1.0])

    class YOLO:  # the slice of ultralytics' API the backend uses
        names = {0: "cat", 1: "dog"}

        def __init__(self, path):
            assert path == str(weights)

        def predict(self, image, conf, verbose):
            assert conf == 0.3
            return [types.SimpleNamespace(boxes=Boxes())]

    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=YOLO))
    expert = detection.create({"backend": "ultralytics", "model_path": str(weights)})
    assert expert.detect(Image.new("RGB", (64, 64))) == [Detection("dog", 0.77, (10.0, 20.0, 30.0, 40.0))]
