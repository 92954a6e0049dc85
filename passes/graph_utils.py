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
