"""Matching a decoder's attention over a growing KV cache (no rewriting here).

What torch's dynamo exporter writes at opset 23 for a Hugging Face decoder (``exporter.decoder``), per layer:

    present_k = Concat(past_key_values.N.key, k_new, axis=-2)          (a graph input and a graph output)
    present_v = Concat(past_key_values.N.value, v_new, axis=-2)
    out       = Attention(q, repeat_kv(present_k), repeat_kv(present_v), mask)      q, k, v: [B, heads, S, H]
    mask      = causal(q_idx, kv_idx) & padding(attention_mask) [& kv_idx > q_idx - W]   (bool, [B, 1, S, T])

``repeat_kv`` (grouped-query attention) is Unsqueeze -> Expand -> Reshape and may be absent. The mask is
read by walking its subgraph: it must reach the ``attention_mask`` graph input (other graph inputs only
through ``Shape``), hold a causal ``LessOrEqual(kv_idx, q_idx)``, and a sliding window is the constant W of
``Greater(kv_idx, Sub(q_idx, W))`` (key j visible to query i iff i - W < j <= i, Hugging Face's
``sliding_window``). Anything else in the mask (an ALiBi bias, a custom rule) is not matched: the fusions
that use this express the mask through the attention op's own lengths and window.
"""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from passes.graph_utils import constant_value, is_graph_output, producer

# Ops a causal/padding/window mask subgraph is made of in the dynamo export (index arithmetic and shapes).
MASK_OPS = frozenset({"And", "Or", "Not", "Expand", "Unsqueeze", "Squeeze", "Reshape", "LessOrEqual", "Less",
                      "Greater", "GreaterOrEqual", "Sub", "Add", "Range", "GatherND", "Gather", "Cast", "Concat",
                      "Shape", "Max", "Min", "Slice", "Constant", "Identity", "ConstantOfShape"})
REPEAT_KV_OPS = ("Reshape", "Expand", "Unsqueeze")


@dataclasses.dataclass
class CacheAttention:
    node: gs.Node  # the Attention (opset 23) node
    query: gs.Tensor  # [B, heads, S, H], positions already applied
    key: gs.Tensor  # this step's keys [B, kv_heads, S, H]
    value: gs.Tensor
    past_key: gs.Tensor  # graph inputs [B, kv_heads, past, H]
    past_value: gs.Tensor
    present_key: gs.Tensor  # graph outputs [B, kv_heads, past + S, H]
    present_value: gs.Tensor
    attention_mask: gs.Tensor  # the graph input [B, total]
    window: int | None  # Hugging Face's sliding_window, None for full attention
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float


def cache_attentions(graph: gs.Graph, logger) -> list[CacheAttention]:
    """Every cache attention of ``graph``; each Attention that is not one is logged at DEBUG with the reason."""
    matches = []
    for node in [n for n in graph.nodes if n.op == "Attention"]:
        match = match_cache_attention(node, graph)
        if isinstance(match, str):
            logger.debug("skip %s: %s", node.name, match)
        else:
            matches.append(match)
    return matches


def match_cache_attention(node: gs.Node, graph: gs.Graph) -> CacheAttention | str:
    """The pieces of one cache attention, or why ``node`` is not one."""
    if node.op != "Attention":
        return "not an Attention node"
    if len(node.inputs) != 4 or not all(node.inputs):
        return "not Attention(q, k, v, mask): past inputs or a missing mask (TensorRT's form, or is_causal alone)"
    if any(out.outputs or is_graph_output(out, graph) for out in node.outputs[1:]):
        return "its present or qk outputs are read"
    if int(node.attrs.get("qk_matmul_output_mode", 0)) != 0 or int(node.attrs.get("is_causal", 0)) != 0:
        return "qk_matmul_output_mode or is_causal set (the causal rule is expected in the mask)"
    query, key_in, value_in, mask = node.inputs
    caches = []
    for tensor in (key_in, value_in):
        concat = _concat_through_repeat_kv(tensor)
        if isinstance(concat, str):
            return concat
        caches.append(concat)
    (past_k, new_k, present_k), (past_v, new_v, present_v) = caches
    if not (is_graph_output(present_k, graph) and is_graph_output(present_v, graph)):
        return "the concatenated cache is not written as the graph's present outputs"
    found = _mask_rule(mask, graph)
    if isinstance(found, str):
        return found
    attention_mask, window = found
    shapes = [t.shape for t in (query, past_k)]
    if any(s is None or len(s) != 4 for s in shapes) or not all(
            isinstance(d, int) for d in (shapes[0][1], shapes[1][1], shapes[1][3])):
        return "query heads, kv heads or head size are not static (run InferShapes first)"
    heads, kv_heads, head_dim = shapes[0][1], shapes[1][1], shapes[1][3]
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} kv heads"
    scale = float(node.attrs.get("scale", head_dim ** -0.5))
    return CacheAttention(node, query, new_k, new_v, past_k, past_v, present_k, present_v, attention_mask, window,
                          heads, kv_heads, head_dim, scale, float(node.attrs.get("softcap", 0.0)))


def _concat_through_repeat_kv(tensor: gs.Tensor):
    """(past input, new keys, present) of Concat(past, new, axis=-2), seen through repeat_kv."""
    node = producer(tensor)
    while node is not None and node.op in REPEAT_KV_OPS:
        node = producer(node.inputs[0])
    if node is None or node.op != "Concat" or int(node.attrs.get("axis", 0)) not in (-2, 2) or len(node.inputs) != 2:
        return "the key/value is not Concat(past, new, axis=-2) (a model exported without its cache)"
    past, new = node.inputs
    if producer(past) is not None or isinstance(past, gs.Constant):
        return "the cache concatenation does not start from a graph input (the past)"
    return past, new, node.outputs[0]


def _mask_rule(mask: gs.Tensor, graph: gs.Graph):
    """(attention_mask input, window) of a causal/padding/window mask subgraph, or why it is not one."""
    inputs = {id(t): t for t in graph.inputs}
    seen: set[int] = set()
    stack, causal, windows, masks = [mask], 0, set(), []
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in inputs:
            masks.append(tensor)
            continue
        node = producer(tensor)
        if node is None:
            continue
        if node.op not in MASK_OPS:
            return f"the mask holds a {node.op} (only causal, padding and sliding-window masks are matched)"
        if node.op == "Shape":
            continue  # sizes of any tensor, not its values
        if node.op == "LessOrEqual":
            causal += 1
        if node.op == "Greater":
            sub = producer(node.inputs[1])
            width = constant_value(sub.inputs[1]) if sub is not None and sub.op == "Sub" else None
            if width is None or width.size != 1:
                return "the mask compares positions other than kv_idx > q_idx - W with a constant W"
            windows.add(int(width.reshape(-1)[0]))
        stack.extend(t for t in node.inputs if t is not None)
    if not causal:
        return "the mask has no causal rule (LessOrEqual(kv_idx, q_idx))"
    if len(masks) != 1 or masks[0].name != "attention_mask":
        names = ", ".join(t.name for t in masks) or "no graph input"
        return f"the mask reads {names}, expected the attention_mask input alone"
    if len(windows) > 1:
        return f"the mask holds several windows {sorted(windows)}"
    return masks[0], (windows.pop() if windows else None)
