"""Fold shape computations on static dims: ``Shape(x)`` and ``Gather``/``Slice`` of it.

    Shape(x, start, end)                       -> x.shape[start:end]     (every dim static)
    Gather(Shape(x), idx) / Slice(Shape(x), ...) -> the selected dims       (those dims static)

graphsurgeon's own shape folding (``fold_constants(fold_shapes=True)``) ignores ``Shape``'s
``start``/``end`` attributes (opset 15) and folds such nodes to the *whole* shape: ONNX's backend
cases ``test_shape_start_*`` produced wrong outputs with it. So ``FoldConstants`` runs with
``fold_shapes=False`` and this pass does the shape part, correctly.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name, int_list, is_graph_output
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)


def _shape_range(node: gs.Node) -> list | None:
    """The dims a Shape node returns (ints or symbolic names), honouring start/end."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    end = rank if end is None else int(end)
    start, end = (s + rank if s < 0 else s for s in (start, end))
    return list(shape[max(0, min(start, rank)):max(0, min(end, rank))])


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


def _selected(reader: gs.Node, dims: list) -> tuple[gs.Tensor, np.ndarray] | None:
    """(output, value) when a Gather/Slice of the shape picks only static dims."""
    if reader.op == "Gather" and reader.inputs[0] is not None and len(reader.inputs) > 1:
        idx = int_list(reader.inputs[1])
        if idx is None or reader.attrs.get("axis", 0) != 0:
            return None
        picked = [dims[i] for i in idx]
        scalar = constant_value(reader.inputs[1]).ndim == 0  # an initializer or a Constant node's output
        if not _static(picked):
            return None
        value = np.array(picked[0] if scalar else picked, dtype=np.int64)
        return reader.outputs[0], value
    if reader.op == "Slice" and len(reader.inputs) >= 3:
        starts, ends = int_list(reader.inputs[1]), int_list(reader.inputs[2])
        axes = int_list(reader.inputs[3]) if len(reader.inputs) > 3 and reader.inputs[3].name else [0]
        steps = int_list(reader.inputs[4]) if len(reader.inputs) > 4 and reader.inputs[4].name else [1]
        if None in (starts, ends, axes, steps) or axes not in ([0], [-1]) or len(starts) != 1:
            return None
        picked = dims[slice(starts[0], ends[0], steps[0])]
        return (reader.outputs[0], np.array(picked, dtype=np.int64)) if _static(picked) else None
    return None


class FoldShapes(Pass):
    """Replaces Shape(x) (and Gather/Slice of it) with a constant where the dims are static."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        folded = 0
        for node in [n for n in graph.nodes if n.op == "Shape"]:
            dims = _shape_range(node)
            if dims is None:
                continue
            out = node.outputs[0]
            if _static(dims) and not is_graph_output(out, graph):
                self._to_constant(
                    out, np.array(dims, dtype=np.int64), fresh_name(graph, f"{node.name or 'shape'}_folded")
                )
                folded += 1
                continue
            for reader in list(out.outputs):
                picked = _selected(reader, dims)
                if picked is not None and not is_graph_output(picked[0], graph):
                    self._to_constant(picked[0], picked[1], fresh_name(graph, f"{reader.name or 'shape'}_folded"))
                    folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=folded > 0, stats={"folded": folded} if folded else {})

    @staticmethod
    def _to_constant(tensor: gs.Variable, value: np.ndarray, name: str) -> None:
        constant = gs.Constant(name, value)
        for consumer in list(tensor.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is tensor:
                    consumer.inputs[i] = constant
