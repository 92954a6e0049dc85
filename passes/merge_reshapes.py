"""Merge consecutive Reshapes: Reshape(Reshape(x, s1), s2) = Reshape(x, s2).

Only when ``s2`` is a constant without 0 entries (a 0 copies a dim of the *intermediate*
tensor, which would change meaning) and the inner Reshape has no other reader. ``-1`` is
fine: it is resolved from the element count, which reshaping never changes.

A round trip goes whole, whatever ``s1`` and ``s2`` are (computed at run time, or with 0 entries): when
the inferred shape of Reshape(Reshape(x)) is the inferred shape of ``x``, every dim a known size or the
same symbol (ONNX gives one symbol one size), the pair is the identity and both go. A decoder's
``[B, S, N*H] -> [B, S, N, H] -> [B, S, N*H]`` around GroupQueryAttention is one: ONNX Runtime copies
the tensor at each Reshape (Gemma 3 270M: 72 of them per token).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import bypass, int_list, producer, single_consumer

logger = logging.getLogger(__name__)


class MergeReshapes(Pass):
    """Replaces Reshape(Reshape(x, s1), s2) with Reshape(x, s2)."""

    def run(self, graph: gs.Graph) -> PassResult:
        merged = 0
        for outer in [n for n in graph.nodes if n.op == "Reshape"]:
            inner = producer(outer.inputs[0])
            if inner is None or inner.op != "Reshape":
                continue
            if _round_trip(inner.inputs[0], outer.outputs[0]) and single_consumer(inner.outputs[0], graph):
                outer.inputs[0] = inner.inputs[0]  # Reshape(x, s2) is x: both shapes are equal
                if reason := bypass(outer, graph):
                    logger.debug("keep %s as one Reshape: %s", outer.name, reason)
                merged += 1
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


def _round_trip(source: gs.Tensor, result: gs.Tensor) -> bool:
    """True when both shapes are fully known (sizes or symbols) and equal."""
    shapes = [t.shape for t in (source, result)]
    if any(shape is None or any(d is None or (isinstance(d, int) and d < 0) for d in shape) for shape in shapes):
        return False
    return list(shapes[0]) == list(shapes[1])
