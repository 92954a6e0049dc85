"""Remove nodes whose output equals their input: ``Cast`` to the input's own type, ``Reshape`` to
the input's own shape, ``Transpose`` with the identity permutation, ``Expand`` that broadcasts
to the input's own shape, ``Concat`` of a single input (what a traced empty KV cache leaves).

Shapes come from ``InferShapes``. A Reshape is a no-op when its constant target has the input's
rank and every entry is 0 (copy, without ``allowzero``), the same static size, or the one ``-1``
left once every other dim matched. An Expand is a no-op when every entry of its constant target
is 1 or the input's static size at that position (counted from the right) and it adds no dims.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import bypass, int_list
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)


def _noop_reason(node: gs.Node) -> str | None:
    """Why ``node`` is not a no-op (None when it is one)."""
    x = node.inputs[0]
    shape = x.shape
    if node.op == "Concat":
        return None if len(node.inputs) == 1 else "joins several inputs"
    if node.op == "Cast":
        out = node.outputs[0].dtype
        return None if x.dtype is not None and out is not None and x.dtype == out else "changes the type"
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return None if perm is not None and list(perm) == list(range(len(perm))) else "permutes axes"
    if shape is None:
        return "input shape unknown"
    target = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return "target shape is not constant"
    if node.op == "Reshape":
        if len(target) != len(shape) or node.attrs.get("allowzero", 0):
            return "changes the rank (or allowzero is set)"
        mismatched = [i for i, (t, s) in enumerate(zip(target, shape)) if not (t == 0 or t == s)]
        if not mismatched or (len(mismatched) == 1 and target[mismatched[0]] == -1):
            return None
        return "changes the shape"
    if node.op == "Expand":
        if len(target) > len(shape):
            return "adds dims"
        tail = shape[len(shape) - len(target):]
        return None if all(t == 1 or t == s for t, s in zip(target, tail)) else "broadcasts to a larger shape"
    return "not a candidate op"


class RemoveNoOps(Pass):
    """Replaces Cast/Reshape/Transpose/Expand/Concat(x) with x where they leave x unchanged."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        removed: dict[str, int] = {}
        for node in [n for n in graph.nodes if n.op in ("Cast", "Reshape", "Transpose", "Expand", "Concat")]:
            if reason := _noop_reason(node) or bypass(node, graph):
                logger.debug("keep %s: %s", node.name, reason)
                continue
            removed[node.op] = removed.get(node.op, 0) + 1
        if removed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=bool(removed), stats=removed)
