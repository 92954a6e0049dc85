"""FuseStaticKVCache (target trt) on exported decoders: Gemma 3 (1 KV head, sliding windows) and LLaMA (grouped
KV heads). Structure (TensorScatter per cache, Attention on the buffers with no past inputs, opset 24, the
TensorRT operator table clean), numbers (a static buffer of the max length against the export's growing
cache over a prefill and 8 decode steps, and a right-padded batch against its rows alone, under ONNX
Runtime), must-not-fire and idempotence."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

pytest.importorskip("transformers")

from decoders import family_export

from engines.trt_build.compat import check_model
from exporter.decoder import FlatCacheDecoder, parity_feeds
from foundation.decoder import every_logit_position, static_cache_feeds
from passes import FuseStaticKVCache, InferShapes, PassManager, pipeline

BUFFER = 32


@pytest.fixture(scope="module", params=["gemma3_text", "llama"])
def static(request):
    model, info, path = family_export(request.param)
    feeds = list(parity_feeds(FlatCacheDecoder(model).eval(), info).values())
    graph, records = PassManager(pipeline("trt", "fp32"), verify_feeds=feeds, scaled=True).run(onnx.load(str(path)))
    return model, info, path, graph, records


def _session(model):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the trt graph as written
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def test_each_cache_is_a_tensor_scatter_into_a_buffer_the_attention_reads_and_tensorrt_takes_it(static):
    _, info, _, graph, records = static
    nodes = graph.graph.node
    scatters = [n for n in nodes if n.op_type == "TensorScatter"]
    assert sorted(o for n in scatters for o in n.output) == sorted(info.present_names)
    assert all(helper.get_attribute_value(a) == -2 for n in scatters for a in n.attribute if a.name == "axis")
    attentions = [n for n in nodes if n.op_type == "Attention"]
    assert len(attentions) == info.layers
    assert {a.input[1] for a in attentions} == {f"present.{i}.key" for i in range(info.layers)}
    assert not [n for n in nodes if n.op_type in ("Expand", "GatherND") and not n.output[0].startswith("logit_")]
    # repeat_kv and the old mask are gone (the logits' positions have an Expand of their own)
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 24
    assert next(r.stats for r in records if r.name == "FuseStaticKVCache" and r.changed)["caches"] == 2 * info.layers
    report = check_model(graph)
    assert report.ok and not report.refused, report.summary()


def _grow_feeds(info, ids, past=None, total=None):
    batch, steps = ids.shape
    total = total or steps
    return {"input_ids": ids, "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.tile(np.arange(total - steps, total), (batch, 1)),
            **{n: (past[n] if past else np.zeros((batch, info.kv_heads, 0, info.head_dim), np.float32))
               for n in info.past_names}}


def test_a_max_length_buffer_gives_the_exports_logits_over_a_prefill_and_8_decode_steps(static):
    _, info, path, graph, _ = static
    before, after = _session(path), _session(graph)
    names = [o.name for o in before.get_outputs()]
    ids = np.array([[5, 9, 13, 17, 21, 25, 29]])  # longer than Gemma's window of 4
    grow = _grow_feeds(info, ids)
    buffers = {n: np.zeros((1, info.kv_heads, BUFFER, info.head_dim), np.float32) for n in info.past_names}
    static_feeds = {**grow, **buffers}
    for step in range(9):
        expected = dict(zip(names, before.run(None, grow)))
        got = dict(zip(names, after.run(None, every_logit_position(static_feeds))))
        np.testing.assert_allclose(got["logits"], expected["logits"], atol=2e-5, rtol=1e-4, err_msg=f"step {step}")
        total = grow["attention_mask"].shape[1]
        for present in info.present_names:
            assert got[present].shape[2] == BUFFER  # written in place of the buffer, never grown
            np.testing.assert_allclose(got[present][:, :, :total], expected[present], atol=1e-5)
        token = expected["logits"][:, -1:].argmax(-1)
        grow = _grow_feeds(info, token, {p: expected[q] for p, q in zip(info.past_names, info.present_names)},
                           total + 1)
        static_feeds = {**grow, **{p: got[q] for p, q in zip(info.past_names, info.present_names)}}


def test_a_right_padded_batch_gives_each_rows_logits_alone(static):
    _, info, _, graph, _ = static
    session = _session(graph)
    rows = [[3, 4, 5, 6, 7, 8], [11, 12, 13]]
    ids = np.array([r + [0] * (6 - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (6 - len(r)) for r in rows])
    buffers = {n: np.zeros((2, info.kv_heads, BUFFER, info.head_dim), np.float32) for n in info.past_names}
    batched = session.run(["logits"], every_logit_position({"input_ids": ids, "attention_mask": mask,
                                       "position_ids": np.tile(np.arange(6), (2, 1)), **buffers}))[0]
    for k, row in enumerate(rows):
        alone = session.run(["logits"], every_logit_position({
            "input_ids": np.array([row]), "attention_mask": np.ones((1, len(row)), np.int64),
            "position_ids": np.arange(len(row))[None], **{n: v[:1] for n, v in buffers.items()}}))[0]
        np.testing.assert_allclose(batched[k, :len(row)], alone[0], atol=2e-5, rtol=1e-4)


def test_the_growing_feeds_map_onto_buffers_that_mean_the_same():
    feeds = {"input_ids": np.zeros((1, 2), np.int64), "attention_mask": np.ones((1, 5), np.int64),
             "past_key_values.0.key": np.ones((1, 1, 3, 4), np.float32)}
    padded = static_cache_feeds(feeds)
    assert padded["past_key_values.0.key"].shape == (1, 1, 5, 4)
    assert padded["past_key_values.0.key"][:, :, 3:].sum() == 0
    assert static_cache_feeds(padded)["past_key_values.0.key"].shape == (1, 1, 5, 4)  # already a buffer


def test_running_again_and_an_attention_without_a_cache_change_nothing(static):
    _, _, _, graph, _ = static
    assert not any(r.changed for r in PassManager([InferShapes(), FuseStaticKVCache()]).run(graph)[1][1:])
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 3, 8])
    node = helper.make_node("Attention", ["q", "q", "q"], ["out"])
    encoder = helper.make_model(helper.make_graph([node], "enc", [q], [helper.make_tensor_value_info(
        "out", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    _, records = PassManager([InferShapes(), FuseStaticKVCache()]).run(encoder)
    assert not records[-1].changed


def test_the_bundle_says_which_cache_each_graph_keeps():
    from foundation.decoder import DecoderInfo

    info = DecoderInfo("llama", 2, 2, 16, 96, 64)
    assert (info.cache, info.trt_cache) == ("grow", "grow")  # a manifest written before the fusions
    assert DecoderInfo.from_json(dataclasses.replace(info, cache="shared", trt_cache="static").to_json()).trt_cache \
        == "static"
