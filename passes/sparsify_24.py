"""2:4 structured sparsity for TensorRT's sparse kernels (``BuilderFlag.SPARSE_WEIGHTS``, Ampere and later).

NVIDIA's rule: along a layer's input channels, in every group of 4 consecutive channels, per output channel
and kernel position, at least 2 weights are zero; the input channels a multiple of 4. Eligible layers: a
``Conv`` of group 1 (``W [O, I, kh, kw]``, groups along ``I``), a ``MatMul`` by a constant ``B [K, N]``
(along ``K``), a linear ``Gemm`` (along ``K``: axis 1 of ``B`` with ``transB``). A layer whose weight another
node reads too is left alone (one weight, one decision).

In each group the 2 weights of largest magnitude stay and the other 2 become 0 (magnitude pruning, as
ModelOpt's and Apex's ASP one-shot 2:4 without retraining). The zeros survive the precision passes that
follow: FP16 conversion keeps 0 as 0, and symmetric INT8 quantization maps 0 to 0. ``dense`` names layers
kept dense (the build's budget search decides them: ``engines/build/sparsity.py``). The pass changes the
numbers by design, so it runs outside the verified pipelines.

``sparse_layers(model)`` reads which eligible layers of a graph hold the pattern (``planforge check-trt``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from passes.base import Pass, PassResult

GROUP = 4


def input_axis(op: str, attrs: dict, weight_shape: tuple[int, ...]) -> int | None:
    """The axis of a layer's weight that runs along its input channels, or None when not eligible."""
    if op == "Conv" and len(weight_shape) == 4 and attrs.get("group", 1) == 1:
        axis = 1
    elif op == "MatMul" and len(weight_shape) == 2:
        axis = 0
    elif op == "Gemm" and len(weight_shape) == 2 and attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA", 0):
        axis = 1 if attrs.get("transB", 0) else 0
    else:
        return None
    return axis if weight_shape[axis] % GROUP == 0 else None


def sparsify(weight: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` with the 2 smallest-magnitude of every 4 consecutive values along ``axis`` set to 0."""
    moved = np.moveaxis(weight, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, GROUP)
    order = np.argsort(np.abs(groups), axis=-1, kind="stable")
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[..., :2], False, axis=-1)
    return np.moveaxis(np.where(mask, groups, 0).reshape(moved.shape), -1, axis).astype(weight.dtype)


def holds_pattern(weight: np.ndarray, axis: int) -> bool:
    """Every group of 4 along ``axis`` has at least 2 zeros."""
    moved = np.moveaxis(weight, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, GROUP)
    return bool(np.all(np.sum(groups == 0, axis=-1) >= 2))


def eligible(graph: gs.Graph) -> list[tuple[gs.Node, gs.Constant, int]]:
    """(layer, weight, input axis) of every eligible layer (module docstring), in graph order."""
    uses: dict[int, int] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    found = []
    for node in graph.nodes:
        if node.op not in ("Conv", "MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or uses.get(id(weight), 0) != 1 \
                or weight.values.dtype.kind != "f":
            continue
        axis = input_axis(node.op, node.attrs, weight.values.shape)
        if axis is not None:
            found.append((node, weight, axis))
    return found


class Sparsify24(Pass):
    """Makes every eligible layer's weight 2:4 sparse along its input channels, but the ``dense`` ones."""

    def __init__(self, dense: tuple[str, ...] | frozenset = (), only: tuple[str, ...] | None = None):
        self.dense, self.only = frozenset(dense), None if only is None else frozenset(only)

    def run(self, graph: gs.Graph) -> PassResult:
        done = []
        layers = eligible(graph)
        for node, weight, axis in layers:
            if node.name in self.dense or (self.only is not None and node.name not in self.only):
                continue
            weight.values = sparsify(weight.values, axis)
            done.append(node.name)
        return PassResult(bool(done), {"eligible": len(layers), "sparse": len(done), "layers": done})


def sparse_layers(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(eligible layers, those whose weight holds the 2:4 pattern) of ``model``, by node name; an INT8 layer's
    weight is read through its DequantizeLinear (zeros stay zeros)."""
    weights = {i.name: i for i in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node  # an INT8 graph: the weight's DequantizeLinear
                   if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    reads: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    names, sparse = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        source = dequantized.get(node.input[1], node.input[1])
        if source not in weights:
            continue
        init = weights[source]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis = input_axis(node.op_type, attrs, tuple(init.dims))
        kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8)
        if axis is None or reads[node.input[1]] != 1 or init.data_type not in kinds:
            continue
        names.append(node.name)
        if holds_pattern(numpy_helper.to_array(init), axis):
            sparse.append(node.name)
    return names, sparse


__all__ = ["GROUP", "Sparsify24", "eligible", "holds_pattern", "input_axis", "sparse_layers", "sparsify"]
