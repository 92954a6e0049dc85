"""Matching scaled-dot-product attention as exporters write it (no rewriting here), shared by the
``ort`` fusion (``FuseAttention``) and the ``trt`` one (``FuseStandardAttention``).

Matched from the Softmax outwards:

    q4 = Transpose(Reshape(q, [B, S, N, H]), [0, 2, 1, 3])          likewise k4 from k, v4 from v
    kT = Transpose(Reshape(k, ...), [0, 2, 3, 1])                   (eager, legacy TorchScript)
       | Transpose(k4, [0, 1, 3, 2])
       | Reshape(Transpose(Reshape(k4, [-1, T, H]), [0, 2, 1]), [B, N, H, T])   (dynamo's SDPA decomposition)
    p  = Softmax(MatMul(q4 * a, kT * b) * c [+ bias])               a, b, c scalar constants (each may be 1;
                                                                    Div by a constant is a Mul by its inverse)
    p' = p | Where(IsNaN(p), 0, p)                                   (SDPA's guard for fully masked rows)
    y4 = MatMul(p', v4);   y = Reshape(Transpose(y4, [0, 2, 1, 3]), [B, S, N*H])

The scale of the fused op is a*b*c. The bias is any float tensor added to the scores (a padding mask
[B, 1, 1, T], a full [B|1, N|1, S, T] mask, a causal mask); the fusions decide which shapes their op
takes. The SDPA guard is only dropped where no row can be fully masked with -inf: the bias must be a
Where between finite constants, or absent. Shapes in Reshape targets that exporters compute at run time
(Concat of Shape slices) are read symbolically, so the head split is proven, not assumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph_utils import constant_value, producer


@dataclass(frozen=True)
class AttentionMatch:
    """One matched attention block. q, k, v: the 3-D [B, S|T, N*H] tensors before the head split;
    q4, v4: the [B, N, S|T, H] head-split tensors the graph already has; q_split, k_split: Reshape(q), Reshape(k)
    [B, S|T, N, H];
    context: MatMul(p, v4) [B, N, S, H]; merge: the Reshape merging the heads ([B, S, N*H] or [B*S, N*H]);
    shape_reads: (Shape node, perm) reading the context's shapes, each equal to q_split's permuted by perm;
    keep_mask: set when the bias is Where(keep, 0, -inf) behind SDPA's NaN guard: only a fused op given the
    boolean ``keep`` returns what the guarded graph does for a fully masked row (zeros)."""

    softmax: gs.Node
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    q4: gs.Tensor
    q_split: gs.Tensor
    k_split: gs.Tensor
    v4: gs.Tensor
    bias: gs.Tensor | None
    scale: float
    heads: int
    head_size: int
    context: gs.Tensor
    merge: gs.Node
    shape_reads: tuple = ()
    keep_mask: gs.Tensor | None = None

    def internal(self) -> list[gs.Tensor]:
        """Tensors the fusions remove or recompute: none may be a graph output."""
        return [self.softmax.inputs[0], self.softmax.outputs[0], self.context, self.merge.inputs[0]]


def _scalar(tensor: gs.Tensor) -> float | None:
    c = constant_value(tensor)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def peel_scale(tensor: gs.Tensor) -> tuple[gs.Tensor, float]:
    """(x, s) when tensor = x * s (Mul or Div by scalar constants, any depth); s = 1 for none."""
    scale = 1.0
    while (node := producer(tensor)) is not None and node.op in ("Mul", "Div") and len(tensor.outputs) <= 1:
        for x_i, c_i in ((0, 1), (1, 0)) if node.op == "Mul" else ((0, 1),):
            c = _scalar(node.inputs[c_i])
            if c is not None and c != 0.0 and constant_value(node.inputs[x_i]) is None:
                scale *= c if node.op == "Mul" else 1.0 / c
                tensor = node.inputs[x_i]
                break
        else:
            break
    return tensor, scale


def _perm(node: gs.Node | None, perm: list[int]) -> bool:
    return node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == perm


def shape_terms(tensor: gs.Tensor) -> list | None:
    """The value of a 1-D int64 shape tensor as terms: ints, or ("dim", tensor, axis) for a
    symbolic dim read by Shape. None when it is computed any other way."""
    c = constant_value(tensor)
    if c is not None:
        return [int(x) for x in c.reshape(-1)] if c.ndim <= 1 or c.size == 1 else None
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Shape":
        x = node.inputs[0]
        if x.shape is None:
            return None
        rank = len(x.shape)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        end = rank if end is None else int(end)
        start, end = (min(max(s + rank if s < 0 else s, 0), rank) for s in (start, end))
        return [int(x.shape[i]) if isinstance(x.shape[i], (int, np.integer)) else ("dim", x, i)
                for i in range(start, end)]
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [shape_terms(i) for i in node.inputs]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    if node.op in ("Slice", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _indexed_terms(node)
    return None


def _indexed_terms(node: gs.Node) -> list | None:
    inner = shape_terms(node.inputs[0])
    if inner is None:
        return None
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return inner  # a scalar <-> [1] change; the terms are the same
    if node.op == "Gather":
        idx = constant_value(node.inputs[1])
        if idx is None or idx.size != 1 or int(node.attrs.get("axis", 0)) != 0:
            return None
        return [inner[int(idx.reshape(-1)[0])]]
    starts, ends = (constant_value(t) for t in node.inputs[1:3])
    rest = [constant_value(t) for t in node.inputs[3:5]]
    if starts is None or ends is None or any(r is None or np.any(~np.isin(r, (0, -1)) if i == 0 else r != 1)
                                             for i, r in enumerate(rest)):
        return None
    return inner[slice(int(starts.reshape(-1)[0]), int(np.clip(ends.reshape(-1)[0], -2**62, 2**62)))]


def _is_dim(term, tensor: gs.Tensor, axis: int) -> bool:
    """term is tensor's dim ``axis``: a Shape read of it, the same static int, or the same symbol."""
    d = tensor.shape[axis] if tensor.shape is not None and len(tensor.shape) > axis else None
    if isinstance(term, tuple):
        if term[1] is tensor and term[2] == axis:
            return True
        other = term[1].shape[term[2]]
        return isinstance(d, str) and other == d
    return isinstance(term, int) and isinstance(d, (int, np.integer)) and int(d) == term


def head_split(tensor: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, int, int] | None:
    """(x, r, N, H) when tensor is r = Reshape(x, [B, S, N, H]) of a 3-D x [B, S, N*H]."""
    node = producer(tensor)
    if node is None or node.op != "Reshape" or tensor.shape is None or len(tensor.shape) != 4:
        return None
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[2], (int, np.integer)):
        return None
    width, target = int(x.shape[2]), shape_terms(node.inputs[1])
    if target is None or len(target) != 4:
        return None
    for axis in (0, 1):  # batch and sequence kept: copied (0), read from x, or the same dim by inference
        if not (target[axis] == 0 or _is_dim(target[axis], x, axis) or _same(tensor, x, axis)):
            return None
    heads, size = (t if isinstance(t, int) and t > 0 else None for t in target[2:])
    heads = heads or tensor.shape[2] if isinstance(tensor.shape[2], (int, np.integer)) else heads
    size = size or tensor.shape[3] if isinstance(tensor.shape[3], (int, np.integer)) else size
    if heads is None and size is not None and target[2] == -1 and width % size == 0:
        heads = width // size
    if size is None and heads is not None and target[3] == -1 and width % heads == 0:
        size = width // heads
    if heads is None or size is None or int(heads) * int(size) != width:
        return None
    return x, tensor, int(heads), int(size)


def _same(a: gs.Tensor, b: gs.Tensor, axis: int) -> bool:
    da, db = a.shape[axis], b.shape[axis]
    return da is not None and da == db and (isinstance(da, str) or da >= 0)


def split_heads(tensor: gs.Tensor, perm: list[int]):
    """head_split of r when tensor = Transpose(r, perm)."""
    node = producer(tensor)
    return head_split(node.inputs[0]) if _perm(node, perm) else None


def key_split(kt: gs.Tensor):
    """head_split of k's Reshape when kt is k transposed to [B, N, H, T], in the three forms exporters write."""
    node = producer(kt)
    if _perm(node, [0, 2, 3, 1]):
        return head_split(node.inputs[0])
    if _perm(node, [0, 1, 3, 2]):
        return split_heads(node.inputs[0], [0, 2, 1, 3])
    if node is None or node.op != "Reshape":
        return None
    inner = producer(node.inputs[0])  # Reshape(Transpose(Reshape(k4, [-1, T, H]), [0, 2, 1]), [B, N, H, T])
    if not _perm(inner, [0, 2, 1]) or (flat := producer(inner.inputs[0])) is None or flat.op != "Reshape":
        return None
    k4 = flat.inputs[0]
    t3, t4 = shape_terms(flat.inputs[1]), shape_terms(node.inputs[1])
    if k4.shape is None or len(k4.shape) != 4 or t3 is None or t4 is None or len(t3) != 3 or len(t4) != 4:
        return None
    if not (t3[0] == -1 and _is_dim(t3[1], k4, 2) and _is_dim(t3[2], k4, 3)):
        return None
    if not all(_is_dim(t, k4, axis) for t, axis in zip(t4, (0, 1, 3, 2))):
        return None
    return split_heads(k4, [0, 2, 1, 3])


NOT_SCORES = "the scores are not MatMul(q, k) (times constants)"


def _score_candidates(softmax: gs.Node) -> list[tuple[gs.Tensor, gs.Tensor | None]]:
    """(scaled scores, bias) readings of the softmax input: no bias, or either side of an Add."""
    pre = softmax.inputs[0]
    add = producer(pre)
    if add is None or add.op != "Add":
        return [(pre, None)]
    return [(add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])]


def _finite_mask(bias: gs.Tensor | None) -> bool:
    """No row of bias can be all -inf: absent, a finite constant, or Where/Expand of finite constants."""
    if bias is None:
        return True
    c = constant_value(bias)
    if c is not None:
        return bool(np.all(np.isfinite(c)))
    node = producer(bias)
    if node is not None and node.op in ("Expand", "Reshape", "Unsqueeze", "Cast"):
        return _finite_mask(node.inputs[0])
    if node is not None and node.op == "Where":
        values = [constant_value(t) for t in node.inputs[1:]]
        return all(v is not None and np.all(np.isfinite(v)) for v in values)
    return False


def boolean_keep_mask(bias: gs.Tensor | None) -> gs.Tensor | None:
    """cond when bias = Where(cond, 0, -inf) (possibly Expanded): the boolean mask, True = attend."""
    node = producer(bias) if bias is not None else None
    if node is None or node.op != "Where":
        return None
    zero, ninf = (constant_value(t) for t in node.inputs[1:])
    if zero is None or ninf is None or np.any(zero != 0) or not np.all(np.isneginf(ninf)):
        return None
    return node.inputs[0]


def _probabilities_consumer(softmax: gs.Node, bias: gs.Tensor | None) -> tuple[gs.Node, bool] | str:
    """(the MatMul(p, v4) reading the softmax output, whether SDPA's NaN guard stood between). The guard
    is dropped only where no row can be fully masked with -inf, or where the mask is a boolean one
    (a fused op given that boolean mask returns zeros for a fully masked row, as the guard does)."""
    p, guarded = softmax.outputs[0], False
    readers = p.outputs
    if len(readers) == 2 and {r.op for r in readers} == {"IsNaN", "Where"}:
        isnan, where = sorted(readers, key=lambda r: r.op != "IsNaN")
        zero = constant_value(where.inputs[1])
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p or zero is None or np.any(zero != 0):
            return "the probabilities have other readers"
        if not _finite_mask(bias) and boolean_keep_mask(bias) is None:
            return "the softmax guards fully masked rows and the mask may hold -inf"
        p, readers, guarded = where.outputs[0], where.outputs[0].outputs, True
    if len(readers) != 1 or readers[0].op != "MatMul" or readers[0].inputs[0] is not p:
        return "the probabilities are not multiplied by v (or have other readers)"
    return readers[0], guarded


def attention_blocks(graph: gs.Graph, log: logging.Logger, check=lambda match: None) -> list[AttentionMatch]:
    """Every attention block in the graph; each Softmax that is not one (or that ``check`` refuses, by
    returning a reason) is logged at DEBUG on ``log`` with the reason."""
    found = []
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        match = match_attention(softmax, graph)
        reason = match if isinstance(match, str) else check(match)
        if reason:
            log.debug("skip %s: %s", softmax.name, reason)
            continue
        found.append(match)
    return found


def match_attention(softmax: gs.Node, graph: gs.Graph) -> AttentionMatch | str:
    """The attention block around ``softmax``, or the reason it is not one."""
    if softmax.attrs.get("axis", -1 if graph.opset >= 13 else 1) not in (-1, 3):  # the default was 1 before 13
        return "softmax is not over the last axis"
    reasons = []
    for scores_t, bias in _score_candidates(softmax):
        found = _match_from(softmax, scores_t, bias)
        if isinstance(found, AttentionMatch):
            outputs = {t.name for t in graph.outputs}
            return found if not any(t.name in outputs for t in found.internal()) else \
                "an intermediate tensor is a graph output"
        reasons.append(found)
    return next((r for r in reasons if r != NOT_SCORES), reasons[0])


def _match_from(softmax: gs.Node, scores_t: gs.Tensor, bias: gs.Tensor | None) -> AttentionMatch | str:
    scores, scale = peel_scale(scores_t)
    qk = producer(scores)
    if qk is None or qk.op != "MatMul":
        return NOT_SCORES
    if bias is not None and np.dtype(bias.dtype or np.float32) != np.dtype(np.float32):
        return "the attention bias is not float32"
    if bias is not None and (bias.shape is None or not bias.shape or bias.shape[-1] == 1):
        return "the attention bias does not span the keys (its last dim is 1 or unknown)"
    q_in, q_scale = peel_scale(qk.inputs[0])
    k_in, k_scale = peel_scale(qk.inputs[1])
    q, k = split_heads(q_in, [0, 2, 1, 3]), key_split(k_in)
    if q is None or k is None:
        return "q or k is not a head split of a 3-D tensor"
    found = _probabilities_consumer(softmax, bias)
    if isinstance(found, str):
        return found
    pv, guarded = found
    v = split_heads(pv.inputs[1], [0, 2, 1, 3])
    if v is None:
        return "v is not a head split of a 3-D tensor"
    if not (q[2] == k[2] == v[2] and q[3] == k[3] == v[3]):
        return "q, k and v differ in heads or head size"
    merged = _merged(pv.outputs[0], q[0], q_in)
    if isinstance(merged, str):
        return merged
    return AttentionMatch(softmax, q[0], k[0], v[0], q_in, q[1], k[1], pv.inputs[1], bias, scale * q_scale * k_scale,
                          q[2], q[3], pv.outputs[0], *merged,
                          keep_mask=boolean_keep_mask(bias) if guarded and not _finite_mask(bias) else None)


def _shape_readers(tensor: gs.Tensor) -> tuple[list[gs.Node], list[gs.Node]]:
    """(Shape nodes reading the whole shape of tensor, its other readers)."""
    shapes = [n for n in tensor.outputs if n.op == "Shape" and not n.attrs.get("start") and n.attrs.get("end") is None]
    return shapes, [n for n in tensor.outputs if n not in shapes]


def _identity_reshape(node: gs.Node, like: gs.Tensor) -> bool:
    """Reshape(x, target) whose target reads x's own dims or those of ``like`` (a tensor of x's shape),
    copies them (0), or leaves one to be inferred (-1)."""
    x, target = node.inputs[0], shape_terms(node.inputs[1])
    return (x.shape is not None and target is not None and len(target) == len(x.shape) and target.count(-1) <= 1
            and all(t in (0, -1) or _is_dim(t, x, axis) or _is_dim(t, like, axis) for axis, t in enumerate(target)))


def _merged(context: gs.Tensor, q: gs.Tensor, q4: gs.Tensor) -> tuple[gs.Node, tuple] | str:
    """The Reshape merging the heads back: Reshape(Transpose(context, [0, 2, 1, 3]), [B, S, N*H]), or to
    [B*S, N*H] (before a Gemm) with a target free of 0 (copy) entries, so that it also reshapes [B, S, N*H].
    Shape reads of the context and of its transpose (legacy exports compute the target from them) are
    returned as (node, perm): each reads q's [B, S, N, H] split permuted by perm."""
    ctx_shapes, readers = _shape_readers(context)
    if len(readers) == 1 and readers[0].op == "Reshape" and _identity_reshape(readers[0], q4):
        more, readers = _shape_readers(readers[0].outputs[0])  # the legacy SDPA export reshapes to the same shape
        ctx_shapes += more
    if len(readers) != 1 or not _perm(readers[0], [0, 2, 1, 3]):
        return "the context is not transposed back with [0, 2, 1, 3]"
    back = readers[0].outputs[0]
    back_shapes, readers = _shape_readers(back)
    if len(readers) != 1 or readers[0].op != "Reshape":
        return "the heads are not merged by a Reshape"
    merge = readers[0]
    reads = tuple((n, [0, 2, 1, 3]) for n in ctx_shapes) + tuple((n, [0, 1, 2, 3]) for n in back_shapes)
    target, y = shape_terms(merge.inputs[1]), merge.outputs[0]
    if y.shape is None or target is None or len(target) != len(y.shape) or len(target) not in (2, 3):
        return "the merged context is not a 2-D or 3-D Reshape with a readable target"
    if len(target) == 2:
        flat = target[1] == q.shape[2] and target[0] != 0  # the element count fixes the first dim to B*S
        return (merge, reads) if flat else "the merged context is not [B*S, N*H]"
    kept = [t == 0 or _is_dim(t, back, axis) or _is_dim(t, q, axis) for axis, t in enumerate(target[:2])]
    wide = target[2] == q.shape[2] or target[2] == -1 and all(kept)
    if not (wide and (all(kept) or kept.count(False) == 1 and -1 in target[:2])):
        return "the merged context is not [B, S, N*H]"
    return merge, reads
