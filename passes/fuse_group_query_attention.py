"""A decoder's attention over its KV cache -> ONNX Runtime's ``GroupQueryAttention`` (target ``ort``).

For each ``Attention`` that ``cache_attention_match`` recognises (the cache concatenated onto a graph
input, repeat_kv, a causal / padding / sliding-window mask), one ``com.microsoft`` node computes

    out_i = softmax(scale * q_i . K[:t]^T, keys j with t - W < j <= i) . V[:t]    per query head, its kv group

and writes this step's keys and values into the cache itself:

    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length)
        -> out [B, S, heads*H], present_key, present_value
    seqlens_k = ReduceSum(attention_mask, axis 1) - 1  (int32 [B]),  total = attention_mask.shape[1] (int32)

q, k and v arrive as ``[B, heads, S, H]`` with positions applied (the graph's RotaryEmbedding stays in
front, so ``position_ids`` keeps its meaning); they go in as ``[B, S, heads*H]`` and the output returns to
``[B, heads, S, H]`` for the graph's own Transpose/Reshape, which the merge passes then cancel.
``local_window_size`` is the mask's W (Hugging Face's ``sliding_window``: the op shows key j iff
i - j < W, measured in docs/decisions/008), ``scale`` and ``softcap`` are the Attention's.

What changes for a runtime, and why the bundle says so (``DecoderInfo.cache == "shared"``): the padding is
no longer read from the mask but from the row lengths, so a batch is padded on the **right**; and past and
present may be one ``[B, kv_heads, max_length, H]`` buffer that the op writes in place (the present is
``max(past, total)`` long), which is how ``engines.runtime.generate`` runs it: one cache for the whole
generation, no copy per token. Unpadded inputs with a past of exactly ``total - S`` give the original
graph's outputs (what the pass manager verifies).

Skipped, with the reason logged: an Attention that is not over a cache (an encoder's), a mask with any
other rule (ALiBi, a custom bias), query heads that are not a multiple of the kv heads, heads or sizes not
static, a present that is not the graph's output.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.cache_attention_match import CacheAttention, cache_attentions
from passes.graph_utils import fresh_name
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
INT32 = onnx.TensorProto.INT32


class FuseGroupQueryAttention(Pass):
    """Attention over a concatenated KV cache -> GroupQueryAttention with a shared past/present buffer."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        matches = cache_attentions(graph, logger)
        if not matches:
            return PassResult(False)
        lengths: dict[str, tuple[gs.Tensor, gs.Tensor]] = {}
        for m in matches:
            if m.attention_mask.name not in lengths:
                lengths[m.attention_mask.name] = self._lengths(graph, m.attention_mask)
            self._rewrite(graph, m, *lengths[m.attention_mask.name])
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        windows = sorted({m.window for m in matches if m.window})
        return PassResult(True, {"fused": len(matches), "sliding": sum(1 for m in matches if m.window),
                                 **({"windows": windows} if windows else {})})

    @staticmethod
    def _lengths(graph: gs.Graph, mask: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
        """seqlens_k (each row's length - 1, int32 [B]) and total_sequence_length (int32 scalar), as genai's
        builder computes them from the mask."""
        def var(base, dtype, shape):
            return gs.Variable(fresh_name(graph, base), dtype=dtype, shape=shape)

        summed = var("gqa_mask_sum", np.int64, [mask.shape[0] if mask.shape else None])
        graph.layer(op="ReduceSum", name=summed.name, inputs=[mask, gs.Constant(fresh_name(graph, "gqa_axis1"),
                    np.array([1], np.int64))], outputs=[summed], attrs={"keepdims": 0})
        last = var("gqa_last_index", np.int64, summed.shape)
        graph.layer(op="Sub", name=last.name, inputs=[summed, gs.Constant(fresh_name(graph, "gqa_one"),
                    np.array(1, np.int64))], outputs=[last])
        seqlens = var("gqa_seqlens_k", np.int32, summed.shape)
        graph.layer(op="Cast", name=seqlens.name, inputs=[last], outputs=[seqlens], attrs={"to": INT32})
        width = var("gqa_total_1d", np.int64, [1])
        graph.layer(op="Shape", name=width.name, inputs=[mask], outputs=[width], attrs={"start": 1, "end": 2})
        squeezed = var("gqa_total_i64", np.int64, [])
        graph.layer(op="Squeeze", name=squeezed.name, inputs=[width], outputs=[squeezed])
        total = var("gqa_total", np.int32, [])
        graph.layer(op="Cast", name=total.name, inputs=[squeezed], outputs=[total], attrs={"to": INT32})
        return seqlens, total

    @staticmethod
    def _rewrite(graph: gs.Graph, m: CacheAttention, seqlens: gs.Tensor, total: gs.Tensor) -> None:
        def to_bsd(tensor: gs.Tensor, heads: int) -> gs.Tensor:  # [B, N, S, H] -> [B, S, N*H]
            bsnh = gs.Variable(fresh_name(graph, f"{tensor.name}_bsnh"), dtype=tensor.dtype)
            graph.layer(op="Transpose", name=bsnh.name, inputs=[tensor], outputs=[bsnh], attrs={"perm": [0, 2, 1, 3]})
            flat = gs.Variable(fresh_name(graph, f"{tensor.name}_bsd"), dtype=tensor.dtype)
            graph.layer(op="Reshape", name=flat.name, inputs=[bsnh, gs.Constant(
                fresh_name(graph, "gqa_bsd_shape"), np.array([0, 0, heads * m.head_dim], np.int64))], outputs=[flat])
            return flat

        q, k, v = to_bsd(m.query, m.heads), to_bsd(m.key, m.kv_heads), to_bsd(m.value, m.kv_heads)
        for present in (m.present_key, m.present_value):  # the Concat gives up the graph outputs to the op
            concat = present.inputs[0]
            concat.outputs[0] = gs.Variable(fresh_name(graph, f"{present.name}_concat"), dtype=present.dtype)
        out = m.node.outputs[0]
        m.node.outputs.clear()
        m.node.inputs.clear()
        shape = m.query.shape  # [B, N, S, H]: the op's output is [B, S, N*H] (which MergeReshapes reads)
        fused = gs.Variable(fresh_name(graph, f"{m.node.name}_gqa"), dtype=out.dtype, shape=[
            shape[0], shape[2], m.heads * m.head_dim] if shape is not None and len(shape) == 4 else None)
        attrs = {"num_heads": m.heads, "kv_num_heads": m.kv_heads, "scale": m.scale,
                 "local_window_size": m.window if m.window else -1}
        if m.softcap:
            attrs["softcap"] = m.softcap
        graph.layer(op="GroupQueryAttention", name=f"{m.node.name}_gqa", domain=MS_DOMAIN, attrs=attrs,
                    inputs=[q, k, v, m.past_key, m.past_value, seqlens, total],
                    outputs=[fused, m.present_key, m.present_value])
        split = gs.Variable(fresh_name(graph, f"{fused.name}_bsnh"), dtype=out.dtype)
        graph.layer(op="Reshape", name=split.name, inputs=[fused, gs.Constant(
            fresh_name(graph, "gqa_bsnh_shape"), np.array([0, 0, m.heads, m.head_dim], np.int64))], outputs=[split])
        graph.layer(op="Transpose", name=f"{split.name}_bnsh", inputs=[split], outputs=[out],
                    attrs={"perm": [0, 2, 1, 3]})
