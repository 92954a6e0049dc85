import numpy as np
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from passes.fuse_attention import FuseAttention
from passes.infer_shapes import InferShapes

F32 = np.float32
B, S, N, H = 2, 5, 2, 4
D = N * H


def _attention(bias_shape=None):
    """Split-head attention over q, k, v inputs [B, S, D], as exporters write it."""
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}r"]),
                  helper.make_node("Transpose", [f"{name}r"], [f"{name}4"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["q4", "k4"], ["qk"]), helper.make_node("Div", ["qk", "sqrt_h"], ["scores"])]
    inputs = [(n, F32, [B, S, D]) for n in "qkv"]
    if bias_shape is not None:
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["biased"]))
        inputs.append(("bias", F32, list(bias_shape)))
    nodes += [helper.make_node("Softmax", ["biased" if bias_shape else "scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v4"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["y"])]
    inits = {"split": np.array([B, S, N, H], np.int64), "merge": np.array([B, S, D], np.int64),
             "sqrt_h": np.array(np.sqrt(H), F32)}
    return run_pass(InferShapes(), make_model(nodes, inputs, [("y", F32, [B, S, D])], inits))[1]


def _feeds(bias_shape=None):
    feeds = {n: seeded((B, S, D), i) for i, n in enumerate("qkv")}
    if bias_shape is not None:
        if bias_shape[2] == S:
            feeds["bias"] = np.broadcast_to(np.triu(np.full((S, S), -10000.0, F32), 1), bias_shape).astype(F32).copy()
        else:  # a padding mask: the last position of the second sequence is masked
            feeds["bias"] = np.zeros(bias_shape, F32)
            feeds["bias"][1, ..., -1] = -10000.0
    return feeds


def test_attention_becomes_multi_head_attention_with_the_same_outputs():
    for bias in (None, (1, 1, S, S)):
        model = _attention(bias)
        result, out = run_pass(FuseAttention(target="ort"), model)
        assert result.changed and result.stats == {"fused": 1}
        assert ops(out) == ["MultiHeadAttention"]
        node = out.graph.node[0]
        assert node.domain == "com.microsoft" and len(node.input) == (6 if bias else 3)
        assert {a.name: (a.i or a.f) for a in node.attribute} == {"num_heads": N, "scale": np.float32(1 / np.sqrt(H))}
        assert_same_outputs(model, out, _feeds(bias), atol=1e-5)
        again, _ = run_pass(FuseAttention(target="ort"), out)
        assert not again.changed


def test_attention_does_not_fire_for_trt_or_a_padding_mask_broadcast_over_queries():
    model = _attention(None)
    result, _ = run_pass(FuseAttention(target="trt"), model)
    assert not result.changed
    padded = _attention((B, 1, 1, S))
    result, out = run_pass(FuseAttention(target="ort"), padded)
    assert not result.changed and ops(out) == ops(padded)
    assert_same_outputs(padded, out, _feeds((B, 1, 1, S)))
