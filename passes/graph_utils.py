"""Small helpers for matching on onnx-graphsurgeon graphs (no rewriting here)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes ``tensor``, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output), else None."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        return np.asarray(node.attrs["value"].values)
    return None


def single_consumer(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """True when exactly one node reads ``tensor`` and it is not a graph output."""
    return len(tensor.outputs) == 1 and all(t is not tensor for t in graph.outputs)


def is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is tensor for t in graph.outputs)


def bypass(node: gs.Node, graph: gs.Graph) -> str | None:
    """Remove a single-input pass-through node so its readers read its input instead.

    When the node writes a graph output, the producer of its input writes that output directly,
    so graph output names never change. Returns why it could not (None on success).
    """
    src, dst = node.inputs[0], node.outputs[0]
    if is_graph_output(dst, graph):
        if is_graph_output(src, graph) or any(t is src for t in graph.inputs) or not src.inputs:
            return "it copies a graph input, constant or output to a graph output"
        for consumer in list(src.outputs):
            if consumer is not node:
                consumer.inputs[[i for i, t in enumerate(consumer.inputs) if t is src][0]] = dst
        writer = src.inputs[0]
        writer.outputs[[i for i, t in enumerate(writer.outputs) if t is src][0]] = dst
    else:
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
    node.inputs.clear()
    node.outputs.clear()
    return None


def replace_uses(old: gs.Tensor, new: gs.Tensor, graph: gs.Graph) -> bool:
    """Point every reader of ``old`` at ``new``; False (nothing done) if ``old`` is a graph output."""
    if is_graph_output(old, graph):
        return False
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    return True


def int_list(tensor: gs.Tensor | None) -> list[int] | None:
    value = constant_value(tensor)
    return None if value is None or value.dtype.kind not in "iu" else [int(v) for v in value.reshape(-1)]


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor name not yet used in ``graph`` (node names may be empty or repeated)."""
    taken = graph.tensors()
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
