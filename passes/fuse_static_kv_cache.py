"""A decoder's growing KV cache -> a static cache buffer written by ``TensorScatter`` (target ``trt``).

TensorRT's parser reads ``Attention`` only without past inputs and present outputs (the operator table), so
the cache stays outside the op, and a Concat that grows it by every step's keys would reallocate each step.
For each attention ``cache_attention_match`` recognises, this keeps one ``[B, kv_heads, L, H]`` buffer per past
(L: the runtime's choice, the bundle's max length) and writes the step's keys and values into it:

    present = TensorScatter(past, new, write_indices, axis=-2)      write_indices[b] = max(sum(mask_b) - S, 0)

(right padding: a row's mask holds its length after this step, so the step starts at length - S; a prefill
starts at 0). The attention then reads the whole buffer under a mask rebuilt for it, standard ops only:

    visible[b, i, j] = j <= w_b + i  [and  j > w_b + i - W  on sliding-window layers]

(key j, query i at position w_b + i; positions beyond a row's length are never visible to its real
queries, so stale buffer rows are never read). The buffers feed the Attention directly: it takes fewer kv
heads than query heads itself, so the exporter's repeat_kv (Unsqueeze/Expand/Reshape, shaped for the grown
cache) goes. Rotary positions still come from ``position_ids``.
``TensorScatter`` is ONNX opset 24, which the graph is raised to (Attention 23 -> 24 keeps its meaning).

Numbers: with a buffer exactly past + S long the buffer after the scatter is the old Concat and the mask
the old mask, so the pass manager verifies it, and every pass after it, on the old feeds with each past
padded by S zeros (``feeds_after``: ``foundation.decoder.static_cache_feeds``, which the graph check uses too).
Skipped, with the reason logged: what ``cache_attention_match`` does not match.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from foundation.decoder import static_cache_feeds
from passes.base import Pass, PassResult
from passes.cache_attention_match import CacheAttention, cache_attentions
from passes.graph_utils import fresh_name
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

SCATTER_OPSET = 24


class FuseStaticKVCache(Pass):
    """Concat-grown KV caches -> TensorScatter into static buffers, with the mask rebuilt for them."""

    requires = (InferShapes,)

    def run(self, graph: gs.Graph) -> PassResult:
        matches = cache_attentions(graph, logger)
        if not matches:
            return PassResult(False)
        graph.opset = max(graph.opset, SCATTER_OPSET)
        shared: dict = {}
        for m in matches:
            self._rewrite(graph, m, shared)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, {"caches": 2 * len(matches), "sliding": sum(1 for m in matches if m.window)})

    def feeds_after(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return static_cache_feeds(feeds)

    @staticmethod
    def _rewrite(graph: gs.Graph, m: CacheAttention, shared: dict) -> None:
        def var(base, dtype=np.int64):
            return gs.Variable(fresh_name(graph, base), dtype=dtype)

        def const(base, value):
            return gs.Constant(fresh_name(graph, base), np.asarray(value, np.int64))

        if "write" not in shared:  # max(sum(mask) - S, 0), once per graph
            steps = var("kv_step_len")
            graph.layer(op="Shape", name=steps.name, inputs=[m.key], outputs=[steps], attrs={"start": 2, "end": 3})
            summed = var("kv_mask_sum")
            graph.layer(op="ReduceSum", name=summed.name, inputs=[m.attention_mask, const("kv_axis1", [1])],
                        outputs=[summed], attrs={"keepdims": 0})
            start = var("kv_start")
            graph.layer(op="Sub", name=start.name, inputs=[summed, steps], outputs=[start])
            write = var("kv_write_indices")
            graph.layer(op="Max", name=write.name, inputs=[start, const("kv_zero", [0])], outputs=[write])
            shared["write"], shared["steps"] = write, steps
        write = shared["write"]
        for past, new, present in ((m.past_key, m.key, m.present_key), (m.past_value, m.value, m.present_value)):
            concat = present.inputs[0]
            concat.outputs[0] = gs.Variable(fresh_name(graph, f"{present.name}_concat"), dtype=present.dtype)
            graph.layer(op="TensorScatter", name=f"{present.name}_scatter", inputs=[past, new, write],
                        outputs=[present], attrs={"axis": -2, "mode": "linear"})
        key = ("mask", m.window)
        if key not in shared:
            shared[key] = _static_mask(graph, m.past_key, shared["steps"], write, m.window, var, const)
        # The buffers go in as they are: Attention takes fewer kv heads than query heads itself (grouped-query
        # attention from the inputs' second dims), and repeat_kv's shapes were computed for the grown cache.
        m.node.inputs[1], m.node.inputs[2], m.node.inputs[3] = m.present_key, m.present_value, shared[key]


def _static_mask(graph, past, steps, write, window, var, const):
    """visible[b, 0, i, j] for a buffer as long as ``past`` (module docstring)."""
    length = var("kv_buffer_len")
    graph.layer(op="Shape", name=length.name, inputs=[past], outputs=[length], attrs={"start": 2, "end": 3})
    scalars = []
    for tensor in (length, steps):
        scalar = var(f"{tensor.name}_scalar")
        graph.layer(op="Squeeze", name=scalar.name, inputs=[tensor], outputs=[scalar])
        scalars.append(scalar)
    keys, queries = var("kv_key_index"), var("kv_query_index")
    for out, limit in ((keys, scalars[0]), (queries, scalars[1])):
        graph.layer(op="Range", name=out.name, inputs=[const("kv_range0", 0), limit, const("kv_range1", 1)],
                    outputs=[out])
    keys3, queries3, write3 = var("kv_keys_1_1_T"), var("kv_queries_1_S_1"), var("kv_write_B_1_1")
    graph.layer(op="Unsqueeze", name=keys3.name, inputs=[keys, const("kv_axes01", [0, 1])], outputs=[keys3])
    graph.layer(op="Unsqueeze", name=queries3.name, inputs=[queries, const("kv_axes02", [0, 2])], outputs=[queries3])
    graph.layer(op="Unsqueeze", name=write3.name, inputs=[write, const("kv_axes12", [1, 2])], outputs=[write3])
    position = var("kv_query_position")
    graph.layer(op="Add", name=position.name, inputs=[write3, queries3], outputs=[position])
    visible = var("kv_causal", np.bool_)
    graph.layer(op="LessOrEqual", name=visible.name, inputs=[keys3, position], outputs=[visible])
    if window:
        oldest = var("kv_window_start")
        graph.layer(op="Sub", name=oldest.name, inputs=[position, const("kv_window", window)], outputs=[oldest])
        inside, both = var("kv_in_window", np.bool_), var("kv_causal_window", np.bool_)
        graph.layer(op="Greater", name=inside.name, inputs=[keys3, oldest], outputs=[inside])
        graph.layer(op="And", name=both.name, inputs=[visible, inside], outputs=[both])
        visible = both
    mask = var(f"kv_static_mask{'_w' + str(window) if window else ''}", np.bool_)
    graph.layer(op="Unsqueeze", name=mask.name, inputs=[visible, const("kv_axis1_mask", [1])], outputs=[mask])
    return mask
