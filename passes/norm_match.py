"""Matching helpers shared by the LayerNorm and RMSNorm fusions (no rewriting here)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.graph_utils import constant_value, int_list, producer


def reduce_axes(node: gs.Node) -> list[int] | None:
    """ReduceMean's axes (an attribute before opset 18, an input from 18), if constant and keepdims."""
    if node.op != "ReduceMean" or not node.attrs.get("keepdims", 1):
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    return int_list(node.inputs[1]) if len(node.inputs) > 1 else None


def trailing_axis(axes: list[int], rank: int | None) -> int | None:
    """The LayerNormalization ``axis`` when ``axes`` are the contiguous trailing dims, else None."""
    if rank is None and any(a >= 0 for a in axes):
        return None
    norm = sorted(a if a < 0 else a - rank for a in axes)
    return norm[0] if norm == list(range(-len(norm), 0)) else None


def squared(tensor: gs.Tensor) -> gs.Tensor | None:
    """x when tensor = Pow(x, 2) or Mul(x, x)."""
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Pow":
        exp = constant_value(node.inputs[1])
        return node.inputs[0] if exp is not None and exp.size == 1 and float(exp.reshape(-1)[0]) == 2.0 else None
    if node.op == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def rsqrt_of_mean_plus_eps(std: gs.Tensor) -> tuple[gs.Node, float] | None:
    """(ReduceMean node, eps) when std = Sqrt(Add(ReduceMean(...), eps))."""
    sqrt = producer(std)
    add = producer(sqrt.inputs[0]) if sqrt is not None and sqrt.op == "Sqrt" else None
    if add is None or add.op != "Add":
        return None
    for mean_t, eps_t in (add.inputs, add.inputs[::-1]):
        eps, mean = constant_value(eps_t), producer(mean_t)
        if eps is not None and eps.size == 1 and mean is not None and mean.op == "ReduceMean":
            return mean, float(eps.reshape(-1)[0])
    return None


def affine_tail(tensor: gs.Tensor, width: int | None, ops: tuple[str, ...] = ("Mul", "Add")):
    """Follow optional Mul(·, gamma) then Add(·, beta) by constants; return (end, gamma, beta)."""
    gamma = beta = None
    end = tensor
    for op in ops:
        if len(end.outputs) != 1 or end.outputs[0].op != op:
            continue
        node = end.outputs[0]
        other = node.inputs[1] if node.inputs[0] is end else node.inputs[0]
        value = constant_value(other)
        if value is None or value.ndim > 1 or (width is not None and value.size not in (1, width)):
            continue
        if op == "Mul":
            gamma = value
        else:
            beta = value
        end = node.outputs[0]
    return end, gamma, beta
