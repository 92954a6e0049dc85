"""FoldAttentionScale on exported decoders: Gemma 3 (a q norm before the rotary, scale 1/4: a power of two, so
bit-identical numbers) and LLaMA (no q norm: must not fire). Structure (every GroupQueryAttention at scale 1, the
q norm's weight times the old scale, the k norm's untouched), numbers (the graph before and after under ONNX
Runtime over a prefill and decode steps), must-not-fire cases built by hand, and idempotence."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

pytest.importorskip("transformers")

from decoders import assert_same_decoding, family_export
from onnx import numpy_helper

from passes import FoldAttentionScale, FuseGroupQueryAttention, InferShapes, PassManager, RotaryLayout

F32 = np.float32


@pytest.fixture(scope="module")
def gemma():
    """(DecoderInfo, the graph with GroupQueryAttention and RotaryLayout, the same after FoldAttentionScale, stats)."""
    _, info, path = family_export("gemma3_text")
    base = [InferShapes(), FuseGroupQueryAttention(), RotaryLayout()]
    before, _ = PassManager(base).run(onnx.load(str(path)))
    after, records = PassManager([*base, FoldAttentionScale()]).run(onnx.load(str(path)))
    return info, before, after, records[-1]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _norm_of(model, tensor):
    """The RMSNormalization that ``tensor`` (a GroupQueryAttention's query or key) is made from."""
    made = {o: n for n in model.graph.node for o in n.output}
    node = made[tensor]
    while node.op_type != "RMSNormalization":
        node = made[node.input[0]]
    return node


def test_every_attention_runs_at_scale_one_with_its_query_norm_weight_scaled(gemma):
    info, before, after, record = gemma
    assert record.changed and record.stats["folded"] == info.layers
    weights = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (before, after)]
    gqas = [[n for n in m.graph.node if n.op_type == "GroupQueryAttention"] for m in (before, after)]
    for old, new in zip(*gqas):
        scale = _attrs(old)["scale"]
        assert scale == 0.25 and _attrs(new)["scale"] == 1.0  # query_pre_attn_scalar 16
        q_old, q_new = _norm_of(before, old.input[0]), _norm_of(after, new.input[0])
        np.testing.assert_array_equal(weights[1][q_new.input[1]], weights[0][q_old.input[1]] * F32(scale))
        assert _norm_of(after, new.input[1]).input[1] == _norm_of(before, old.input[1]).input[1]  # the key's: as it was
    assert ops(after) == ops(before)


def test_the_graph_gives_bit_identical_logits_and_cache_over_a_prefill_and_decode_steps(gemma):
    info, before, after, _ = gemma
    assert_same_decoding(before, after, info, seed=4, prompt=7, atol=1e-6, rtol=1e-6)  # a power-of-two scale: exact


def test_running_again_changes_nothing(gemma):
    _, _, after, _ = gemma
    result, _ = run_pass(FoldAttentionScale(), after)
    assert not result.changed


def test_does_not_fire_on_a_query_without_a_norm(caplog):
    _, _, path = family_export("llama")
    model, _ = PassManager([InferShapes(), FuseGroupQueryAttention(), RotaryLayout()]).run(onnx.load(str(path)))
    with caplog.at_level(logging.DEBUG, logger="passes.fold_attention_scale"):
        result, out = run_pass(FoldAttentionScale(), model)
    assert not result.changed and ops(out) == ops(model)
    assert "not from a norm's weight" in caplog.text


def _attention(extra_reader=False, scale=0.5, bias=False):
    """x [1, 2, 16] -> RMSNormalization (or LayerNormalization with a bias) -> Reshape -> GroupQueryAttention (2 heads
    of 8, 1 kv head) over a past of 3; with ``extra_reader`` the norm's output is a graph output too."""
    norm = (helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n"]) if bias
            else helper.make_node("RMSNormalization", ["x", "g"], ["n"]))
    nodes = [norm, helper.make_node("Reshape", ["n", "shape"], ["q"]),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"],
                              ["y", "present_k", "present_v"], domain="com.microsoft", num_heads=2,
                              kv_num_heads=1, scale=scale)]
    inits = {"g": seeded((16,)) + 1, "shape": np.array([0, 0, 16], np.int64), "seqlens": np.array([4], np.int32),
             "total": np.array(5, np.int32), **({"beta": seeded((16,), seed=3)} if bias else {})}
    inputs = [("x", F32, [1, 2, 16]), ("k", F32, [1, 2, 8]), ("v", F32, [1, 2, 8]), ("pk", F32, [1, 1, 3, 8]),
              ("pv", F32, [1, 1, 3, 8])]
    outputs = [("y", F32, [1, 2, 16]), ("present_k", F32, [1, 1, 5, 8]), ("present_v", F32, [1, 1, 5, 8])]
    outputs += [("n", F32, [1, 2, 16])] if extra_reader else []
    return make_model(nodes, inputs, outputs, inits, opset=23, domains=("com.microsoft",))


def _feeds():
    return {"x": seeded((1, 2, 16), seed=1), "k": seeded((1, 2, 8), seed=2), "v": seeded((1, 2, 8), seed=5),
            "pk": seeded((1, 1, 3, 8), seed=6), "pv": seeded((1, 1, 3, 8), seed=7)}


@pytest.mark.parametrize("bias", [False, True])
def test_fires_on_an_attention_built_by_hand_with_the_same_numbers(bias):
    model = _attention(scale=0.3, bias=bias)  # not a power of two: equal to one rounding of s * w
    result, out = run_pass(FoldAttentionScale(), model)
    assert result.changed and ops(out) == ops(model)
    assert _attrs(next(n for n in out.graph.node if n.op_type == "GroupQueryAttention"))["scale"] == 1.0
    assert_same_outputs(model, out, _feeds(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("case", "reason"), [
    ({"extra_reader": True}, "read elsewhere"),
    ({"scale": 1.0}, "already 1"),
])
def test_does_not_fire_where_folding_would_change_other_numbers(case, reason, caplog):
    model = _attention(**case)
    with caplog.at_level(logging.DEBUG, logger="passes.fold_attention_scale"):
        result, out = run_pass(FoldAttentionScale(), model)
    assert not result.changed and ops(out) == ops(model)
    assert reason in caplog.text
