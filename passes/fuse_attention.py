"""Scaled-dot-product attention -> one attention op for ONNX Runtime (``ort`` target).

The block ``passes.attention_match`` recognises (every form the dynamo and TorchScript exporters write
for BERT-, DistilBERT-, MiniLM-, ViT- and GPT-2-style layers, eager or SDPA) becomes

    y = Attention(q, k, v, attn_mask=bias)        ONNX's standard op (opset 23), 3-D q, k, v [B, S|T, N*H],
                                                  q_num_heads = kv_num_heads = N, scale = a*b*c
    y = MultiHeadAttention(q, k, v, attention_bias=bias)   com.microsoft, where the graph's opset cannot be
                                                  raised to 23 (below 18, or an op whose meaning changed)

The standard op with 3-D inputs is the fastest form on ONNX Runtime's CPU provider
(docs/decisions/002-ort-attention-form.md). The mask goes in as the exporter built it: today's
transformers materialise padding and causal masks as [B, 1, S, T]; one broadcast over the query
positions ([B, 1, 1, T]) is expanded to [B, 1, S, T] first, since ONNX Runtime's CPU kernels index it by
query position (both ops refuse it otherwise). Shape reads of the removed context (legacy exports
compute the merge target from them) read q's head split instead, which has the same shape. The ``trt``
target has ``FuseStandardAttention``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.attention_match import AttentionMatch, attention_blocks
from passes.base import Pass, PassResult
from passes.fuse_standard_attention import ATTENTION_OPSET, full_bias, opset_blocker
from passes.graph_utils import fresh_name
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


class FuseAttention(Pass):
    """Replaces split-head scaled-dot-product attention with Attention (3-D) or com.microsoft.MultiHeadAttention."""

    requires = (InferShapes,)

    def __init__(self, target: str = "ort"):
        self.target = target

    def run(self, graph: gs.Graph) -> PassResult:
        if self.target != "ort":
            return PassResult(False)
        matches = attention_blocks(graph, logger)
        if not matches:
            return PassResult(False)
        blocker = opset_blocker(graph)
        if blocker:
            logger.debug("com.microsoft.MultiHeadAttention instead of Attention: %s", blocker)
            for m in [m for m in matches if m.keep_mask is not None]:
                logger.debug("skip %s: its -inf mask needs the standard op's boolean mask", m.softmax.name)
                matches.remove(m)
            if not matches:
                return PassResult(False)
        for match in matches:
            self._rewrite(graph, match, standard=blocker is None)
        if blocker is None:
            graph.opset = max(graph.opset, ATTENTION_OPSET)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        op = "MultiHeadAttention" if blocker else "Attention"
        return PassResult(changed=True, stats={"fused": len(matches), "op": op})

    @staticmethod
    def _rewrite(graph: gs.Graph, m: AttentionMatch, standard: bool) -> None:
        name = m.softmax.name or fresh_name(graph, "attention")
        bias = full_bias(graph, m, name, m.keep_mask if standard else None) if m.bias is not None else None
        merged = m.merge.outputs[0]
        if len(merged.shape or ()) == 3:
            m.merge.outputs.clear()
            out = merged
        else:  # [B*S, N*H] before a Gemm: the Reshape now reads [B, S, N*H]
            out = gs.Variable(fresh_name(graph, f"{name}_context"), dtype=np.float32)
            m.merge.inputs[0] = out
        if standard:
            attrs = {"q_num_heads": m.heads, "kv_num_heads": m.heads, "scale": m.scale}
            node = gs.Node(
                "Attention",
                f"{name}_attention",
                attrs,
                inputs=[m.q, m.k, m.v] + ([bias] if bias is not None else []),
                outputs=[out],
            )
        else:
            extra = [gs.Variable.empty(), gs.Variable.empty(), bias] if bias is not None else []
            node = gs.Node("MultiHeadAttention", f"{name}_mha", {"num_heads": m.heads, "scale": m.scale},
                           inputs=[m.q, m.k, m.v] + extra, outputs=[out], domain=MS_DOMAIN)
        graph.nodes.append(node)
        redirect_shape_reads(graph, m)


def redirect_shape_reads(graph: gs.Graph, m: AttentionMatch) -> None:
    """Shape reads of the removed context tensors read q's head split (permuted) instead."""
    for node, perm in m.shape_reads:
        node.inputs[0] = m.q_split
        if perm == sorted(perm):
            continue
        whole = gs.Variable(fresh_name(graph, f"{node.name}_q"), dtype=np.int64, shape=[4])
        out, node.outputs[0] = node.outputs[0], whole
        indices = gs.Constant(fresh_name(graph, f"{node.name}_perm"), np.array(perm, np.int64))
        graph.nodes.append(
            gs.Node("Gather", f"{node.name}_permute", {"axis": 0}, inputs=[whole, indices], outputs=[out])
        )
