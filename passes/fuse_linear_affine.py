"""Fold a following per-channel Mul/Div/Add/Sub by a constant into the weights of a Conv or Gemm.

Conv (output [N, C, ...], weight [C, ...]):   Mul(conv, s): W' = W * s_c, b' = b * s_c
                                               Add(conv, c): b' = b + c_c
Gemm (Y = alpha * A @ B' + beta * C, output [M, N]): the same per output column n, with B
scaled along its N axis (rows when transB=1, columns otherwise) and C replaced by beta * C
folded into a new bias with beta = 1. Div by s is Mul by 1/s; Sub of c is Add of -c.

The constant must broadcast per channel only: every dim 1 except, at most, the channel dim.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name, producer, single_consumer

logger = logging.getLogger(__name__)

OPS = ("Mul", "Div", "Add", "Sub")


def _per_channel(value: np.ndarray, out_rank: int, channel_axis: int, channels: int) -> np.ndarray | None:
    """``value`` as a [channels] vector if it broadcasts per channel of the output, else None."""
    if value.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - value.ndim) + value.shape
    if any(s != 1 for i, s in enumerate(shape) if i != channel_axis) or shape[channel_axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1) if value.size > 1 else value.reshape(1), (channels,)).astype(np.float64)


class FuseLinearAffine(Pass):
    """Replaces Mul/Div/Add/Sub(Conv|Gemm(x, W, b), c) with Conv|Gemm(x, W', b')."""

    def run(self, graph: gs.Graph) -> PassResult:
        fused = 0
        for node in [n for n in graph.nodes if n.op in OPS]:
            if not node.inputs or not node.outputs:
                continue  # consumed by an earlier fusion in this run
            linear = producer(node.inputs[0])
            match = self._match(linear, node, graph)
            if isinstance(match, str):
                logger.debug("skip %s: %s", node.name, match)
                continue
            self._fold(graph, linear, node, *match)
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=fused > 0, stats={"fused": fused} if fused else {})

    @staticmethod
    def _match(linear: gs.Node | None, node: gs.Node, graph: gs.Graph):
        """(weight, bias, per-channel constant) or the reason it does not match."""
        if linear is None or linear.op not in ("Conv", "Gemm"):
            return "the first input is not produced by a Conv or Gemm"
        if not single_consumer(linear.outputs[0], graph):
            return "the Conv/Gemm output has other readers"
        const = constant_value(node.inputs[1])
        weight = constant_value(linear.inputs[1])
        if const is None or weight is None or weight.dtype.kind != "f":
            return "the operand or the weight is not a float constant"
        bias_t = linear.inputs[2] if len(linear.inputs) > 2 and linear.inputs[2].name else None
        bias = constant_value(bias_t) if bias_t is not None else None
        if bias_t is not None and bias is None:
            return "the bias is not constant"
        if linear.op == "Conv":
            channels, rank, axis = weight.shape[0], weight.ndim, 1
        else:
            channels = weight.shape[0] if linear.attrs.get("transB", 0) else weight.shape[1]
            rank, axis = 2, 1
            if bias is not None and _per_channel(bias, 2, 1, channels) is None:
                return "the Gemm bias is not a per-column vector"
        vector = _per_channel(const, rank, axis, channels)
        if vector is None:
            return f"the constant of shape {const.shape} does not broadcast per channel"
        if node.op == "Div" and np.any(vector == 0):
            return "division by zero"
        return weight, bias, vector

    @staticmethod
    def _fold(graph: gs.Graph, linear: gs.Node, node: gs.Node, weight, bias, vector) -> None:
        dtype = weight.dtype
        channels = vector.shape[0]
        b = np.zeros(channels) if bias is None else np.broadcast_to(bias.reshape(-1), (channels,)).astype(np.float64)
        if linear.op == "Gemm":
            b = b * float(linear.attrs.get("beta", 1.0))
            linear.attrs["beta"] = 1.0
        w = weight.astype(np.float64)
        if node.op in ("Mul", "Div"):
            scale = vector if node.op == "Mul" else 1.0 / vector
            if linear.op == "Conv":
                w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
            else:
                w = w * (scale[:, None] if linear.attrs.get("transB", 0) else scale[None, :])
            b = b * scale
        else:
            b = b + (vector if node.op == "Add" else -vector)
        x, y = linear.inputs[0], node.outputs[0]
        for n in (linear, node):
            n.inputs.clear()
            n.outputs.clear()
        base = linear.name or linear.op.lower()
        linear.inputs.extend([x, gs.Constant(fresh_name(graph, f"{base}_W_affine"), w.astype(dtype)),
                              gs.Constant(fresh_name(graph, f"{base}_B_affine"), b.astype(dtype))])
        linear.outputs.append(y)
