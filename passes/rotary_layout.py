"""Rotary embeddings in the ``[B, S, N*H]`` layout GroupQueryAttention reads (target ``ort``).

A decoder's export computes each head's query and key as

    x [B, S, N*H] -> Reshape [B, S, N, H] -> Transpose(0,2,1,3) [B, N, S, H] -> norm over H (Gemma's q/k norm,
    zero or more) -> RotaryEmbedding (4-D) -> ...

and ``FuseGroupQueryAttention`` gives the op the ``[B, S, N*H]`` it takes by a Transpose back and a Reshape.
Both layouts hold the same numbers per (token, head): a norm over the last axis (H) does not see the order of
the other axes, and ONNX's RotaryEmbedding (opset 23) takes the same tensor as ``[B, S, N*H]`` with a
``num_heads`` attribute, rotating each head's H values by its token's position (cos/sin ``[B, S, H/2]``, or
gathered by ``position_ids``, in both forms). So

    Reshape [B, S, N, H] -> norms -> Reshape [B, S, N*H] -> RotaryEmbedding(num_heads=N) -> GroupQueryAttention

computes the same values with both Transposes gone (each one a copy of the tensor in ONNX Runtime); the pass
leaves one Reshape (a view) in place of the Transpose + Reshape. Gemma 3 270M: 72 Transposes and 36 Reshapes
fewer per token (docs/decisions/009-int4-weights.md, "Fewer copies").

Skipped, with the reason logged: a Transpose that is not (0, 2, 1, 3), a norm over other axes than the last, a
tensor of the chain read by another node or a graph output, a head count or size not static, a RotaryEmbedding
of another domain (the contrib op orders its inputs differently), a chain that does not end in a Reshape to
``[B, S, N*H]``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import fresh_name, int_list, is_graph_output, producer, replace_uses, single_consumer
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

SWAP = [0, 2, 1, 3]  # [B, S, N, H] <-> [B, N, S, H]
NORMS = ("RMSNormalization", "SimplifiedLayerNormalization")


class RotaryLayout(Pass):
    """Transpose -> norms -> RotaryEmbedding -> Transpose -> Reshape  ->  norms -> Reshape -> RotaryEmbedding."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        moved = 0
        for rotary in [n for n in graph.nodes if n.op == "RotaryEmbedding"]:
            match = self._match(rotary, graph)
            if isinstance(match, str):
                logger.debug("skip %s: %s", rotary.name, match)
                continue
            first, norms, back, flat, heads, size = match
            source = first.inputs[0]  # [B, S, N, H]
            (norms[0] if norms else rotary).inputs[0] = source
            for norm in norms:
                norm.outputs[0].shape = None  # [B, S, N, H] now: inferred again
            last = norms[-1].outputs[0] if norms else source
            rows = gs.Variable(fresh_name(graph, f"{last.name}_bsd"), dtype=last.dtype)
            graph.layer(op="Reshape", name=rows.name, inputs=[last, gs.Constant(
                fresh_name(graph, "rotary_bsd_shape"), np.array([0, 0, heads * size], np.int64))], outputs=[rows])
            rotary.inputs[0] = rows
            rotary.attrs["num_heads"] = heads
            out = rotary.outputs[0]
            out.shape = None  # [B, S, N*H] now: inferred again
            replace_uses(flat.outputs[0], out, graph)  # not a graph output (_match): the old [B, S, N*H]'s readers
            for node in (first, back, flat):
                node.inputs.clear()
                node.outputs.clear()
            moved += 1
        if moved:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(moved > 0, {"moved": moved} if moved else {})

    @staticmethod
    def _match(rotary: gs.Node, graph: gs.Graph):
        """(first Transpose, norms in order, back Transpose, Reshape, heads, head size), or why not."""
        if rotary.domain not in (None, "", "ai.onnx"):
            return f"a RotaryEmbedding of domain {rotary.domain!r} (its inputs are ordered differently)"
        shape = rotary.inputs[0].shape
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1::2]):
            return f"its input is not [B, N, S, H] with N and H static ({shape})"
        heads, size = int(shape[1]), int(shape[3])
        norms, node = [], producer(rotary.inputs[0])
        while node is not None and node.op in NORMS:
            if int(node.attrs.get("axis", -1)) not in (-1, 3):
                return f"the norm {node.name} is not over the last axis alone"
            if not single_consumer(node.outputs[0], graph) or any(o.outputs for o in node.outputs[1:]):
                return f"the norm {node.name}'s outputs are read elsewhere"
            norms.insert(0, node)
            node = producer(node.inputs[0])
        first = node
        if first is None or first.op != "Transpose" or list(first.attrs.get("perm", [])) != SWAP:
            return "the chain does not start with a Transpose (0, 2, 1, 3)"
        if not single_consumer(first.outputs[0], graph):
            return "the first Transpose's output is read elsewhere"
        if not single_consumer(rotary.outputs[0], graph):
            return "the rotary's output is read elsewhere"
        back = rotary.outputs[0].outputs[0]
        if back.op != "Transpose" or list(back.attrs.get("perm", [])) != SWAP or \
                not single_consumer(back.outputs[0], graph):
            return "its output does not go through one Transpose (0, 2, 1, 3)"
        flat = back.outputs[0].outputs[0]
        if flat.op != "Reshape" or is_graph_output(flat.outputs[0], graph):
            return f"the chain ends in a {flat.op} or a graph output, not a Reshape"
        target, out = int_list(flat.inputs[1]), flat.outputs[0].shape
        if target not in ([0, 0, heads * size], [0, 0, -1]) and not (
                out is not None and len(out) == 3 and out[-1] == heads * size):
            return f"the chain does not end in a Reshape to [B, S, {heads * size}] ({target}, {out})"
        return first, norms, back, flat, heads, size
