"""A residual Add feeding an RMS normalization -> ONNX Runtime's ``SkipSimplifiedLayerNormalization``
(target ``ort``).

    s = a + b;  y = s / sqrt(mean(s^2, last axis) + eps) * gamma
      ->  y, _, _, s = SkipSimplifiedLayerNormalization(a, b, gamma, epsilon=eps)

One kernel reads a and b once and writes both the normalized y and the sum s, which the residual stream goes
on with (output 3, measured in docs/decisions/008). Every pre-norm transformer layer has two of these (a
decoder's input and post-attention norms; Gemma's pre-feed-forward norm). The normalization is the standard
``RMSNormalization`` (opset 23, what the decoder export writes) or ONNX Runtime's
``SimplifiedLayerNormalization`` (``FuseRmsNorm``'s ort form).

Skipped, with the reason logged: a normalization not over the last axis alone, stash_type other than float,
an Add that broadcasts (the op adds same-shaped tensors), a constant operand (a bias, not a residual), an Add
whose sum is a graph output.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import fresh_name, is_graph_output, producer
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

NORMS = ("RMSNormalization", "SimplifiedLayerNormalization")


class FuseSkipRmsNorm(Pass):
    """Add + RMS normalization -> SkipSimplifiedLayerNormalization (its sum as output 3)."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        fused = 0
        for norm in [n for n in graph.nodes if n.op in NORMS]:
            reason = self._reason(norm, graph)
            if reason:
                logger.debug("skip %s: %s", norm.name, reason)
                continue
            add = producer(norm.inputs[0])
            total, out = add.outputs[0], norm.outputs[0]
            a, b = add.inputs
            add.outputs.clear()
            add.inputs.clear()
            norm.outputs.clear()
            gamma = norm.inputs[1]
            norm.inputs.clear()
            unused = [gs.Variable(fresh_name(graph, f"{out.name}_{k}")) for k in ("mean", "inv_std")]
            graph.layer(op="SkipSimplifiedLayerNormalization", name=f"{norm.name}_skip", domain="com.microsoft",
                        inputs=[a, b, gamma], outputs=[out, *unused, total],
                        attrs={"epsilon": float(norm.attrs.get("epsilon", 1e-5))})
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(fused > 0, {"fused": fused} if fused else {})

    @staticmethod
    def _reason(norm: gs.Node, graph: gs.Graph) -> str | None:
        if int(norm.attrs.get("axis", -1)) != -1 and not (
                norm.inputs[0].shape and int(norm.attrs["axis"]) == len(norm.inputs[0].shape) - 1):
            return "not over the last axis"
        if int(norm.attrs.get("stash_type", 1)) != 1:
            return "stash_type is not float"
        if len(norm.inputs) < 2 or len(norm.outputs) > 1 and any(o.outputs for o in norm.outputs[1:]):
            return "no scale, or its statistics outputs are read"
        add = producer(norm.inputs[0])
        if add is None or add.op != "Add":
            return "its input is not an Add"
        if is_graph_output(add.outputs[0], graph):
            return "the sum is a graph output"
        a, b = add.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant) or not a.inputs or not b.inputs:
            return "an operand is a constant or a graph input (a bias, not a residual)"
        if a.shape is None or b.shape is None or list(a.shape) != list(b.shape):
            return f"the Add may broadcast ({a.shape} + {b.shape})"
        return None
