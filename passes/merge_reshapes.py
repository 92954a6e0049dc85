"""Merge consecutive Reshapes: Reshape(Reshape(x, s1), s2) = Reshape(x, s2).

Only when ``s2`` is a constant without 0 entries (a 0 copies a dim of the *intermediate*
tensor, which would change meaning) and the inner Reshape has no other reader. ``-1`` is
fine: it is resolved from the element count, which reshaping never changes.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import int_list, producer, single_consumer

logger = logging.getLogger(__name__)


class MergeReshapes(Pass):
    """Replaces Reshape(Reshape(x, s1), s2) with Reshape(x, s2)."""

    def run(self, graph: gs.Graph) -> PassResult:
        merged = 0
        for outer in [n for n in graph.nodes if n.op == "Reshape"]:
            inner = producer(outer.inputs[0])
            if inner is None or inner.op != "Reshape":
                continue
            target = int_list(outer.inputs[1])
            if target is None or 0 in target:
                logger.debug("skip %s: the outer shape is not constant or copies dims (0)", outer.name)
                continue
            if not single_consumer(inner.outputs[0], graph):
                logger.debug("skip %s: the inner Reshape has other readers", outer.name)
                continue
            outer.inputs[0] = inner.inputs[0]
            merged += 1
        if merged:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=merged > 0, stats={"merged": merged} if merged else {})
