"""Explicit INT8 for TensorRT: symmetric QuantizeLinear/DequantizeLinear pairs where it fuses them.

    q = round_half_even(clip(x / s, -128, 127)),  x' = q * s,  zero point 0 (TensorRT takes no other)

- Weights (constants) of Conv, ConvTranspose, Gemm, MatMul and Gather are stored as INT8 with a
  per-channel ``DequantizeLinear`` on the output-channel axis: Conv ``[Cout, Cin/g, k..]`` axis 0,
  ConvTranspose ``[Cin, Cout/g, k..]`` axis 1, Gemm B axis 0 with ``transB=1`` else 1, MatMul
  ``[K, N]`` axis 1, Gather (embedding) rows axis 0; ``s_c = max|W_c| / 127``.
- Activations entering those ops get one per-tensor Q/DQ pair each (``s = max(|lo|, |hi|) / 127``
  from calibration), shared by every quantized reader; a MatMul of two activations (attention)
  gets both.
- A residual ``Add`` whose one input is a quantized Conv's output gets Q/DQ on its other input, so
  TensorRT can fuse the addition into the convolution.

Nothing else is quantized: TensorRT would leave other Q/DQ pairs unfused. Which of these layers
stay in higher precision is the caller's decision (``exclude``, from the sensitivity analysis).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name
from passes.infer_shapes import InferShapes
from passes.quantization import (
    candidates,
    quantize_symmetric,
    quantized_inputs,
    symmetric_scale,
    weight_axis,
)

logger = logging.getLogger(__name__)

class QuantizeForTensorRT(Pass):
    """Inserts symmetric INT8 Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul/Gather and residual Adds."""

    requires = (InferShapes,)

    def __init__(self, ranges: dict[str, tuple[float, float]] | None = None, exclude: tuple[str, ...] = ()):
        self.ranges = ranges or {}
        self.exclude = frozenset(exclude)

    def run(self, graph: gs.Graph) -> PassResult:
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            return PassResult(False)  # already quantized
        if graph.opset < 13:
            logger.warning("INT8 Q/DQ needs opset 13 (per-channel axis); the graph has %d", graph.opset)
            return PassResult(False)
        self._dq_of: dict[int, gs.Variable] = {}
        stats = {"nodes": 0, "weights": 0, "activations": 0}
        quantized: set[str] = set()
        for node in candidates(graph):
            if node.name in self.exclude:
                logger.debug("keep %s in float: excluded", node.name)
                continue
            slots = quantized_inputs(node, quantized)
            if not slots:
                logger.debug("keep %s in float: its Conv stays in float", node.name)
                continue
            missing = [
                node.inputs[i].name
                for i, kind in slots
                if kind == "activation" and node.inputs[i].name not in self.ranges
            ]
            if missing:
                logger.debug("keep %s in float: no calibration range for %s", node.name, ", ".join(missing))
                continue
            for i, kind in slots:
                if kind == "weight":
                    node.inputs[i] = self._weight(graph, node, node.inputs[i])
                else:
                    node.inputs[i] = self._activation(graph, node.inputs[i])
                stats["weights" if kind == "weight" else "activations"] += 1
            quantized.add(node.name)
            stats["nodes"] += 1
        if not stats["nodes"]:
            return PassResult(False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats["activations"] = len(self._dq_of)
        return PassResult(True, stats)

    def _weight(self, graph: gs.Graph, node: gs.Node, tensor: gs.Tensor) -> gs.Variable:
        values = np.asarray(constant_value(tensor), dtype=np.float32)
        axis = weight_axis(node, values)
        scale = symmetric_scale(values, axis)
        q = gs.Constant(fresh_name(graph, f"{tensor.name}_int8"), quantize_symmetric(values, scale, axis))
        zero = np.zeros(scale.shape, np.int8)
        out = gs.Variable(fresh_name(graph, f"{tensor.name}_dq"), dtype=np.float32, shape=list(values.shape))
        attrs = {"axis": axis} if axis is not None else {}
        graph.nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, f"{node.name}_w_dq"), attrs,
                                   inputs=[q, gs.Constant(fresh_name(graph, f"{tensor.name}_scale"), scale),
                                           gs.Constant(fresh_name(graph, f"{tensor.name}_zp"), zero)],
                                   outputs=[out]))
        return out

    def _activation(self, graph: gs.Graph, tensor: gs.Tensor) -> gs.Variable:
        if id(tensor) in self._dq_of:
            return self._dq_of[id(tensor)]
        lo, hi = self.ranges[tensor.name]
        scale = np.array(max(abs(lo), abs(hi)) / 127.0 or 1.0, np.float32)
        s = gs.Constant(fresh_name(graph, f"{tensor.name}_scale"), scale)
        zp = gs.Constant(fresh_name(graph, f"{tensor.name}_zp"), np.array(0, np.int8))
        q = gs.Variable(fresh_name(graph, f"{tensor.name}_q"), dtype=np.int8, shape=tensor.shape)
        dq = gs.Variable(fresh_name(graph, f"{tensor.name}_dq"), dtype=np.float32, shape=tensor.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", fresh_name(graph, f"{tensor.name}_quantize"),
                                   inputs=[tensor, s, zp], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, f"{tensor.name}_dequantize"),
                                   inputs=[q, s, zp], outputs=[dq]))
        self._dq_of[id(tensor)] = dq
        return dq
