"""Merge consecutive Transposes: Transpose(Transpose(x, p1), p2) = Transpose(x, q), q[i] = p1[p2[i]].

When ``q`` is the identity, both go. The inner Transpose must have no other reader, so the
node count never grows.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import bypass, producer, single_consumer

logger = logging.getLogger(__name__)


class MergeTransposes(Pass):
    """Replaces Transpose(Transpose(x, p1), p2) with Transpose(x, p1[p2]) (or x)."""

    def run(self, graph: gs.Graph) -> PassResult:
        merged = 0
        for outer in [n for n in graph.nodes if n.op == "Transpose"]:
            inner = producer(outer.inputs[0]) if outer.inputs else None
            if inner is None or inner.op != "Transpose":
                continue
            if not single_consumer(inner.outputs[0], graph):
                logger.debug("skip %s: the inner Transpose has other readers", outer.name)
                continue
            p1, p2 = inner.attrs.get("perm"), outer.attrs.get("perm")
            if p1 is None or p2 is None:
                logger.debug("skip %s: a perm is implicit (reversal of unknown rank)", outer.name)
                continue
            perm = [int(p1[i]) for i in p2]
            outer.inputs[0] = inner.inputs[0]
            outer.attrs["perm"] = perm
            if perm == list(range(len(perm))) and (reason := bypass(outer, graph)):
                logger.debug("keep %s as an identity Transpose: %s", outer.name, reason)
            merged += 1
        if merged:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=merged > 0, stats={"merged": merged} if merged else {})
