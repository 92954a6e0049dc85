"""MatMul + Add -> Gemm where shapes allow: Y = A @ B + C with A of rank 2, B a constant [K, N]
and C a constant that broadcasts to [N] (shape [N] or [1, N]).

ONNX's Gemm is 2-D only, so MatMuls on [batch, seq, hidden] activations stay as they are
(TensorRT and ONNX Runtime fuse those themselves).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, single_consumer
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)


class FuseMatMulAdd(Pass):
    """Replaces Add(MatMul(A, B), C) with Gemm(A, B, C)."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        fused = 0
        for matmul in [n for n in graph.nodes if n.op == "MatMul"]:
            match = self._match(matmul, graph)
            if isinstance(match, str):
                logger.debug("skip %s: %s", matmul.name, match)
                continue
            add, bias_index = match
            a, b, c, y = matmul.inputs[0], matmul.inputs[1], add.inputs[bias_index], add.outputs[0]
            for n in (matmul, add):
                n.inputs.clear()
                n.outputs.clear()
            graph.layer(op="Gemm", name=f"{matmul.name}_gemm", inputs=[a, b, c], outputs=[y])
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=fused > 0, stats={"fused": fused} if fused else {})

    @staticmethod
    def _match(matmul: gs.Node, graph: gs.Graph):
        a, out = matmul.inputs[0], matmul.outputs[0]
        if a.shape is None or len(a.shape) != 2:
            return f"A has rank {None if a.shape is None else len(a.shape)}, Gemm needs 2"
        weight = constant_value(matmul.inputs[1])
        if weight is None or weight.ndim != 2:
            return "B is not a constant matrix"
        if not single_consumer(out, graph) or out.outputs[0].op != "Add":
            return "the MatMul is not read by exactly one Add"
        add = out.outputs[0]
        bias_index = 1 if add.inputs[0] is out else 0
        bias = constant_value(add.inputs[bias_index])
        if bias is None or bias.shape not in ((weight.shape[1],), (1, weight.shape[1])):
            return f"the Add operand is not a constant [N] bias (N={weight.shape[1]})"
        if bias.dtype != weight.dtype:
            return "bias and weight types differ"
        return add, bias_index
