"""RMSNorm subgraph -> one node.

    y = x / Sqrt(ReduceMean(x^2, axes=-1) + eps) * w        (or x * Reciprocal(Sqrt(...)) * w)

Target ``ort``: ONNX Runtime's ``SimplifiedLayerNormalization`` at any opset (ONNX Runtime registers
this internal op in the default ONNX domain, not ``com.microsoft``; other runtimes reject it).
Target ``trt``: the standard ``RMSNormalization`` when the graph's opset is at least 23; below
that the subgraph stays (TensorRT fuses normalization patterns itself).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import fresh_name, producer
from passes.infer_shapes import InferShapes
from passes.norm_match import affine_tail, reduce_axes, rsqrt_of_mean_plus_eps, squared, trailing_axis

logger = logging.getLogger(__name__)


class FuseRmsNorm(Pass):
    """Replaces x / Sqrt(ReduceMean(x^2) + eps) (* w) with one RMS-normalization node."""

    requires = (InferShapes,)

    def __init__(self, target: str = "trt"):
        self.target = target

    def run(self, graph: gs.Graph) -> PassResult:
        if self.target == "trt" and graph.opset < 23:
            logger.debug("skip: RMSNormalization needs opset 23, the graph has %d", graph.opset)
            return PassResult(False)
        fused = 0
        for node in [n for n in graph.nodes if n.op in ("Div", "Mul")]:
            match = self._match(node)
            if isinstance(match, str):
                logger.debug("skip %s: %s", node.name, match)
                continue
            x, eps, end, gamma, width = match
            scale = np.broadcast_to(gamma if gamma is not None else 1.0, (width,)).astype(x.dtype or np.float32)
            end.inputs[0].outputs.clear()
            inputs = [x, gs.Constant(fresh_name(graph, "rms_scale"), scale)]
            attrs = {"axis": -1, "epsilon": eps}
            if self.target == "trt":
                graph.layer(
                    op="RMSNormalization", name=f"{node.name}_rmsnorm", inputs=inputs, outputs=[end], attrs=attrs
                )
            else:
                graph.layer(op="SimplifiedLayerNormalization", name=f"{node.name}_rmsnorm", attrs=attrs,
                            inputs=inputs, outputs=[end])
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=fused > 0, stats={"fused": fused} if fused else {})

    @staticmethod
    def _match(node: gs.Node):
        if node.op == "Div":
            x, std = node.inputs
        else:
            recip = next(
                (producer(t) for t in node.inputs if producer(t) is not None and producer(t).op == "Reciprocal"), None
            )
            if recip is None:
                return "not x * Reciprocal(...)"
            x = node.inputs[1] if producer(node.inputs[0]) is recip else node.inputs[0]
            std = recip.inputs[0]
        found = rsqrt_of_mean_plus_eps(std)
        if found is None:
            return "the divisor is not Sqrt(ReduceMean(...) + eps)"
        mean, eps = found
        if squared(mean.inputs[0]) is not x:
            return "the mean is not over x^2 of the same x"
        axes = reduce_axes(mean)
        rank = len(x.shape) if x.shape is not None else None
        if axes is None or trailing_axis(axes, rank) != -1:
            return "the mean is not over the last dim alone"
        width = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        end, gamma, _ = affine_tail(node.outputs[0], width, ops=("Mul",))
        width = width or (gamma.size if gamma is not None and gamma.size > 1 else None)
        if width is None:
            return "the normalized width is unknown"
        return x, eps, end, gamma, width
