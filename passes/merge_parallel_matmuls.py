"""MatMuls that read the same input with constant weights -> one MatMul and a Split (target ``ort``).

    y_i = x . W_i  (i = 1..m, each W_i [K, N_i])   ->   [y_1 .. y_m] = Split(x . [W_1 | .. | W_m], N_1..N_m)

Exact: each output column is the same dot product over the same K values. A decoder's q/k/v projections
and its MLP's gate/up projections read one normalized hidden state; at decode time (one token) each is a
small matrix-vector product whose cost is mostly the kernel's fixed overhead, so one launch instead of
three (or two) is what ONNX Runtime's own builder does (onnxruntime-genai packs QKV the same way), and a
4-bit weight quantized afterwards is one ``MatMulNBits``.

Skipped, with the reason logged: weights that are not 2-D float constants, different K, a MatMul whose
output is a graph output (its name must stay), fewer than two candidates on one input.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name, is_graph_output

logger = logging.getLogger(__name__)


class MergeParallelMatMuls(Pass):
    """Sibling MatMuls on one input with constant weights -> one MatMul + Split."""

    def run(self, graph: gs.Graph) -> PassResult:
        merged = groups = 0
        for tensor in list(graph.tensors().values()):
            siblings = []
            for node in tensor.outputs:
                if node.op != "MatMul" or node.inputs[0] is not tensor:
                    continue
                weight = constant_value(node.inputs[1])
                if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
                    logger.debug("skip %s: its weights are not a 2-D float constant", node.name)
                elif is_graph_output(node.outputs[0], graph):
                    logger.debug("skip %s: it writes a graph output", node.name)
                else:
                    siblings.append((node, weight))
            by_k: dict[int, list] = {}
            for node, weight in siblings:
                by_k.setdefault(weight.shape[0], []).append((node, weight))
            for group in by_k.values():
                if len(group) < 2:
                    continue
                self._merge(graph, tensor, group)
                merged += len(group)
                groups += 1
        if not groups:
            return PassResult(False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, {"merged": merged, "groups": groups})

    @staticmethod
    def _merge(graph: gs.Graph, x: gs.Tensor, group: list) -> None:
        nodes = [n for n, _ in group]
        weight = np.concatenate([w for _, w in group], axis=1)
        name = f"{nodes[0].name}_merged"
        joined = gs.Variable(fresh_name(graph, name), dtype=np.float32)
        graph.layer(op="MatMul", name=name, inputs=[x, gs.Constant(fresh_name(graph, f"{name}_weight"), weight)],
                    outputs=[joined])
        outputs = [n.outputs[0] for n in nodes]
        for node in nodes:
            node.outputs.clear()
            node.inputs.clear()
        sizes = gs.Constant(fresh_name(graph, f"{name}_sizes"), np.array([w.shape[1] for _, w in group], np.int64))
        graph.layer(op="Split", name=f"{name}_split", inputs=[joined, sizes], outputs=outputs, attrs={"axis": -1})
