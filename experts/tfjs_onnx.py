"""Convert a TensorFlow.js graph model (model.json + weight shards) to ONNX, without TensorFlow.

Owns the weights-manifest reader (float32/int32/bool, float16 and affine uint8/uint16 quantisation) and
a one-to-one translation of the graph's ops into ONNX nodes built with the `onnx` package's helpers.
TF's fused ops (`_FusedConv2D`, `FusedDepthwiseConv2dNative`) are un-fused into conv + bias + activation.

Layout: TF graphs are NHWC and ONNX convolutions are NCHW, so every spatial op (conv, pool, resize) is
wrapped in a pair of Transposes and all other ops keep TF's NHWC semantics unchanged (axes, reshapes and
slices need no rewriting). onnxruntime's transpose optimiser cancels the back-to-back pairs when a session
is created, so the wrapping costs nothing at run time.

It runs once, at setup (`scripts/setup-experts.sh`):
    python -m experts.tfjs_onnx package/models/centernet.json centernet.onnx
Unsupported ops fail the conversion with the op's name; nothing is silently skipped.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 8  # the lowest IR that carries opset 18: loads in any onnxruntime >= 1.14

_TF_DTYPES = {
    "DT_FLOAT": (np.float32, TensorProto.FLOAT),
    "DT_INT32": (np.int32, TensorProto.INT32),
    "DT_INT64": (np.int64, TensorProto.INT64),
    "DT_BOOL": (np.bool_, TensorProto.BOOL),
}
_MANIFEST_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_NCHW = (0, 3, 1, 2)
_NHWC = (0, 2, 3, 1)
_INT64_MAX = np.iinfo(np.int64).max


class UnsupportedGraphError(ValueError):
    """The TF.js graph uses an op or attribute this converter does not translate."""


def load_tfjs_weights(model_json: dict, base_dir: Path) -> dict[str, np.ndarray]:
    """Read every weight listed in the manifest; shards of one group are concatenated in order."""
    weights: dict[str, np.ndarray] = {}
    for group in model_json["weightsManifest"]:
        buf = b"".join((base_dir / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(s) for s in spec["shape"]]
            n = math.prod(shape)
            quant = spec.get("quantization")
            if quant is None:
                dtype = np.dtype(_MANIFEST_DTYPES[spec["dtype"]])
                arr = np.frombuffer(buf, dtype, n, offset)
            elif quant["dtype"] == "float16":
                dtype = np.dtype(np.float16)
                arr = np.frombuffer(buf, dtype, n, offset).astype(np.float32)
            elif quant["dtype"] in ("uint8", "uint16"):
                dtype = np.dtype(quant["dtype"])
                raw = np.frombuffer(buf, dtype, n, offset).astype(np.float32)
                arr = raw * np.float32(quant["scale"]) + np.float32(quant["min"])
                arr = arr.astype(_MANIFEST_DTYPES[spec["dtype"]])
            else:
                raise UnsupportedGraphError(f"weight {spec['name']}: quantisation {quant['dtype']!r}")
            offset += n * dtype.itemsize
            weights[spec["name"]] = arr.reshape(shape).copy()
        if offset != len(buf):
            raise ValueError(f"weights manifest describes {offset} bytes but the shards hold {len(buf)}")
    return weights


def _attr(node: dict, key: str, default=None):
    """Decode one TF attr value: int / float / bool / string / type / list of ints or strings."""
    value = node.get("attr", {}).get(key)
    if value is None:
        return default
    if "list" in value:
        lst = value["list"]
        if "i" in lst:
            return [int(i) for i in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(s).decode() for s in lst["s"]]
        return []
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "type" in value:
        return value["type"]
    return default


def _split_ref(ref: str) -> tuple[str, int]:
    """'node:1' -> ('node', 1); 'node' -> ('node', 0)."""
    name, _, index = ref.partition(":")
    return name, int(index) if index else 0


def _tensor_name(ref: str) -> str:
    name, index = _split_ref(ref)
    return name if index == 0 else f"{name}:{index}"


class _Converter:
    """Walks the TF nodes in topological order and emits ONNX nodes; one instance per conversion."""

    def __init__(self, nodes: list[dict], weights: dict[str, np.ndarray]) -> None:
        self.nodes = {n["name"]: n for n in nodes}
        self.weights = weights
        self.onnx_nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self._counter = 0
        self._handlers: dict[str, Callable[[dict, list[str]], None]] = {
            "Placeholder": self._placeholder,
            "Const": lambda node, refs: None,
            "Identity": self._unary("Identity"),
            "Relu": self._unary("Relu"),
            "Sigmoid": self._unary("Sigmoid"),
            "Tanh": self._unary("Tanh"),
            "Exp": self._unary("Exp"),
            "Sqrt": self._unary("Sqrt"),
            "Relu6": self._relu6,
            "Add": self._binary("Add"),
            "AddV2": self._binary("Add"),
            "BiasAdd": self._binary("Add"),
            "Sub": self._binary("Sub"),
            "Mul": self._binary("Mul"),
            "RealDiv": self._binary("Div"),
            "Maximum": self._binary("Max"),
            "Minimum": self._binary("Min"),
            "Equal": self._binary("Equal"),
            "FloorDiv": self._floordiv,
            "FloorMod": self._floormod,
            "Cast": self._cast,
            "Conv2D": self._conv,
            "_FusedConv2D": self._conv,
            "DepthwiseConv2dNative": self._conv,
            "FusedDepthwiseConv2dNative": self._conv,
            "MaxPool": self._maxpool,
            "Mean": self._mean,
            "ResizeBilinear": self._resize_bilinear,
            "ConcatV2": self._concat,
            "Reshape": self._reshape,
            "ExpandDims": self._expand_dims,
            "GatherV2": self._gather,
            "StridedSlice": self._strided_slice,
            "TopKV2": self._topk,
        }

    # ---- helpers -------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}__{self._counter}"

    def emit(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs) -> None:
        self.onnx_nodes.append(helper.make_node(op, list(inputs), list(outputs), **attrs))

    def initializer(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def const_value(self, ref: str) -> np.ndarray:
        """The value of a TF Const input (shapes, axes, weights are static in these graphs)."""
        name, _ = _split_ref(ref)
        node = self.nodes.get(name)
        if node is None or node["op"] != "Const" or name not in self.weights:
            raise UnsupportedGraphError(f"expected a constant input, got {ref!r}")
        return self.weights[name]

    def tensor(self, ref: str) -> str:
        """The ONNX tensor for a TF input; constants become initializers on first use."""
        name, _ = _split_ref(ref)
        if self.nodes.get(name, {}).get("op") == "Const":
            return self.initializer(name, self.const_value(ref))
        return _tensor_name(ref)

    def _nchw_wrap(self, node: dict, x: str, build: Callable[[str], str]) -> None:
        """Transpose NHWC->NCHW, run `build` (returns its NCHW output), transpose back to the node's name."""
        t_in = self.fresh(node["name"] + "/nchw")
        self.emit("Transpose", [x], [t_in], perm=list(_NCHW))
        self.emit("Transpose", [build(t_in)], [node["name"]], perm=list(_NHWC))

    @staticmethod
    def _check_nhwc(node: dict) -> None:
        if _attr(node, "data_format", "NHWC") != "NHWC":
            raise UnsupportedGraphError(f"{node['name']}: data_format {_attr(node, 'data_format')}")

    @staticmethod
    def _auto_pad(node: dict) -> str:
        padding = _attr(node, "padding", "VALID")
        if padding == "SAME":
            return "SAME_UPPER"  # TF puts the odd extra pad at the end, as SAME_UPPER does
        if padding == "VALID":
            return "VALID"
        raise UnsupportedGraphError(f"{node['name']}: padding {padding}")

    # ---- op handlers ---------------------------------------------------------------------------------
    def _placeholder(self, node: dict, refs: list[str]) -> None:
        dims = node["attr"]["shape"]["shape"].get("dim", [])
        shape = [int(d["size"]) if int(d["size"]) >= 0 else None for d in dims]
        elem = _TF_DTYPES[_attr(node, "dtype", "DT_FLOAT")][1]
        self.inputs.append(helper.make_tensor_value_info(node["name"], elem, shape))

    def _unary(self, op: str) -> Callable[[dict, list[str]], None]:
        def handler(node: dict, refs: list[str]) -> None:
            self.emit(op, [self.tensor(refs[0])], [node["name"]])

        return handler

    def _binary(self, op: str) -> Callable[[dict, list[str]], None]:
        def handler(node: dict, refs: list[str]) -> None:
            self.emit(op, [self.tensor(refs[0]), self.tensor(refs[1])], [node["name"]])

        return handler

    def _relu6(self, node: dict, refs: list[str]) -> None:
        self._emit_relu6(self.tensor(refs[0]), node["name"])

    def _emit_relu6(self, x: str, out: str) -> None:
        lo = self.initializer("relu6/min", np.float32(0.0))
        hi = self.initializer("relu6/max", np.float32(6.0))
        self.emit("Clip", [x, lo, hi], [out])

    def _floordiv(self, node: dict, refs: list[str]) -> None:
        a, b = self.tensor(refs[0]), self.tensor(refs[1])
        if _attr(node, "T") == "DT_FLOAT":
            q = self.fresh(node["name"] + "/div")
            self.emit("Div", [a, b], [q])
            self.emit("Floor", [q], [node["name"]])
            return
        # Integers: (a - floormod(a, b)) is an exact multiple of b, so truncating Div floors correctly.
        m, d = self.fresh(node["name"] + "/mod"), self.fresh(node["name"] + "/sub")
        self.emit("Mod", [a, b], [m], fmod=0)
        self.emit("Sub", [a, m], [d])
        self.emit("Div", [d, b], [node["name"]])

    def _floormod(self, node: dict, refs: list[str]) -> None:
        a, b = self.tensor(refs[0]), self.tensor(refs[1])
        if _attr(node, "T") != "DT_FLOAT":
            self.emit("Mod", [a, b], [node["name"]], fmod=0)  # fmod=0: sign of the divisor, like TF
            return
        q, f, p = (self.fresh(node["name"] + s) for s in ("/div", "/floor", "/mul"))
        self.emit("Div", [a, b], [q])
        self.emit("Floor", [q], [f])
        self.emit("Mul", [f, b], [p])
        self.emit("Sub", [a, p], [node["name"]])

    def _cast(self, node: dict, refs: list[str]) -> None:
        to = _TF_DTYPES[_attr(node, "DstT")][1]
        self.emit("Cast", [self.tensor(refs[0])], [node["name"]], to=to)

    def _conv(self, node: dict, refs: list[str]) -> None:
        """Conv2D / depthwise, plain or fused with BiasAdd and an activation."""
        self._check_nhwc(node)
        name, op = node["name"], node["op"]
        w = self.const_value(refs[1]).astype(np.float32)
        depthwise = "Depthwise" in op
        if depthwise:  # TF [kh, kw, C, M] -> ONNX [C*M, 1, kh, kw], output channel c*M + m as in TF
            kh, kw, c, m = w.shape
            w_onnx, group = w.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None], c
        else:  # TF [kh, kw, Cin, Cout] -> ONNX [Cout, Cin, kh, kw]
            w_onnx, group = w.transpose(3, 2, 0, 1), 1
        inputs = [self.initializer(name + "/W", np.ascontiguousarray(w_onnx))]

        fused = _attr(node, "fused_ops", []) if op.startswith(("_Fused", "Fused")) else []
        activation = None
        if fused:
            if fused[0] != "BiasAdd" or len(fused) > 2:
                raise UnsupportedGraphError(f"{name}: fused ops {fused}")
            inputs.append(self.initializer(name + "/B", self.const_value(refs[2]).astype(np.float32)))
            activation = fused[1] if len(fused) == 2 else None
            if activation not in (None, "Relu", "Relu6"):
                raise UnsupportedGraphError(f"{name}: fused activation {activation}")

        sh, sw = _attr(node, "strides", [1, 1, 1, 1])[1:3]
        dh, dw = _attr(node, "dilations", [1, 1, 1, 1])[1:3]

        def build(x: str) -> str:
            conv = self.fresh(name + "/conv")
            self.emit(
                "Conv", [x, *inputs], [conv], strides=[sh, sw], dilations=[dh, dw], group=group,
                kernel_shape=list(w_onnx.shape[2:]), auto_pad=self._auto_pad(node),
            )
            if activation is None:
                return conv
            act = self.fresh(name + "/act")
            if activation == "Relu":
                self.emit("Relu", [conv], [act])
            else:
                self._emit_relu6(conv, act)
            return act

        self._nchw_wrap(node, self.tensor(refs[0]), build)

    def _maxpool(self, node: dict, refs: list[str]) -> None:
        self._check_nhwc(node)
        kh, kw = _attr(node, "ksize")[1:3]
        sh, sw = _attr(node, "strides")[1:3]

        def build(x: str) -> str:
            out = self.fresh(node["name"] + "/pool")
            self.emit("MaxPool", [x], [out], kernel_shape=[kh, kw], strides=[sh, sw],
                      auto_pad=self._auto_pad(node))
            return out

        self._nchw_wrap(node, self.tensor(refs[0]), build)

    def _mean(self, node: dict, refs: list[str]) -> None:
        axes = np.atleast_1d(self.const_value(refs[1])).astype(np.int64)
        axes_name = self.initializer(node["name"] + "/axes", axes)
        keep = 1 if _attr(node, "keep_dims", False) else 0
        self.emit("ReduceMean", [self.tensor(refs[0]), axes_name], [node["name"]], keepdims=keep)

    def _resize_bilinear(self, node: dict, refs: list[str]) -> None:
        size = self.const_value(refs[1]).astype(np.int64)
        if _attr(node, "align_corners", False):
            mode = "align_corners"
        elif _attr(node, "half_pixel_centers", False):
            mode = "half_pixel"
        else:
            mode = "asymmetric"  # TF1's default: src = dst * in / out
        sizes = self.initializer(node["name"] + "/sizes", size)

        def build(x: str) -> str:
            out = self.fresh(node["name"] + "/resize")
            self.emit("Resize", [x, "", "", sizes], [out], mode="linear", axes=[2, 3],
                      coordinate_transformation_mode=mode)
            return out

        self._nchw_wrap(node, self.tensor(refs[0]), build)

    def _concat(self, node: dict, refs: list[str]) -> None:
        axis = int(self.const_value(refs[-1]))
        self.emit("Concat", [self.tensor(r) for r in refs[:-1]], [node["name"]], axis=axis)

    def _reshape(self, node: dict, refs: list[str]) -> None:
        shape = self.initializer(node["name"] + "/shape", self.const_value(refs[1]).astype(np.int64))
        self.emit("Reshape", [self.tensor(refs[0]), shape], [node["name"]])

    def _expand_dims(self, node: dict, refs: list[str]) -> None:
        axes = np.atleast_1d(self.const_value(refs[1])).astype(np.int64)
        axes_name = self.initializer(node["name"] + "/axes", axes)
        self.emit("Unsqueeze", [self.tensor(refs[0]), axes_name], [node["name"]])

    def _gather(self, node: dict, refs: list[str]) -> None:
        if _attr(node, "batch_dims", 0) != 0:
            raise UnsupportedGraphError(f"{node['name']}: GatherV2 with batch_dims")
        axis = int(self.const_value(refs[2]))
        self.emit("Gather", [self.tensor(refs[0]), self.tensor(refs[1])], [node["name"]], axis=axis)

    def _strided_slice(self, node: dict, refs: list[str]) -> None:
        name = node["name"]
        if _attr(node, "ellipsis_mask", 0) or _attr(node, "new_axis_mask", 0):
            raise UnsupportedGraphError(f"{name}: StridedSlice with ellipsis or new-axis masks")
        begin, end, steps = (self.const_value(r).astype(np.int64) for r in refs[1:4])
        begin_mask, end_mask = _attr(node, "begin_mask", 0), _attr(node, "end_mask", 0)
        shrink = _attr(node, "shrink_axis_mask", 0)
        starts, ends, shrink_axes = [], [], []
        for i, (b, e, s) in enumerate(zip(begin, end, steps, strict=True)):
            full_start = _INT64_MAX if s < 0 else 0
            full_end = -_INT64_MAX if s < 0 else _INT64_MAX
            if shrink >> i & 1:
                starts.append(b)
                ends.append(_INT64_MAX if b == -1 else b + 1)
                shrink_axes.append(i)
                continue
            starts.append(full_start if begin_mask >> i & 1 else b)
            ends.append(full_end if end_mask >> i & 1 else e)
        args = [
            self.tensor(refs[0]),
            self.initializer(name + "/starts", np.array(starts, np.int64)),
            self.initializer(name + "/ends", np.array(ends, np.int64)),
            self.initializer(name + "/axes", np.arange(len(starts), dtype=np.int64)),
            self.initializer(name + "/steps", np.array(steps, np.int64)),
        ]
        if not shrink_axes:
            self.emit("Slice", args, [name])
            return
        sliced = self.fresh(name + "/slice")
        self.emit("Slice", args, [sliced])
        squeeze_axes = self.initializer(name + "/squeeze", np.array(shrink_axes, np.int64))
        self.emit("Squeeze", [sliced, squeeze_axes], [name])

    def _topk(self, node: dict, refs: list[str]) -> None:
        k = self.initializer(node["name"] + "/k", np.atleast_1d(self.const_value(refs[1])).astype(np.int64))
        indices = self.fresh(node["name"] + "/indices")
        self.emit("TopK", [self.tensor(refs[0]), k], [node["name"], indices], axis=-1, largest=1,
                  sorted=1 if _attr(node, "sorted", True) else 0)
        self.emit("Cast", [indices], [node["name"] + ":1"], to=TensorProto.INT32)  # TF indices are int32

    # ---- driver --------------------------------------------------------------------------------------
    def topological_order(self) -> list[dict]:
        order, state = [], {}

        def visit(name: str) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                raise UnsupportedGraphError(f"cycle through {name}")
            state[name] = 1
            for ref in self.nodes[name].get("input", []):
                if not ref.startswith("^"):
                    visit(_split_ref(ref)[0])
            state[name] = 2
            order.append(self.nodes[name])

        for name in self.nodes:
            visit(name)
        return order

    def convert(self, outputs: dict[str, tuple[int, list[int | None] | None]]) -> onnx.ModelProto:
        """`outputs` maps each output to its element type and shape (None: left to shape inference)."""
        for node in self.topological_order():
            handler = self._handlers.get(node["op"])
            if handler is None:
                raise UnsupportedGraphError(f"op {node['op']} (node {node['name']}) is not supported")
            handler(node, [r for r in node.get("input", []) if not r.startswith("^")])
        graph = helper.make_graph(
            self.onnx_nodes, "tfjs_graph", self.inputs,
            [helper.make_tensor_value_info(_tensor_name(name), elem, shape or [])
             for name, (elem, shape) in outputs.items()],
            initializer=list(self.initializers.values()),
        )
        unknown = [_tensor_name(name) for name, (_, shape) in outputs.items() if shape is None]
        if unknown:  # an output outside the signature: take its shape from ONNX shape inference
            graph.ClearField("output")
            inferred = onnx.shape_inference.infer_shapes(helper.make_model(
                helper.make_graph(self.onnx_nodes, "g", self.inputs, [], list(self.initializers.values())),
                opset_imports=[helper.make_opsetid("", OPSET)]))
            known = {v.name: v for v in inferred.graph.value_info}
            for name, (elem, shape) in outputs.items():
                tensor = _tensor_name(name)
                graph.output.append(known[tensor] if shape is None else
                                    helper.make_tensor_value_info(tensor, elem, shape))
        model = helper.make_model(graph, producer_name="lamina.experts.tfjs_onnx",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _prune(nodes: list[dict], outputs: Sequence[str]) -> list[dict]:
    """Keep only the nodes the requested outputs depend on."""
    by_name = {n["name"]: n for n in nodes}
    keep, stack = set(), [_split_ref(o)[0] for o in outputs]
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        if name not in by_name:
            raise UnsupportedGraphError(f"output or input {name!r} is not a node of the graph")
        keep.add(name)
        stack.extend(_split_ref(r.lstrip("^"))[0] for r in by_name[name].get("input", []))
    return [n for n in nodes if n["name"] in keep]


def convert_tfjs_graph(model_json_path: str | os.PathLike, outputs: Sequence[str] | None = None) -> onnx.ModelProto:
    """Translate a TF.js graph model to an ONNX ModelProto (outputs default to the model's signature)."""
    path = Path(model_json_path)
    model_json = json.loads(path.read_text())
    if model_json.get("format") != "graph-model":
        raise UnsupportedGraphError(f"{path}: format {model_json.get('format')!r}, expected 'graph-model'")
    weights = load_tfjs_weights(model_json, path.parent)
    signature = model_json.get("signature", {}).get("outputs", {})
    if outputs is None:
        outputs = [spec["name"] for spec in signature.values()]
        if not outputs:
            raise UnsupportedGraphError(f"{path}: no signature outputs; name the outputs to convert")
    out_types = {}
    for name in outputs:
        spec = next((s for s in signature.values() if s["name"] == name), None)
        if spec is None:
            out_types[name] = (TensorProto.FLOAT, None)
            continue
        dims = spec.get("tensorShape", {}).get("dim", [])
        shape = [int(d["size"]) if int(d["size"]) >= 0 else None for d in dims]
        out_types[name] = (_TF_DTYPES[spec.get("dtype", "DT_FLOAT")][1], shape)
    nodes = _prune(model_json["modelTopology"]["node"], outputs)
    return _Converter(nodes, weights).convert(out_types)


def save_atomically(model: onnx.ModelProto, out_path: str | os.PathLike) -> Path:
    """Write next to the destination, then rename: a half-written file never looks like a finished one."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    onnx.save(model, tmp)
    os.replace(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_json", help="the TF.js model.json (weight shards beside it)")
    parser.add_argument("out", help="where to write the .onnx file")
    parser.add_argument("--output", action="append", help="graph output to keep (default: the signature's)")
    args = parser.parse_args(argv)
    model = convert_tfjs_graph(args.model_json, args.output)
    out = save_atomically(model, args.out)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(model.graph.node)} ONNX nodes)")


if __name__ == "__main__":
    main()
