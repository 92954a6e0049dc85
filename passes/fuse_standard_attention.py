"""Scaled-dot-product attention -> ONNX's standard ``Attention`` (opset 23), for the ``trt`` target.

The block ``passes.attention_match`` recognises becomes

    y4 = Attention(q4, k4, v4, attn_mask=bias)        scale=a*b*c;   q4, k4, v4: [B, N, S|T, H]

and the head merge after it stays as it was. TensorRT's ONNX parser (11.1) takes ``Attention`` with
4-D Q, K, V and mask and no KV-cache inputs or extra outputs, which is exactly this form; a bias of
another rank leaves the pattern unfused (TensorRT then fuses what it finds itself). A -inf mask
behind SDPA's NaN guard (the legacy exporter's form) goes in as its boolean condition, which gives the
guard's zeros for a fully masked row. ``check-trt`` validates the result.

The graph's opset is raised to 23 when it is lower (and at least 18), which only holds where every
op in the graph means the same at 23: between 18 and 23 most ops gained types only (bfloat16, float8,
int4), but ``GridSample`` renamed its modes (20), ``DFT`` moved ``axis`` to an input (20) and
``GroupNormalization`` changed its scale to per channel (21); a graph holding one of these is left
unfused, with the reason logged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.attention_match import AttentionMatch, attention_blocks
from passes.base import Pass, PassResult
from passes.graph_utils import fresh_name
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

ATTENTION_OPSET = 23
# Ops whose meaning changed between opset 18 and 23 (not only their types), from onnx's operator changelog.
CHANGED_SINCE_18 = {"GridSample": 20, "DFT": 20, "GroupNormalization": 21}


def opset_blocker(graph: gs.Graph) -> str | None:
    """Why the graph cannot be read at opset 23 as it is, or None."""
    if graph.opset >= ATTENTION_OPSET:
        return None
    if graph.opset < 18:
        return f"the graph is opset {graph.opset}; raising it to {ATTENTION_OPSET} needs opset 18 or later"
    changed = sorted({n.op for n in _all_nodes(graph) if n.domain in ("", "ai.onnx") and
                      n.op in CHANGED_SINCE_18 and graph.opset < CHANGED_SINCE_18[n.op]})
    return f"{', '.join(changed)} changed meaning before opset {ATTENTION_OPSET}" if changed else None


def _all_nodes(graph: gs.Graph):
    """The graph's nodes and those of its If / Loop / Scan bodies, at any depth."""
    for node in graph.nodes:
        yield node
        for value in node.attrs.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from _all_nodes(sub)


class FuseStandardAttention(Pass):
    """Replaces split-head scaled-dot-product attention with ONNX's Attention (opset 23)."""

    requires = (InferShapes,)

    def __init__(self, target: str = "trt"):
        self.target = target

    def run(self, graph: gs.Graph) -> PassResult:
        if self.target != "trt":
            return PassResult(False)
        matches = attention_blocks(graph, logger, lambda m: "TensorRT's Attention needs a 4-D mask"
                                   if m.bias is not None and len(m.bias.shape or ()) != 4 else None)
        if matches and (blocker := opset_blocker(graph)):
            logger.info("FuseStandardAttention: %d attention blocks left unfused: %s", len(matches), blocker)
            return PassResult(False, {"unfused": len(matches)})
        for match in matches:
            self._rewrite(graph, match)
        if matches:
            graph.opset = max(graph.opset, ATTENTION_OPSET)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=bool(matches), stats={"fused": len(matches)} if matches else {})

    @staticmethod
    def _rewrite(graph: gs.Graph, m: AttentionMatch) -> None:
        name = m.softmax.name or fresh_name(graph, "attention")
        k4 = gs.Variable(fresh_name(graph, f"{name}_k"), dtype=np.float32)
        graph.nodes.append(gs.Node("Transpose", f"{name}_k", {"perm": [0, 2, 1, 3]}, inputs=[m.k_split], outputs=[k4]))
        context = m.context
        context.inputs.clear()
        inputs = [m.q4, k4, m.v4] + ([full_bias(graph, m, name, m.keep_mask)] if m.bias is not None else [])
        graph.nodes.append(gs.Node("Attention", f"{name}_attention", {"scale": m.scale}, inputs=inputs,
                                   outputs=[context]))


MASKED = np.float32(-3.0e38)  # below any score, above float32's lowest (see full_bias)


def full_bias(graph: gs.Graph, m: AttentionMatch, name: str, mask: gs.Tensor | None = None) -> gs.Tensor:
    """The bias (or the boolean ``mask`` given instead) as [B|1, N|1, S, T]: one broadcast over the query
    positions ([B, 1, 1, T]) is expanded over S, as ONNX Runtime's CPU kernels index it by query position.

    A float bias is first clamped to at least -3e38: exporters mask with float32's lowest value, which
    ONNX Runtime's Attention kernel takes as "masked" and answers a fully masked row with zeros, where
    the unfused softmax gives the mean of V (every score equally lowest). Above it, both agree; any
    masked score still underflows to zero after the softmax. A -inf bias (no exporter here writes one
    without SDPA's guard, which takes the boolean path) becomes -3e38 too: a fully masked row is then the
    mean of V instead of NaN. FP16 graphs keep the property: ConvertToFp16 moves such constants to -65000,
    not to FP16's lowest. (One Max per layer; common-subexpression elimination leaves one for the shared
    mask.)"""
    bias = m.bias if mask is None else mask
    if mask is None:
        floor = gs.Constant(fresh_name(graph, f"{name}_masked"), np.array(MASKED))
        clamped = gs.Variable(fresh_name(graph, f"{name}_clamped"), dtype=np.float32, shape=bias.shape)
        graph.nodes.append(gs.Node("Max", f"{name}_clamp", inputs=[bias, floor], outputs=[clamped]))
        bias = clamped
    shape = bias.shape
    if shape is not None and len(shape) == 4 and (shape[2] != 1 or (m.q.shape or [None, None])[1] == 1):
        return bias
    seq = gs.Variable(fresh_name(graph, f"{name}_seq"), dtype=np.int64, shape=[1])
    graph.nodes.append(gs.Node("Shape", f"{name}_seq", {"start": 1, "end": 2}, inputs=[m.q], outputs=[seq]))
    one = gs.Constant(fresh_name(graph, f"{name}_one"), np.array([1], np.int64))
    rows = gs.Variable(fresh_name(graph, f"{name}_rows"), dtype=np.int64, shape=[4])
    graph.nodes.append(gs.Node("Concat", f"{name}_rows", {"axis": 0}, inputs=[one, one, seq, one], outputs=[rows]))
    expanded = gs.Variable(fresh_name(graph, f"{name}_bias"), dtype=bias.dtype)
    graph.nodes.append(gs.Node("Expand", f"{name}_bias", inputs=[bias, rows], outputs=[expanded]))
    return expanded
