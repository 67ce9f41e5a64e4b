"""The TF.js -> ONNX converter against a hand-written TF-semantics reference (numpy + torch).

A small graph exercises every op family CenterNet uses — fused conv/depthwise (SAME, stride 2, bias,
Relu/Relu6), Mean, ResizeBilinear, ConcatV2, MaxPool, Reshape, TopKV2, integer FloorDiv/FloorMod (negative
operands), StridedSlice with shrink, ExpandDims, GatherV2, Cast — plus float16 and uint8 weight quantisation.
The real CenterNet conversion is checked end to end by tests/experts/test_detection.py.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from experts.tfjs_onnx import UnsupportedGraphError, convert_tfjs_graph, load_tfjs_weights, save_atomically


def _s(text: str) -> dict:
    return {"s": base64.b64encode(text.encode()).decode()}


def _ints(*values: int) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


def _node(name, op, inputs=(), **attr) -> dict:
    return {"name": name, "op": op, "input": list(inputs), "attr": attr}


def _build(tmp_path, rng):
    """Write model.json + weights.bin; return the TF.js weights as the reference sees them (dequantised)."""
    w1 = rng.standard_normal((3, 3, 3, 4)).astype(np.float16).astype(np.float32)  # stored as float16
    b1_q = rng.integers(0, 256, 4).astype(np.uint8)  # stored as affine uint8
    b1 = (b1_q.astype(np.float32) * np.float32(0.01) + np.float32(-1.0)).astype(np.float32)
    wd = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
    bd = rng.standard_normal(8).astype(np.float32)
    consts = {  # name -> (array, manifest dtype, quantisation)
        "w1": (w1.astype(np.float16), "float32", {"dtype": "float16"}),
        "b1": (b1_q, "float32", {"dtype": "uint8", "scale": 0.01, "min": -1.0}),
        "wd": (wd, "float32", None), "bd": (bd, "float32", None),
        "mean_axes": (np.array([1, 2], np.int32), "int32", None),
        "size": (np.array([8, 8], np.int32), "int32", None),
        "axis3": (np.array(3, np.int32), "int32", None),
        "flat_shape": (np.array([1, -1], np.int32), "int32", None),
        "minus1": (np.array([-1], np.int32), "int32", None),
        "k": (np.array(5, np.int32), "int32", None),
        "eleven": (np.array(11, np.int32), "int32", None),
        "neg": (np.array([-7, 7, -8, 8], np.int32), "int32", None),
        "three": (np.array(3, np.int32), "int32", None),
        "begin": (np.array([0, 0, 0, 2], np.int32), "int32", None),
        "end": (np.array([0, 0, 0, 3], np.int32), "int32", None),
        "stride": (np.array([1, 1, 1, 1], np.int32), "int32", None),
        "dim": (np.array(-1, np.int32), "int32", None),
        "axis0": (np.array(0, np.int32), "int32", None),
    }
    nhwc = {"data_format": _s("NHWC")}
    nodes = [
        _node("x", "Placeholder", dtype={"type": "DT_FLOAT"},
              shape={"shape": {"dim": [{"size": "1"}, {"size": "8"}, {"size": "8"}, {"size": "3"}]}}),
        *[_node(name, "Const", dtype={"type": "DT_FLOAT"}) for name in consts],
        _node("conv", "_FusedConv2D", ["x", "w1", "b1"], strides=_ints(1, 2, 2, 1), padding=_s("SAME"),
              dilations=_ints(1, 1, 1, 1), fused_ops={"list": {"s": [_s("BiasAdd")["s"], _s("Relu6")["s"]]}},
              num_args={"i": "1"}, **nhwc),
        _node("dw", "FusedDepthwiseConv2dNative", ["conv", "wd", "bd"], strides=_ints(1, 1, 1, 1),
              padding=_s("SAME"), fused_ops={"list": {"s": [_s("BiasAdd")["s"], _s("Relu")["s"]]}}, **nhwc),
        _node("mean", "Mean", ["dw", "mean_axes"], keep_dims={"b": True}),
        _node("mul", "Mul", ["dw", "mean"]),
        _node("up", "ResizeBilinear", ["mul", "size"], align_corners={"b": False}, half_pixel_centers={"b": False}),
        _node("cat", "ConcatV2", ["up", "x", "axis3"]),
        _node("pool", "MaxPool", ["cat"], ksize=_ints(1, 3, 3, 1), strides=_ints(1, 1, 1, 1), padding=_s("SAME"),
              **nhwc),
        _node("flat", "Reshape", ["pool", "flat_shape"]),
        _node("topk", "TopKV2", ["flat", "k"], sorted={"b": True}),
        _node("fd", "FloorDiv", ["topk:1", "eleven"], T={"type": "DT_INT32"}),
        _node("fm", "FloorMod", ["topk:1", "eleven"], T={"type": "DT_INT32"}),
        _node("negdiv", "FloorDiv", ["neg", "three"], T={"type": "DT_INT32"}),
        _node("negmod", "FloorMod", ["neg", "three"], T={"type": "DT_INT32"}),
        _node("fdf", "Cast", ["fd"], SrcT={"type": "DT_INT32"}, DstT={"type": "DT_FLOAT"}),
        _node("ss", "StridedSlice", ["cat", "begin", "end", "stride"], begin_mask={"i": "7"}, end_mask={"i": "7"},
              shrink_axis_mask={"i": "8"}, ellipsis_mask={"i": "0"}, new_axis_mask={"i": "0"}),
        _node("ed", "ExpandDims", ["ss", "dim"]),
        _node("vec", "Reshape", ["pool", "minus1"]),
        _node("idx", "Reshape", ["topk:1", "minus1"]),
        _node("gather", "GatherV2", ["vec", "idx", "axis0"], batch_dims={"i": "0"}),
        _node("dead", "Sigmoid", ["x"]),  # not needed by any output: pruned
    ]
    blob, specs = b"", []
    for name, (arr, dtype, quant) in consts.items():
        spec = {"name": name, "shape": list(arr.shape), "dtype": dtype}
        if quant:
            spec["quantization"] = {**quant, "original_dtype": dtype}
        specs.append(spec)
        blob += np.ascontiguousarray(arr).tobytes()
    half = len(blob) // 2  # two shards, concatenated by the reader
    (tmp_path / "w1.bin").write_bytes(blob[:half])
    (tmp_path / "w2.bin").write_bytes(blob[half:])
    model = {
        "format": "graph-model",
        "signature": {"outputs": {"pool": {"name": "pool", "dtype": "DT_FLOAT", "tensorShape": {
            "dim": [{"size": "1"}, {"size": "8"}, {"size": "8"}, {"size": "11"}]}}}},
        "modelTopology": {"node": nodes[::-1]},  # any order: the converter sorts topologically
        "weightsManifest": [{"paths": ["w1.bin", "w2.bin"], "weights": specs}],
    }
    (tmp_path / "model.json").write_text(json.dumps(model))
    return {"w1": w1, "b1": b1, "wd": wd, "bd": bd}


def _resize_asymmetric(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) on NHWC."""
    _, ih, iw, _ = x.shape

    def axis(o: int, i: int):
        src = np.arange(o) * (i / o)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, i - 1), (src - lo).astype(np.float32)

    y0, y1, fy = axis(oh, ih)
    x0, x1, fx = axis(ow, iw)
    top = x[:, y0][:, :, x0] * (1 - fx)[None, None, :, None] + x[:, y0][:, :, x1] * fx[None, None, :, None]
    bot = x[:, y1][:, :, x0] * (1 - fx)[None, None, :, None] + x[:, y1][:, :, x1] * fx[None, None, :, None]
    return top * (1 - fy)[None, :, None, None] + bot * fy[None, :, None, None]


def _reference(x: np.ndarray, w: dict) -> dict:
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    conv = F.conv2d(F.pad(t, (0, 1, 0, 1)), torch.from_numpy(w["w1"]).permute(3, 2, 0, 1), torch.from_numpy(w["b1"]),
                    stride=2).clamp(0, 6)  # TF SAME, stride 2, 8 -> 4: pad 0 before, 1 after
    wd = torch.from_numpy(w["wd"]).reshape(3, 3, 8).permute(2, 0, 1)[:, None]
    dw = F.relu(F.conv2d(conv, wd, torch.from_numpy(w["bd"]), padding=1, groups=4))
    dw = dw.permute(0, 2, 3, 1).numpy()
    mul = dw * dw.mean(axis=(1, 2), keepdims=True)
    cat = np.concatenate([_resize_asymmetric(mul, 8, 8), x], axis=3)
    pool = F.max_pool2d(torch.from_numpy(cat).permute(0, 3, 1, 2), 3, 1, padding=1).permute(0, 2, 3, 1).numpy()
    flat = pool.reshape(1, -1)
    idx = np.argsort(-flat[0], kind="stable")[:5]
    return {"pool": pool, "topk": flat[0, idx][None], "fd": (idx // 11)[None], "fm": (idx % 11)[None],
            "fdf": (idx // 11)[None].astype(np.float32), "ed": cat[..., 2:3], "gather": flat[0, idx],
            "negdiv": np.array([-3, 2, -3, 2]), "negmod": np.array([2, 1, 1, 2])}


def test_converted_graph_matches_tf_semantics(tmp_path):
    rng = np.random.default_rng(0)
    weights = _build(tmp_path, rng)
    loaded = load_tfjs_weights(json.loads((tmp_path / "model.json").read_text()), tmp_path)
    np.testing.assert_array_equal(loaded["w1"], weights["w1"])
    np.testing.assert_allclose(loaded["b1"], weights["b1"], rtol=1e-6)

    outputs = ["pool", "topk", "fd", "fm", "fdf", "ed", "gather", "negdiv", "negmod"]
    model = convert_tfjs_graph(tmp_path / "model.json", outputs)
    assert not any(n.name.startswith("dead") or "dead" in n.output for n in model.graph.node)
    path = save_atomically(model, tmp_path / "out" / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    x = (rng.random((1, 8, 8, 3)) * 4 - 1).astype(np.float32)
    got = dict(zip(outputs, session.run(outputs, {"x": x}), strict=True))
    want = _reference(x, weights)
    for name in outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert got["fd"].dtype == np.int32  # TF's index dtype is kept


def test_unsupported_ops_are_named(tmp_path):
    model = {"format": "graph-model", "modelTopology": {"node": [
        _node("x", "Placeholder", dtype={"type": "DT_FLOAT"}, shape={"shape": {"dim": [{"size": "2"}]}}),
        _node("y", "Softplus", ["x"]),
    ]}, "weightsManifest": []}
    (tmp_path / "model.json").write_text(json.dumps(model))
    with pytest.raises(UnsupportedGraphError, match="op Softplus"):
        convert_tfjs_graph(tmp_path / "model.json", ["y"])
