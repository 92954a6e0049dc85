"""Remove nodes that compute nothing at inference time: ``Identity``, inference ``Dropout``,
and nodes and initializers no graph output depends on. Unused graph inputs are kept: removing
one would change the model's signature, which the input spec and the runtime rely on.

An Identity's consumers read its input instead. When the Identity produces a graph output,
the producer of its input writes the graph output directly, so output names never change.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import bypass

logger = logging.getLogger(__name__)


def _is_passthrough(node: gs.Node) -> str | None:
    """Why ``node`` is not a pass-through (None when it is one)."""
    if node.op == "Identity":
        return None
    if node.op != "Dropout":
        return "not Identity or Dropout"
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return "the dropout mask is used"
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None and training.name and not (isinstance(training, gs.Constant) and not training.values.any()):
        return "training_mode is not a constant false"
    return None


class Cleanup(Pass):
    """Replaces Identity(x) and inference Dropout(x) with x; drops dead nodes and initializers."""

    def run(self, graph: gs.Graph) -> PassResult:
        removed = 0
        for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
            if reason := _is_passthrough(node) or bypass(node, graph):
                logger.debug("keep %s: %s", node.name, reason)
                continue
            removed += 1
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        dead = before - len(graph.nodes) - removed
        stats = {k: v for k, v in {"passthrough": removed, "dead": max(dead, 0)}.items() if v}
        return PassResult(changed=bool(stats), stats=stats)
