"""GELU subgraphs -> one GELU node.

erf form:  0.5 * x * (1 + erf(x / sqrt(2)))                       (x / sqrt 2 may be x * 1/sqrt 2)
tanh form: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))   (x^3 as Pow(x, 3) or x*x*x)

The three products (x, 0.5, the 1 + ... factor) are matched in the orders exporters write them.
Target ``trt``: the standard ``Gelu`` (opset 20, ``approximate="none"|"tanh"``) and only when the
graph's opset is at least 20; below that TensorRT fuses the pattern itself and nothing changes.
Target ``ort``: ONNX Runtime's contrib ``com.microsoft.Gelu`` / ``FastGelu`` at any opset.
"""

from __future__ import annotations

import logging
import math

import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, producer

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def _is_const(tensor: gs.Tensor, value: float, rtol: float = 1e-3) -> bool:
    v = constant_value(tensor)
    return v is not None and v.size == 1 and math.isclose(float(v.reshape(-1)[0]), value, rel_tol=rtol)


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The other input of a binary node, given one of them."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is tensor else None


def _sole_reader(tensor: gs.Tensor, op: str) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 and tensor.outputs[0].op == op else None


def _erf_input(erf: gs.Node) -> gs.Tensor | None:
    """x, when erf reads x / sqrt(2) or x * (1 / sqrt(2))."""
    scaled = producer(erf.inputs[0])
    if scaled is None or scaled.op not in ("Div", "Mul"):
        return None
    x, c = scaled.inputs
    want = math.sqrt(2.0) if scaled.op == "Div" else 1 / math.sqrt(2.0)
    return x if _is_const(c, want) else None


def _cube_of(tensor: gs.Tensor) -> gs.Tensor | None:
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Pow" and _is_const(node.inputs[1], 3.0):
        return node.inputs[0]
    if node.op == "Mul":  # x * x * x as Mul(Mul(x, x), x) in either order
        for sq, x in (node.inputs, node.inputs[::-1]):
            inner = producer(sq)
            if inner is not None and inner.op == "Mul" and inner.inputs[0] is x and inner.inputs[1] is x:
                return x
    return None


def _tanh_input(tanh: gs.Node) -> gs.Tensor | None:
    """x, when tanh reads sqrt(2/pi) * (x + 0.044715 * x^3)."""
    scaled = producer(tanh.inputs[0])
    if scaled is None or scaled.op != "Mul":
        return None
    inner = next((t for t in scaled.inputs if _is_const(_other(scaled, t), math.sqrt(2 / math.pi))), None)
    add = producer(inner) if inner is not None else None
    if add is None or add.op != "Add":
        return None
    for x, cubic in (add.inputs, add.inputs[::-1]):
        term = producer(cubic)
        if term is not None and term.op == "Mul":
            cube = next((t for t in term.inputs if _is_const(_other(term, t), 0.044715)), None)
            if cube is not None and _cube_of(cube) is x:
                return x
    return None


def _product_end(one_plus: gs.Tensor, x: gs.Tensor) -> gs.Tensor | None:
    """The tensor equal to 0.5 * x * one_plus, following the Muls exporters write."""
    first = _sole_reader(one_plus, "Mul")
    if first is None:
        return None
    other = _other(first, one_plus)
    if other is x or _is_const(other, 0.5):
        second = _sole_reader(first.outputs[0], "Mul")
        if second is None:
            return None
        rest = _other(second, first.outputs[0])
        ok = _is_const(rest, 0.5) if other is x else rest is x
        return second.outputs[0] if ok else None
    half = producer(other) if other is not None else None  # (0.5 * x) * one_plus
    if half is not None and half.op == "Mul" and any(t is x for t in half.inputs) and _is_const(_other(half, x), 0.5):
        return first.outputs[0]
    return None


class FuseGelu(Pass):
    """Replaces the erf and tanh GELU subgraphs with one Gelu (standard or ONNX Runtime contrib)."""

    def __init__(self, target: str = "trt"):
        self.target = target

    def run(self, graph: gs.Graph) -> PassResult:
        if self.target == "trt" and graph.opset < 20:
            logger.debug("skip: standard Gelu needs opset 20, the graph has %d", graph.opset)
            return PassResult(False)
        fused = {"erf": 0, "tanh": 0}
        for anchor in [n for n in graph.nodes if n.op in ("Erf", "Tanh")]:
            kind = "erf" if anchor.op == "Erf" else "tanh"
            x = _erf_input(anchor) if kind == "erf" else _tanh_input(anchor)
            one = _sole_reader(anchor.outputs[0], "Add") if x is not None else None
            end = None
            if one is not None and _is_const(_other(one, anchor.outputs[0]), 1.0):
                end = _product_end(one.outputs[0], x)
            if end is None:
                logger.debug("skip %s: not a %s GELU", anchor.name, kind)
                continue
            self._replace(graph, x, end, kind, anchor.name)
            fused[kind] += 1
        stats = {k: v for k, v in fused.items() if v}
        if stats:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=bool(stats), stats=stats)

    def _replace(self, graph: gs.Graph, x: gs.Tensor, end: gs.Tensor, kind: str, name: str) -> None:
        writer = end.inputs[0]
        writer.outputs.clear()
        if self.target == "trt":
            graph.layer(op="Gelu", name=f"{name}_gelu", inputs=[x], outputs=[end],
                        attrs={"approximate": "none" if kind == "erf" else "tanh"})
        else:
            op = "Gelu" if kind == "erf" else "FastGelu"
            graph.nodes.append(gs.Node(op, f"{name}_gelu", inputs=[x], outputs=[end], domain=MS_DOMAIN))
