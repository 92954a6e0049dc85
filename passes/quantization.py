"""What the INT8 passes share: which layers get Q/DQ and on which inputs (the placement TensorRT
fuses, also the units the sensitivity analysis may keep in float), node names for exclusion lists,
and symmetric per-channel weight scales. No pass here: ``QuantizeForTensorRT`` and
``QuantizeForOnnxRuntime`` import these rules instead of importing each other.

    q = round_half_even(clip(x / s, -128, 127)),  s = max|x| / 127  (per channel on the weight's
    output axis: Conv 0, ConvTranspose 1, Gemm 0 with transB else 1, MatMul [K, N] 1, Gather rows 0)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import constant_value, producer

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


def ensure_node_names(graph: gs.Graph) -> None:
    """Give unnamed or repeated nodes unique names: exclusion lists and the manifest use names."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op.lower()}_{i}"
        seen.add(node.name)


def weight_axis(node: gs.Node, weight: np.ndarray) -> int | None:
    """The per-channel axis of this op's constant weight (None: per-tensor)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return 1 if weight.ndim == 2 else None
    if node.op == "Gather":
        return 0 if weight.ndim == 2 else None
    return None


def symmetric_scale(values: np.ndarray, axis: int | None) -> np.ndarray:
    """max|x| / 127 per channel (or overall), never zero."""
    if axis is None:
        peak = np.abs(values).max(initial=0.0)
    else:
        peak = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
    return np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)


def quantize_symmetric(values: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    return np.clip(np.round(values / scale.reshape(shape)), -128, 127).astype(np.int8)


def quantized_inputs(node: gs.Node, graph_quantized: set[str]) -> list[tuple[int, str]]:
    """(input index, "weight" | "activation") this op gets Q/DQ on."""
    if node.op == "Add":
        convs = [i for i, t in enumerate(node.inputs) if producer(t) is not None and producer(t).op == "Conv"
                 and producer(t).name in graph_quantized]
        if len(convs) != 1 or constant_value(node.inputs[1 - convs[0]]) is not None:
            return []
        return [(1 - convs[0], "activation")]
    if node.op not in WEIGHTED:
        return []
    if node.op == "Gather":
        return [(0, "weight")] if constant_value(node.inputs[0]) is not None else []
    slots = [0, 1]
    out = []
    for i in slots:
        kind = "weight" if constant_value(node.inputs[i]) is not None else "activation"
        if kind == "weight" and i == 0:
            return []  # a constant left operand (rare): not a layout TensorRT fuses
        out.append((i, kind))
    return out


@dataclasses.dataclass(frozen=True)
class Unit:
    """What the sensitivity analysis keeps in float as one: an anchor layer and the nodes that follow it
    into the same quantized tensor (for ONNX Runtime, a Conv and its Relu), excluded together."""

    name: str  # the anchor node's name
    op: str
    nodes: tuple[str, ...]  # every node name excluded with it, the anchor first


def trt_units(graph: gs.Graph) -> list[Unit]:
    """The TensorRT form's units: each candidate layer on its own (Q/DQ sits only on their inputs)."""
    return [Unit(n.name, n.op, (n.name,)) for n in candidates(graph)]


def candidates(graph: gs.Graph) -> list[gs.Node]:
    """The layers this pass would quantize, in graph order (the sensitivity analysis's units)."""
    ensure_node_names(graph)
    chosen: set[str] = set()
    result = []
    for node in graph.nodes:
        if quantized_inputs(node, chosen):
            chosen.add(node.name)
            result.append(node)
    return result
