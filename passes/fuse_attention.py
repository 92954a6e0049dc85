"""Multi-head self-attention -> ONNX Runtime's contrib ``com.microsoft.MultiHeadAttention`` (``ort`` only).

Matched from the Softmax outwards, in the form exporters write with heads split by
Reshape + Transpose:

    q4 = Transpose(Reshape(q, [B, S, N, H]), [0, 2, 1, 3])        likewise v4; k4 transposed to [0, 2, 3, 1]
    p  = Softmax(MatMul(q4, k4) / sqrt(H) [+ attention_bias])      (or * scale)
    y  = Reshape(Transpose(MatMul(p, v4), [0, 2, 1, 3]), [B, S, N*H])

becomes ``y = MultiHeadAttention(q, k, v, attention_bias=...)`` with ``num_heads=N`` and the same
scale. The attention bias must already have the full [B|1, N|1, S, T] shape ONNX Runtime wants;
a bias broadcast over the query positions (BERT's padding mask, [B, 1, 1, T]) is left alone, as is
attention over a KV cache concatenated inside the graph (the past is not a plain projection).
N and H come from shape inference. The ``trt`` target never runs this pass: TensorRT fuses
attention itself and rejects contrib ops.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, producer
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def _transpose_of_reshape(tensor: gs.Tensor, perm: list[int]) -> gs.Tensor | None:
    """The 3-D tensor x when ``tensor`` = Transpose(Reshape(x, [B, S, N, H]), perm)."""
    t = producer(tensor)
    if t is None or t.op != "Transpose" or list(t.attrs.get("perm", [])) != perm:
        return None
    r = producer(t.inputs[0])
    if r is None or r.op != "Reshape" or len(t.inputs[0].outputs) != 1:
        return None
    x = r.inputs[0]
    return x if x.shape is not None and len(x.shape) == 3 else None


def _scale(tensor: gs.Tensor) -> tuple[gs.Tensor, float] | None:
    """(scores, scale) when tensor = scores / c or scores * c with a scalar constant c."""
    node = producer(tensor)
    if node is None or node.op not in ("Div", "Mul"):
        return None
    c = constant_value(node.inputs[1])
    if c is None or c.size != 1:
        return None
    value = float(c.reshape(-1)[0])
    return node.inputs[0], (1.0 / value if node.op == "Div" else value)


class FuseAttention(Pass):
    """Replaces split-head scaled-dot-product attention with com.microsoft.MultiHeadAttention."""

    requires = (InferShapes,)

    def __init__(self, target: str = "ort"):
        self.target = target

    def run(self, graph: gs.Graph) -> PassResult:
        if self.target != "ort":
            return PassResult(False)
        fused = 0
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            match = self._match(softmax)
            if isinstance(match, str):
                logger.debug("skip %s: %s", softmax.name, match)
                continue
            q, k, v, bias, scale, heads, end = match
            end.inputs[0].outputs.clear()
            inputs = [q, k, v, gs.Variable.empty(), gs.Variable.empty(), bias if bias is not None else gs.Variable.empty()]
            while inputs and not inputs[-1].name:
                inputs.pop()
            graph.nodes.append(gs.Node("MultiHeadAttention", f"{softmax.name}_mha", {"num_heads": heads, "scale": scale},
                                       inputs=inputs, outputs=[end], domain=MS_DOMAIN))
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=fused > 0, stats={"fused": fused} if fused else {})

    @staticmethod
    def _match(softmax: gs.Node):
        if softmax.attrs.get("axis", -1) not in (-1, 3):
            return "softmax is not over the last axis"
        pre, bias = softmax.inputs[0], None
        add = producer(pre)
        if add is not None and add.op == "Add":
            for scores_t, bias_t in (add.inputs, add.inputs[::-1]):
                if _scale(scores_t) is not None:
                    pre, bias = scores_t, bias_t
                    break
        scaled = _scale(pre)
        if scaled is None:
            return "no scalar scale before the softmax"
        scores, scale = scaled
        qk = producer(scores)
        if qk is None or qk.op != "MatMul":
            return "the scores are not MatMul(q, k)"
        q = _transpose_of_reshape(qk.inputs[0], [0, 2, 1, 3])
        k = _transpose_of_reshape(qk.inputs[1], [0, 2, 3, 1])
        if q is None or k is None:
            return "q or k is not a head split of a 3-D tensor"
        shape4 = qk.inputs[0].shape
        if shape4 is None or not isinstance(shape4[1], int) or not isinstance(shape4[3], int):
            return "the number of heads or the head size is not known"
        heads = int(shape4[1])
        if len(softmax.outputs[0].outputs) != 1:
            return "the probabilities have other readers"
        pv = softmax.outputs[0].outputs[0]
        if pv.op != "MatMul" or pv.inputs[0] is not softmax.outputs[0]:
            return "the probabilities do not multiply v"
        v = _transpose_of_reshape(pv.inputs[1], [0, 2, 1, 3])
        if v is None:
            return "v is not a head split of a 3-D tensor"
        if len(pv.outputs[0].outputs) != 1 or pv.outputs[0].outputs[0].op != "Transpose":
            return "the context is not transposed back"
        back = pv.outputs[0].outputs[0]
        if list(back.attrs.get("perm", [])) != [0, 2, 1, 3] or len(back.outputs[0].outputs) != 1:
            return "the context transpose is not [0, 2, 1, 3]"
        merge = back.outputs[0].outputs[0]
        if merge.op != "Reshape":
            return "the heads are not merged by a Reshape"
        if bias is not None:
            bshape = bias.shape
            if bshape is None or len(bshape) != 4 or bshape[2] == 1 and shape4[2] != 1:
                return "the attention bias is not [B|1, N|1, S, T] (a padding mask broadcast over S)"
            if np.dtype(bias.dtype or np.float32) != np.dtype(np.float32):
                return "the attention bias is not float32"
        return q, k, v, bias, float(scale), heads, merge.outputs[0]
