"""LayerNorm subgraph -> ``LayerNormalization`` (opset 17, both targets).

    mean = ReduceMean(x, axes); d = x - mean; var = ReduceMean(d^2, axes)
    y = d / Sqrt(var + eps) * gamma + beta             (gamma, beta optional constants)

``axes`` must be the trailing dims; gamma and beta become the node's Scale and B (ones and
zeros when absent, so the width must be known).
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


class FuseLayerNorm(Pass):
    """Replaces the ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) chain with LayerNormalization."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        if graph.opset < 17:
            return PassResult(False)
        fused = 0
        for div in [n for n in graph.nodes if n.op == "Div"]:
            match = self._match(div)
            if isinstance(match, str):
                logger.debug("skip %s: %s", div.name, match)
                continue
            x, axis, eps, end, gamma, beta, width = match
            dtype = x.dtype or np.float32
            scale = np.broadcast_to(gamma if gamma is not None else 1.0, (width,)).astype(dtype)
            bias = np.broadcast_to(beta if beta is not None else 0.0, (width,)).astype(dtype)
            end.inputs[0].outputs.clear()
            graph.layer(
                op="LayerNormalization",
                name=f"{div.name}_layernorm",
                outputs=[end],
                inputs=[
                    x,
                    gs.Constant(fresh_name(graph, "ln_scale"), scale),
                    gs.Constant(fresh_name(graph, "ln_bias"), bias),
                ],
                attrs={"axis": axis, "epsilon": eps},
            )
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=fused > 0, stats={"fused": fused} if fused else {})

    @staticmethod
    def _match(div: gs.Node):
        sub = producer(div.inputs[0])
        if sub is None or sub.op != "Sub":
            return "the numerator is not x - mean"
        x, mean_t = sub.inputs
        mean = producer(mean_t)
        if mean is None or mean.op != "ReduceMean" or mean.inputs[0] is not x:
            return "the subtrahend is not ReduceMean(x)"
        found = rsqrt_of_mean_plus_eps(div.inputs[1])
        if found is None:
            return "the denominator is not Sqrt(ReduceMean(...) + eps)"
        var, eps = found
        if squared(var.inputs[0]) is not sub.outputs[0]:
            return "the variance is not ReduceMean((x - mean)^2)"
        axes = reduce_axes(mean)
        if axes is None or axes != reduce_axes(var):
            return "the two ReduceMeans do not share constant axes with keepdims"
        rank = len(x.shape) if x.shape is not None else None
        axis = trailing_axis(axes, rank)
        if axis is None or axis != -1:
            return f"axes {axes} are not the last dim"
        width = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        end, gamma, beta = affine_tail(div.outputs[0], width)
        width = width or next((v.size for v in (gamma, beta) if v is not None and v.size > 1), None)
        if width is None:
            return "the normalized width is unknown"
        return x, axis, eps, end, gamma, beta, width
