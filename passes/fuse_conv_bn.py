"""Fold BatchNormalization into the preceding Conv.

W' = W * gamma / sqrt(var + eps);  b' = (b - mean) * gamma / sqrt(var + eps) + beta

The scale applies per output channel, axis 0 of the Conv weight [C_out, C_in/groups, k...].
The folding is done in float64 and stored in the weight's dtype, so the fused Conv is as close
to the pair as the weight precision allows.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name, producer, single_consumer

logger = logging.getLogger(__name__)


class FuseConvBatchNorm(Pass):
    """Replaces BatchNormalization(Conv(x, W, b)) with Conv(x, W', b')."""

    def run(self, graph: gs.Graph) -> PassResult:
        fused = 0
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            conv = producer(bn.inputs[0])
            if reason := self._cannot_fuse(conv, bn, graph):
                logger.debug("skip %s: %s", bn.name, reason)
                continue
            self._fold(conv, bn, graph)
            fused += 1
        if fused:
            graph.cleanup().toposort()
        return PassResult(changed=fused > 0, stats={"fused": fused} if fused else {})

    @staticmethod
    def _cannot_fuse(conv: gs.Node | None, bn: gs.Node, graph: gs.Graph) -> str | None:
        if conv is None or conv.op != "Conv":
            return "input is not produced by a Conv"
        if not single_consumer(conv.outputs[0], graph):
            return "the Conv output has other consumers"
        if len(bn.outputs) > 1 and any(o.outputs for o in bn.outputs[1:]):
            return "BatchNormalization is in training mode (running statistics are used)"
        if bn.attrs.get("training_mode", 0):
            return "training_mode is set"
        weight = constant_value(conv.inputs[1])
        if weight is None or weight.dtype.kind != "f":
            return "the Conv weight is not a float constant"
        if len(conv.inputs) > 2 and conv.inputs[2].name and constant_value(conv.inputs[2]) is None:
            return "the Conv bias is not constant"
        params = [constant_value(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "a BatchNormalization parameter is not constant"
        if any(p.shape != (weight.shape[0],) for p in params):
            return f"BatchNormalization has {params[0].shape} channels, the Conv {weight.shape[0]}"
        return None

    @staticmethod
    def _fold(conv: gs.Node, bn: gs.Node, graph: gs.Graph) -> None:
        weight = constant_value(conv.inputs[1])
        gamma, beta, mean, var = (constant_value(t).astype(np.float64) for t in bn.inputs[1:5])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
        bias = constant_value(conv.inputs[2]).astype(np.float64) if has_bias else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        new_weight = (weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        new_bias = ((bias - mean) * scale + beta).astype(weight.dtype)
        x, y = conv.inputs[0], bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        conv.inputs.clear()  # graphsurgeon's node lists keep tensor links in sync; no slice assignment
        conv.inputs.extend([x, gs.Constant(fresh_name(graph, f"{conv.name or 'conv'}_W_bnfold"), new_weight),
                            gs.Constant(fresh_name(graph, f"{conv.name or 'conv'}_B_bnfold"), new_bias)])
        conv.outputs.clear()
        conv.outputs.append(y)
