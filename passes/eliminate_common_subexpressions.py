"""Common-subexpression elimination: two nodes with the same op, domain, attributes and the
same input tensors compute the same outputs; the later one's readers use the earlier one's.

Nondeterministic ops (the Random* family, Multinomial, Dropout in training) and nodes with
subgraphs are never merged. Run after ``DeduplicateConstants`` so equal constants are the same
tensor.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.deduplicate_constants import DeduplicateConstants
from passes.graph_utils import is_graph_output, replace_uses

logger = logging.getLogger(__name__)

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}


def _attr_key(value):
    if isinstance(value, gs.Graph):
        raise TypeError("subgraph")
    if isinstance(value, gs.Tensor):
        return ("tensor", value.name)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    return value


def node_key(node: gs.Node) -> tuple | None:
    if node.op in NONDETERMINISTIC:
        return None
    try:
        attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
    except TypeError:
        return None
    return node.op, node.domain, attrs, tuple(id(t) for t in node.inputs), len(node.outputs)


class EliminateCommonSubexpressions(Pass):
    """Replaces the outputs of a node identical to an earlier one with the earlier one's."""

    requires = (DeduplicateConstants,)

    def run(self, graph: gs.Graph) -> PassResult:
        graph.toposort()
        seen: dict[tuple, gs.Node] = {}
        merged = 0
        for node in list(graph.nodes):
            key = node_key(node)
            if key is None:
                continue
            earlier = seen.setdefault(key, node)
            if earlier is node:
                continue
            if any(is_graph_output(o, graph) for o in node.outputs):
                logger.debug("keep %s: an output is a graph output", node.name)
                continue
            for out, same in zip(node.outputs, earlier.outputs):
                replace_uses(out, same, graph)
            merged += 1
        if merged:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=merged > 0, stats={"merged": merged} if merged else {})
