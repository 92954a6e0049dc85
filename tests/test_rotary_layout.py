"""RotaryLayout on exported decoders with rotary embeddings (Gemma 3: q/k norms before the rotary, 1 KV head;
LLaMA: no norms, 2 KV heads). Structure (every rotary in front of GroupQueryAttention takes [B, S, N*H] with
num_heads, no Transpose left between the projections and the op), numbers (the graph before and after the pass
under ONNX Runtime over a prefill and decode steps, equal to float rounding), must-not-fire (a rotary read
elsewhere, a norm over two axes) and idempotence."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

pytest.importorskip("transformers")

from decoders import assert_same_decoding, family_export

from passes import FuseGroupQueryAttention, InferShapes, MergeReshapes, MergeTransposes, PassManager, RotaryLayout

F32 = np.float32


@pytest.fixture(scope="module", params=["gemma3_text", "llama"])
def graphs(request):
    """(DecoderInfo, the export's graph with GroupQueryAttention, the same after RotaryLayout, its records)."""
    _, info, path = family_export(request.param)
    base = [InferShapes(), FuseGroupQueryAttention()]
    before, _ = PassManager(base).run(onnx.load(str(path)))
    after, records = PassManager([*base, RotaryLayout(), InferShapes(), MergeTransposes(), MergeReshapes()]).run(
        onnx.load(str(path)))
    return info, before, after, records


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_every_rotary_feeds_group_query_attention_in_its_own_layout(graphs):
    info, before, after, records = graphs
    stats = next(r.stats for r in records if r.name == "RotaryLayout")
    assert stats["moved"] == 2 * info.layers  # the query's and the key's of every layer
    made = _producers(after)
    ranks = {v.name: v.type.tensor_type.shape.dim for v in onnx.shape_inference.infer_shapes(after).graph.value_info}
    rotaries = [n for n in after.graph.node if n.op_type == "RotaryEmbedding"]
    for gqa in [n for n in after.graph.node if n.op_type == "GroupQueryAttention"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
        for slot, heads in ((0, attrs["num_heads"]), (1, attrs["kv_num_heads"])):
            rotary = made[gqa.input[slot]]
            assert rotary.op_type == "RotaryEmbedding"
            assert {a.name: helper.get_attribute_value(a) for a in rotary.attribute}["num_heads"] == heads
            assert len(ranks[rotary.input[0]]) == 3 and made[rotary.input[0]].op_type != "Transpose"
    assert len(rotaries) == 2 * info.layers
    # per layer: the q and k Transposes there and back, and the v and output Reshape round trips
    transposes = [[n.op_type for n in m.graph.node].count("Transpose") for m in (before, after)]
    assert transposes[1] <= transposes[0] - 4 * info.layers
    assert len(after.graph.node) <= len(before.graph.node) - 6 * info.layers


def test_the_graph_computes_the_same_logits_and_cache_over_a_prefill_and_decode_steps(graphs):
    info, before, after, _ = graphs
    assert_same_decoding(before, after, info, seed=2, prompt=6)


def test_running_again_changes_nothing(graphs):
    _, _, after, _ = graphs
    result, _ = run_pass(RotaryLayout(), after)
    assert not result.changed


def _chain(perm=(0, 2, 1, 3), axis=-1, extra_reader=False):
    """x [1, 3, 2, 4] -> Transpose(perm) -> RMSNormalization(axis) -> RotaryEmbedding (4-D) -> Transpose -> Reshape
    [0, 0, 8] -> Relu -> y; with ``extra_reader`` the rotary's output is a graph output too."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=list(perm)),
             helper.make_node("RMSNormalization", ["t", "g"], ["n"], axis=axis),
             helper.make_node("RotaryEmbedding", ["n", "cos", "sin"], ["r"]),
             helper.make_node("Transpose", ["r"], ["b"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["b", "s"], ["f"]),
             helper.make_node("Relu", ["f"], ["y"])]
    angles = np.arange(3)[:, None] * np.array([1.0, 0.1])[None]
    inits = {"g": seeded((4,)) + 1, "cos": np.cos(angles)[None].astype(F32), "sin": np.sin(angles)[None].astype(F32),
             "s": np.array([0, 0, 8], np.int64)}
    outputs = [("y", F32, [1, 3, 8])] + ([("r", F32, [1, 2, 3, 4])] if extra_reader else [])
    return make_model(nodes, [("x", F32, [1, 3, 2, 4])], outputs, inits, opset=23)


def test_fires_on_a_chain_built_by_hand_with_the_same_numbers():
    model = run_pass(InferShapes(), _chain())[1]
    result, out = run_pass(RotaryLayout(), model)
    assert result.changed and ops(out) == ["RMSNormalization", "Reshape", "RotaryEmbedding", "Relu"]
    assert_same_outputs(model, out, {"x": seeded((1, 3, 2, 4))}, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("case", "reason"), [
    ({"extra_reader": True}, "read elsewhere"),
    ({"axis": 2}, "not over the last axis"),
])
def test_does_not_fire_when_the_layouts_would_not_give_the_same_numbers(case, reason, caplog):
    model = run_pass(InferShapes(), _chain(**case))[1]
    with caplog.at_level(logging.DEBUG, logger="passes.rotary_layout"):
        result, out = run_pass(RotaryLayout(), model)
    assert not result.changed and ops(out) == ops(model)
    assert reason in caplog.text
