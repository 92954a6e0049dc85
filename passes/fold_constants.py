"""Constant folding with onnx-graphsurgeon, strictly.

graphsurgeon evaluates every subgraph whose inputs are all constants with ONNX Runtime and
replaces it by its value. Two changes from its defaults: ``error_ok=False`` (a failure is an
error naming the cause, not a warning and an unchanged graph) and a size threshold, so that a
constant-producing node with a huge output (an ``Expand`` to activations' size, say) is not
materialized as a weight.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from foundation.errors import PassError
from passes.base import Pass, PassResult
from passes.verify import session

logger = logging.getLogger(__name__)

SIZE_THRESHOLD = 16 << 20  # bytes: outputs larger than this stay computed at run time
SEQUENCE_OPS = {"SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence",
                "SequenceMap"}


def _graphs(graph: gs.Graph):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from _graphs(value)


def _failing_node(graph: gs.Graph) -> gs.Node | None:
    """The first node with only constant inputs that ONNX Runtime cannot evaluate on its own.

    graphsurgeon evaluates the whole constant subgraph in one session, so its error may not
    say which node failed; this runs each candidate alone (only after a failure).
    """

    for node in graph.nodes:
        if not node.inputs or not all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
            continue
        single = gs.Graph(nodes=[node.copy()], inputs=[], outputs=[], opset=graph.opset)
        single.nodes[0].outputs = [gs.Variable(o.name, dtype=o.dtype) for o in node.outputs]
        single.outputs = list(single.nodes[0].outputs)
        single.ir_version = graph.ir_version or 10
        try:
            session(gs.export_onnx(single, do_type_check=False)).run(None, {})
        except Exception:  # noqa: BLE001 - this is the node we are looking for
            return node
    return None


class FoldConstants(Pass):
    """Replaces subgraphs of constants with their computed values."""

    def __init__(self, size_threshold: int = SIZE_THRESHOLD):
        self.size_threshold = size_threshold

    def run(self, graph: gs.Graph) -> PassResult:
        graphs = list(_graphs(graph))
        if any(n.op in SEQUENCE_OPS for g in graphs for n in g.nodes):
            # graphsurgeon's folding crashes on sequence values ('list' object has no attribute
            # 'nbytes'); ONNX's backend cases with sequences showed it. Fold nothing rather than guess.
            logger.warning("constant folding skipped: the graph holds sequence values, which "
                           "onnx-graphsurgeon's folding cannot handle")
            return PassResult(False, {"skipped": "sequence values"})
        for sub in graphs:  # subgraphs carry no IR version; graphsurgeon would hand ORT IR 14
            sub.ir_version = graph.ir_version or 10
        before = len(graph.nodes)
        try:
            graph.toposort()
            # fold_shapes=False: graphsurgeon ignores Shape's start/end; FoldShapes does that part.
            graph.fold_constants(error_ok=False, size_threshold=self.size_threshold, fold_shapes=False,
                                 flatten_subgraphs=False).cleanup()
        except Exception as exc:  # graphsurgeon re-raises ORT's and its own errors
            culprit = _failing_node(graph)
            where = f"node {culprit.name or '(unnamed)'} ({culprit.op})" if culprit else "a constant subgraph"
            raise PassError(
                f"constant folding failed at {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
                "The graph computes something invalid from constants; fix the model that produced it"
            ) from exc
        folded = before - len(graph.nodes)
        return PassResult(changed=folded > 0, stats={"folded": folded} if folded else {})
