"""Q/DQ placement lint for TensorRT INT8 graphs, after TensorRT's explicit-quantization guide
("Q/DQ Layer-Placement Recommendations", https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
quantized-types-explicit-quantization.html): quantize all inputs of weighted operations (Convolution,
Deconvolution, GEMM) and not their outputs; weights per output channel; quantize the residual input
of an Add that follows a weighted layer so TensorRT fuses it into the layer; scales positive.

Also from the parser's rules: a quantized type (INT8, INT4, FP8, FP4) exists only between a
QuantizeLinear (or a quantized initializer) and DequantizeLinear; UINT8 only as network I/O.
"""

from __future__ import annotations

import numpy as np
import onnx

from engines.trt_build.compat.findings import CHECK, REFUSED, Finding
from engines.trt_build.compat.graph import GraphIndex, attr
from engines.trt_build.compat.rules import finding
from engines.trt_build.compat.table import QUANTIZED, TYPE_NAMES

WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> weight input
# Where a DequantizeLinear's output may go and TensorRT still runs INT8: into a weighted layer, or through
# ops it commutes Q/DQ across (data movement, max-pooling, monotonic activations) to one.
INT8_CONSUMERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool",
                  "GlobalMaxPool", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                  "Split", "Pad", "Resize", "Relu", "LeakyRelu", "Clip", "Identity", "Gather", "Mul"}


def type_findings(index: GraphIndex) -> list[Finding]:
    """UINT8 tensors only at network I/O; quantized tensors only into DequantizeLinear."""
    found = []
    for node in index.nodes:
        for name in node.output:
            kind = TYPE_NAMES.get(index.types.get(name, 0))
            if kind == "UINT8" and name not in index.outputs:
                hint = ("quantize to signed INT8 with zero point 0 (the trt INT8 form; UINT8 is ONNX Runtime's)"
                        if node.op_type == "QuantizeLinear" else "cast to float or int32 right after the input")
                found.append(
                    finding(
                        node,
                        "uint8",
                        REFUSED,
                        f"{name} is UINT8 inside the network; TensorRT takes UINT8 only as a network input or output",
                        hint,
                    )
                )
            if kind in QUANTIZED and node.op_type != "QuantizeLinear":
                found.append(finding(node, "quantized-type", REFUSED, f"{name} is {kind} produced by {node.op_type}; "
                                "TensorRT makes quantized tensors only with QuantizeLinear",
                                "express the quantization as QuantizeLinear/DequantizeLinear (the trt INT8 form)"))
        for k, name in enumerate(node.input):
            kind = TYPE_NAMES.get(index.types.get(name, 0))
            zero_point = k == 2 and node.op_type == "QuantizeLinear"  # its type is the output's
            if kind in QUANTIZED and node.op_type != "DequantizeLinear" and not zero_point:
                found.append(
                    finding(
                        node,
                        "quantized-type",
                        REFUSED,
                        f"{node.op_type} reads {kind} tensor {name}; TensorRT "
                        "reads quantized tensors only through DequantizeLinear",
                        "insert a DequantizeLinear before it (the trt INT8 form)",
                    )
                )
    return found


def placement_findings(index: GraphIndex) -> list[Finding]:
    if not any(n.op_type == "DequantizeLinear" for n in index.nodes):
        return []
    found = []
    for node in index.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found += _scale(node, index)
        if node.op_type in WEIGHTED and len(node.input) > WEIGHTED[node.op_type]:
            found += _weighted(node, index)
        if node.op_type == "Add":
            found += _residual(node, index)
        if node.op_type == "DequantizeLinear" and not _weight_dq(node, index):
            stray = [c for c in index.consumers.get(node.output[0], []) if c.op_type not in INT8_CONSUMERS]
            if stray:
                found.append(
                    finding(
                        node,
                        "qdq-placement",
                        CHECK,
                        f"dequantized into {', '.join(sorted({c.op_type for c in stray}))}, "
                        "which TensorRT neither runs in INT8 nor moves Q/DQ across: the Q/DQ pair runs on its own",
                        "leave that input in float (drop the pair), or quantize the weighted layer it feeds",
                    )
                )
    found += _quantized_twice(index)
    return found


def _dq(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    node = index.producer.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _weight_dq(node: onnx.NodeProto, index: GraphIndex) -> bool:
    return index.constant(node.input[0]) is not None or (
        (q := index.producer.get(node.input[0])) is not None and q.op_type == "QuantizeLinear"
        and index.constant(q.input[0]) is not None)


def _scale(node, index) -> list[Finding]:
    scale = index.constant(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return []
    values = np.asarray(scale, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        return [finding(node, "qdq-scale", REFUSED, f"scale has {int(np.sum(~np.isfinite(values) | (values <= 0)))} "
                   "non-finite or non-positive value(s); TensorRT needs finite positive scales",
                   "recalibrate: a zero range (constant or dead channel) needs a floor on its scale")]
    return []


def _weighted(node, index) -> list[Finding]:
    k = WEIGHTED[node.op_type]
    data_dq, weight_dq = _dq(index, node.input[0]), _dq(index, node.input[k])
    if node.op_type == "MatMul" and index.constant(node.input[k]) is None and weight_dq is None:
        return _half(node) if data_dq is not None else []  # activation x activation MatMul left in float
    if data_dq is None and weight_dq is not None and node.op_type in ("MatMul", "Gemm") and \
            attr(weight_dq, "block_size", 0) and index.constant(weight_dq.input[0]) is not None:
        # Weight-only quantization: a blocked INT4/INT8 weight dequantized into a float GEMM, which TensorRT keeps
        # as an int weight constant with a DQ prologue (Torch-TensorRT's "INT4 weight-only quantization" example,
        # docs.pytorch.org/TensorRT/.../quantize_linear_int4_woq.html); zero points must still be 0 (_scale, above).
        return []
    if (data_dq is None) != (weight_dq is None):
        return _half(node)
    if weight_dq is None:
        return []  # a layer the budget kept in float
    found = []
    if not _weight_dq(weight_dq, index):
        if node.op_type == "MatMul":
            return []  # activation x activation (attention's batched MatMuls): both dequantized is right
        found.append(
            finding(
                node,
                "qdq-weight",
                CHECK,
                "the weight's DequantizeLinear reads a computed tensor; TensorRT folds weight Q/DQ only on constants",
                "quantize the weight initializer directly",
            )
        )
    scale = index.constant(weight_dq.input[1])
    weight = index.dims.get(node.input[k]) or index.dims.get(weight_dq.input[0])
    if scale is not None and np.asarray(scale).size > 1 and weight:
        axis = _channel_axis(node, len(weight))
        got = attr(weight_dq, "axis", 1)
        got = got + len(weight) if got < 0 else got
        if axis is not None and got != axis:
            found.append(
                finding(
                    node,
                    "qdq-weight-axis",
                    CHECK,
                    f"weight quantized per channel on axis {got}; TensorRT's "
                    f"INT8 {node.op_type} kernels take per-output-channel scales (axis {axis})",
                    f"quantize the weight on axis {axis}",
                )
            )
    return found


def _half(node) -> list[Finding]:
    return [finding(node, "qdq-inputs", CHECK, f"only one of {node.op_type}'s inputs is quantized; TensorRT runs it in "
               "float with a stray Q/DQ pair", "quantize both its data and weight inputs, or neither")]


def _channel_axis(node, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return rank - 1 if rank == 2 else None  # MatMul with a [K, N] weight


def _residual(node, index) -> list[Finding]:
    """Add(Conv(DQ..), x): TensorRT fuses the Add into the INT8 convolution when x is dequantized too."""
    producers = [index.producer.get(i) for i in node.input[:2]]
    conv = [p for p in producers if p is not None and p.op_type in ("Conv", "ConvTranspose")
            and _dq(index, p.input[0]) is not None]
    if len(conv) != 1:
        return []
    other = node.input[1 - producers.index(conv[0])]
    if _dq(index, other) is not None or index.constant(other) is not None:
        return []
    return [
        finding(
            node,
            "qdq-residual",
            CHECK,
            f"the residual input {other} of this Add after INT8 {conv[0].name or 'Conv'} "
            "is not quantized; TensorRT fuses the Add into the convolution only when it is",
            "quantize the residual branch's input to the Add",
        )
    ]


def _quantized_twice(index: GraphIndex) -> list[Finding]:
    found = []
    for name, readers in index.consumers.items():
        quants = [n for n in readers if n.op_type == "QuantizeLinear"]
        scales = {np.asarray(index.constant(q.input[1])).tobytes() for q in quants
                  if index.constant(q.input[1]) is not None}
        if len(quants) > 1 and len(scales) > 1:
            found.append(
                finding(
                    quants[1],
                    "qdq-twice",
                    CHECK,
                    f"{name} is quantized by {len(quants)} QuantizeLinear nodes "
                    "with different scales; TensorRT cannot share one INT8 copy of it",
                    "quantize it once and let every consumer read the same DequantizeLinear",
                )
            )
    return found
