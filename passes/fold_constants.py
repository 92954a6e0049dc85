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

from exporter.errors import PassError
from passes.base import Pass, PassResult

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
        except Exception as exc:  # noqa: BLE001 - graphsurgeon re-raises ORT's and its own errors
            raise PassError(
                f"constant folding failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
                "Run with -v to see the node; disable folding with --skip-pass FoldConstants to build anyway"
            ) from exc
        folded = before - len(graph.nodes)
        return PassResult(changed=folded > 0, stats={"folded": folded} if folded else {})
