"""GroupQueryAttention's ``scale`` folded into the weight of the norm that makes its query (target ``ort``).

The op computes ``softmax(s * q . K^T)`` per query head. Where the query is made as

    q = R(norm(x) * w [+ b])    R: reshapes and a rotary embedding, both linear in their input

a rotary rotates pairs of values by its position's angle, so ``s * R(y) = R(s * y)``, and

    s * q = R(norm(x) * (s * w) [+ s * b])

GroupQueryAttention(scale=s) on q therefore equals GroupQueryAttention(scale=1) on the query made with the
weight ``s * w`` (and bias ``s * b``). When ``s`` is a power of two (Gemma 3: ``query_pre_attn_scalar`` 256 ->
1/16; a head size of 64 -> 1/8) every product involved is exact and the outputs are bit-identical; otherwise
they differ by one float rounding of ``s * w``.

Why: ONNX Runtime's CPU kernel computes each (row, head)'s ``q . K^T`` with one MLAS SGEMM call, which takes its
one-row kernel -- reading the keys where they lie in the cache -- only when alpha is 1. With any other scale a
decode step goes through the general path, which first copies that row's keys into a packed panel, once per
query head: the cost grows with rows, heads and context (docs/decisions/009-int4-weights.md, session 15).

Skipped, with the reason logged: a scale already 1, a query read through anything but reshapes and a rotary
(a packed q/k/v input, a projection with no norm after it: folding into a projection's weights would change the
weights a GGUF's blocks are carried into), a norm whose output is read elsewhere, a weight or bias that is not
a constant. A weight shared with another node is copied, not changed in place.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name, producer, single_consumer

logger = logging.getLogger(__name__)

NORMS = ("RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization")
LINEAR = ("Reshape", "RotaryEmbedding", "Squeeze", "Unsqueeze", "Identity")  # q's values, moved or rotated


class FoldAttentionScale(Pass):
    """Replaces GroupQueryAttention(R(norm(x) * w), scale=s) with GroupQueryAttention(R(norm(x) * s*w), scale=1)."""

    def run(self, graph: gs.Graph) -> PassResult:
        folded = 0
        for node in [n for n in graph.nodes if n.op == "GroupQueryAttention"]:
            match = self._match(node, graph)
            if isinstance(match, str):
                logger.debug("skip %s: %s", node.name, match)
                continue
            norm, scale = match
            for slot in range(1, len(norm.inputs)):  # the weight, and a LayerNormalization's bias
                norm.inputs[slot] = self._scaled(graph, norm.inputs[slot], scale)
            node.attrs["scale"] = 1.0
            folded += 1
        return PassResult(folded > 0, {"folded": folded} if folded else {})

    @staticmethod
    def _match(node: gs.Node, graph: gs.Graph):
        """(the norm, the scale), or why not."""
        scale = float(node.attrs.get("scale", 0.0))
        if scale == 0.0:  # the op's default: 1 / sqrt(head size)
            heads = int(node.attrs.get("num_heads", 0))
            width = node.inputs[0].shape[-1] if node.inputs[0].shape else None
            if not heads or not isinstance(width, int):
                return "its scale is the default 1/sqrt(head size) and the head size is not static"
            scale = 1.0 / float(np.sqrt(width // heads))
        if scale == 1.0:
            return "its scale is already 1"
        if len(node.inputs) < 3 or not node.inputs[1].name or not node.inputs[2].name:
            return "its query, keys and values arrive packed in one input"
        tensor, path = node.inputs[0], []
        while (step := producer(tensor)) is not None and step.op in LINEAR:
            if not single_consumer(tensor, graph):
                return f"{tensor.name} on the query's path is read elsewhere"
            path.append(step.op)
            tensor = step.inputs[0]
        if step is None or step.op not in NORMS:
            made = "a graph input" if step is None else f"a {step.op}"
            return f"the query comes from {made} through {path or 'nothing'}, not from a norm's weight"
        if not single_consumer(tensor, graph):
            return f"the norm {step.name}'s output is read elsewhere"
        if any(constant_value(t) is None for t in step.inputs[1:]):
            return f"the norm {step.name}'s weight or bias is not a constant"
        return step, scale

    @staticmethod
    def _scaled(graph: gs.Graph, tensor: gs.Tensor, scale: float) -> gs.Constant:
        """A new constant ``scale * tensor`` (the old one may be shared: left as it is)."""
        value = constant_value(tensor)
        return gs.Constant(fresh_name(graph, f"{tensor.name}_attention_scaled"),
                           (value * np.asarray(scale, dtype=value.dtype)).astype(value.dtype))
