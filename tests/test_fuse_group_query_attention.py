"""FuseGroupQueryAttention on exported decoders: Gemma 3 (1 KV head, sliding-window layers, rotary, q/k
norms) and GPT-2 (no rotary, as many KV heads as query heads). Structure (one GroupQueryAttention per layer,
its heads, window and scale, nothing of the old attention left), numbers (the fused graph against the
export over a prefill and 8 decode steps under ONNX Runtime), the cache written in place in one shared
buffer, must-not-fire (an encoder's attention, a mask with a rule of its own) and idempotence."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

pytest.importorskip("transformers")

from decoders import family_export, family_ort

from foundation.decoder import LOGIT_POSITIONS, every_logit_position
from passes import FuseGroupQueryAttention, InferShapes, PassManager


@pytest.fixture(scope="module", params=["gemma3_text", "gpt2"])
def fused(request):
    model, info, path = family_export(request.param)
    _, graph, records, out = family_ort(request.param)
    return model, info, path, out, graph, records


def _session(path):
    return ort.InferenceSession(str(path) if not isinstance(path, onnx.ModelProto) else path.SerializeToString(),
                                providers=["CPUExecutionProvider"])


def _fuse(model: onnx.ModelProto) -> tuple[bool, onnx.ModelProto]:
    fused, records = PassManager([InferShapes(), FuseGroupQueryAttention()]).run(model)
    return any(r.changed for r in records if r.name == "FuseGroupQueryAttention"), fused


def test_one_group_query_attention_per_layer_with_the_models_heads_window_and_scale(fused):
    model, info, path, _, graph, records = fused
    nodes = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == info.layers and all(n.domain == "com.microsoft" for n in nodes)
    assert not [n for n in graph.graph.node if n.op_type in ("Attention", "Softmax", "Expand", "GatherND")
                and not n.output[0].startswith("logit_")]  # the logits' positions have an Expand of their own
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert {a["num_heads"] for a in attrs} == {model.config.num_attention_heads}
    assert {a["kv_num_heads"] for a in attrs} == {info.kv_heads}
    expected_scale = getattr(model.config, "query_pre_attn_scalar", info.head_dim) ** -0.5
    folded = sum(r.stats.get("folded", 0) for r in records if r.name == "FoldAttentionScale")
    assert folded == (info.layers if info.family == "gemma3_text" else 0)  # into Gemma's q norm (its own test)
    assert all(a["scale"] == pytest.approx(1.0 if folded else expected_scale) for a in attrs)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * info.layers
    assert [a["local_window_size"] for a in attrs] == [
        info.sliding_window if t == "sliding_attention" else -1 for t in types]
    stats = next(r.stats for r in records if r.name == "FuseGroupQueryAttention" and r.changed)
    assert stats["fused"] == info.layers
    inputs = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert [i.name for i in graph.graph.input] == inputs + [LOGIT_POSITIONS]  # the names kept, one input added
    assert [o.name for o in graph.graph.output] == ["logits", *info.present_names]


def test_the_fused_graph_gives_the_exports_logits_and_cache_over_a_prefill_and_8_decode_steps(fused):
    _, info, path, fused_path, _, _ = fused
    before, after = _session(path), _session(fused_path)
    names = [o.name for o in before.get_outputs()]
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, info.vocab, (2, 7))  # longer than Gemma's window of 4
    feeds = {"input_ids": prompt, "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.tile(np.arange(7), (2, 1)),
             **{n: np.zeros((2, info.kv_heads, 0, info.head_dim), np.float32) for n in info.past_names}}
    for step in range(9):
        expected = dict(zip(names, before.run(None, feeds)))
        got = dict(zip(names, after.run(None, every_logit_position(feeds))))
        for name in names:
            np.testing.assert_allclose(got[name], expected[name], atol=2e-5, rtol=1e-4, err_msg=f"{name} step {step}")
        total = feeds["attention_mask"].shape[1] + 1
        feeds = {"input_ids": expected["logits"][:, -1:].argmax(-1), "attention_mask": np.ones((2, total), np.int64),
                 "position_ids": np.full((2, 1), total - 1),
                 **{p: expected[q] for p, q in zip(info.past_names, info.present_names)}}


def test_the_cache_is_written_in_place_in_one_shared_buffer(fused):
    """Past and present bound to the same max-length OrtValue: the op writes the new keys at each row's length
    (no present allocated), and the buffer holds the export's present where the rows are valid."""
    _, info, path, fused_path, _, _ = fused
    before, after = _session(path), _session(fused_path)
    ids = np.array([[5, 6, 7, 8, 9]])
    buffers = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, info.kv_heads, 32, info.head_dim), np.float32))
               for n in info.past_names}
    pointers = {n: v.data_ptr() for n, v in buffers.items()}
    binding = after.io_binding()
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_cpu_input("attention_mask", np.ones((1, 5), np.int64))
    binding.bind_cpu_input("position_ids", np.arange(5)[None])
    binding.bind_cpu_input(LOGIT_POSITIONS, np.array([[4]]))
    binding.bind_output("logits", "cpu")
    for past, present in zip(info.past_names, info.present_names):
        binding.bind_ortvalue_input(past, buffers[past])
        binding.bind_ortvalue_output(present, buffers[past])
    after.run_with_iobinding(binding)
    presents = binding.get_outputs()[1:]
    assert [p.data_ptr() for p in presents] == list(pointers.values())
    expected = before.run(None, {"input_ids": ids, "attention_mask": np.ones((1, 5), np.int64),
                                 "position_ids": np.arange(5)[None],
                                 **{n: np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32)
                                    for n in info.past_names}})
    for name, value in zip(info.past_names, expected[1:]):
        np.testing.assert_allclose(buffers[name].numpy()[:, :, :5], value, atol=1e-5)
        assert not buffers[name].numpy()[:, :, 5:].any()  # nothing written past the rows' lengths


def test_running_again_changes_nothing(fused):
    _, _, _, _, graph, _ = fused
    assert not _fuse(graph)[0]


def _cache_attention(mask_from: str) -> onnx.ModelProto:
    """Attention(q, Concat(past, k), Concat(past, v), mask) with the mask from ``mask_from``: the
    ``attention_mask`` through a causal rule (what the pass expects) or a boolean graph input of its own."""
    b, h, s, d = 1, 2, 3, 8
    t = "total"
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, h, s, d]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, h, s, d]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, h, s, d]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [b, h, "past", d]),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, [b, h, "past", d])]
    nodes = [helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=-2),
             helper.make_node("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=-2)]
    if mask_from == "attention_mask":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, t]))
        nodes += [helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
                  helper.make_node("Unsqueeze", ["keep", "axes"], ["keep4"]),
                  helper.make_node("LessOrEqual", ["kv_idx", "q_idx"], ["causal"]),
                  helper.make_node("And", ["keep4", "causal"], ["mask"])]
        init = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
                helper.make_tensor("kv_idx", TensorProto.INT64, [1, 1, 1, 3], [0, 1, 2]),
                helper.make_tensor("q_idx", TensorProto.INT64, [1, 1, 3, 1], [0, 1, 2])]
    else:
        inputs.append(helper.make_tensor_value_info("bias_mask", TensorProto.BOOL, [b, 1, s, t]))
        nodes.append(helper.make_node("Identity", ["bias_mask"], ["mask"]))
        init = []
    nodes.append(helper.make_node("Attention", ["q", "present.0.key", "present.0.value", "mask"], ["out"]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("out", "present.0.key", "present.0.value")]
    graph = helper.make_graph(nodes, "attn", inputs, outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_fires_on_a_cache_attention_built_by_hand_with_the_same_numbers():
    model = _cache_attention("attention_mask")
    changed, fused = _fuse(model)
    assert changed and [n.op_type for n in fused.graph.node].count("GroupQueryAttention") == 1
    rng = np.random.default_rng(0)
    feeds = {**{n: rng.standard_normal((1, 2, 3, 8)).astype(np.float32) for n in ("q", "k", "v")},
             **{n: np.zeros((1, 2, 0, 8), np.float32) for n in ("past_key_values.0.key", "past_key_values.0.value")},
             "attention_mask": np.ones((1, 3), np.int64)}
    for got, expected in zip(_session(fused).run(None, feeds), _session(model).run(None, feeds)):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ("own_mask", "the mask has no causal rule"),
    ("encoder", "is not Concat(past, new, axis=-2)"),
])
def test_does_not_fire_on_other_attentions(case, reason, caplog):
    model = _cache_attention("bias_mask" if case == "own_mask" else "attention_mask")
    if case == "encoder":  # keys and values straight from the inputs: no cache
        attention = model.graph.node[-1]
        attention.input[1], attention.input[2] = "k", "v"
    with caplog.at_level(logging.DEBUG, logger="passes.fuse_group_query_attention"):
        assert not _fuse(model)[0]
    assert reason in caplog.text
