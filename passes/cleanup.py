"""Remove nodes that compute nothing at inference time: ``Identity``, inference ``Dropout``,
and nodes and initializers no graph output depends on.

An Identity's consumers read its input instead. When the Identity produces a graph output,
the producer of its input writes the graph output directly, so output names never change.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult

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
    """Replaces Identity(x) and inference Dropout(x) with x; drops dead nodes."""

    def run(self, graph: gs.Graph) -> PassResult:
        removed = 0
        graph_outputs = {id(t) for t in graph.outputs}  # gs tensors are unhashable
        graph_inputs = {id(t) for t in graph.inputs}
        for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
            if reason := _is_passthrough(node):
                logger.debug("keep %s: %s", node.name, reason)
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if id(dst) in graph_outputs:
                if id(src) in graph_outputs or id(src) in graph_inputs or not src.inputs:
                    logger.debug("keep %s: it copies a graph input, constant or output to an output", node.name)
                    continue
                for consumer in list(src.outputs):
                    if consumer is not node:
                        consumer.inputs[consumer.inputs.index(src)] = dst
                producer = src.inputs[0]
                producer.outputs[producer.outputs.index(src)] = dst
            else:
                for consumer in list(dst.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is dst:
                            consumer.inputs[i] = src
            node.inputs.clear()
            node.outputs.clear()
            removed += 1
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        dead = before - len(graph.nodes) - removed
        stats = {k: v for k, v in {"passthrough": removed, "dead": max(dead, 0)}.items() if v}
        return PassResult(changed=bool(stats), stats=stats)
