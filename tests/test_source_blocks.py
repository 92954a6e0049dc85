"""A GGUF file's symmetric blocks carried into MatMulNBits unchanged (exporter/gguf_blocks.py, SourceBlocks in
passes/quantize_weights_nbits.py). A small GGUF is written with the ``gguf`` package's own quantizers (Q8_0,
Q5_0, Q4_0) and read back; a graph holding the dequantized weights (what transformers exports from a GGUF) is
quantized with and without the source: with it, the MatMulNBits blocks stand for the weights exactly and
the graph under ONNX Runtime computes the float graph's numbers (plain rounding already does for Q5_0 and Q4_0,
not for Q8_0); what must not be carried is rounded as usual."""

from __future__ import annotations

import gguf  # a dev dependency
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as Q
from onnx import TensorProto, helper, numpy_helper

from engines.bundle.manifest import Int4Report
from exporter.gguf_blocks import symmetric_blocks
from passes import InferShapes, PassManager
from passes.quantize_weights_nbits import QuantizeWeightsNBits, SourceBlocks, dequantize_blocks

VOCAB, HIDDEN, FF = 80, 64, 96
KINDS = {"token_embd.weight": (Q.Q8_0, (VOCAB, HIDDEN)), "blk.0.ffn_up.weight": (Q.Q5_0, (FF, HIDDEN)),
         "blk.0.ffn_gate.weight": (Q.Q5_0, (FF, HIDDEN)), "blk.0.ffn_down.weight": (Q.Q4_0, (HIDDEN, FF))}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF with Q8_0, Q5_0 and Q4_0 tensors (rows = output channels, as GGUF stores linear weights), an F32
    norm; and each quantized tensor's values as the gguf package dequantizes them."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {}
    for name, (kind, shape) in KINDS.items():
        quantized = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, kind)
        writer.add_tensor(name, quantized, raw_dtype=kind)
        values[name] = gguf.quants.dequantize(quantized, kind)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, values


def _graph(values: dict, merged: bool = False) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(up) -> Relu -> MatMul(down) -> MatMul(E^T), weights as the exporter writes them
    ([K, N] = the GGUF rows transposed); ``merged``: up and gate in one MatMul, as MergeParallelMatMuls makes."""
    up = values["blk.0.ffn_up.weight"].T
    if merged:
        up = np.concatenate([up, values["blk.0.ffn_gate.weight"].T], axis=1)
    down = values["blk.0.ffn_down.weight"].T
    inits = [numpy_helper.from_array(values["token_embd.weight"], "embed"),
             numpy_helper.from_array(np.ascontiguousarray(up), "w_up"),
             numpy_helper.from_array(np.ascontiguousarray(down), "w_down")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embedding"),
             helper.make_node("MatMul", ["h0", "w_up"], ["h1"], name="up")]
    if merged:  # relu(up) * gate
        inits.append(numpy_helper.from_array(np.array([FF, FF], np.int64), "halves"))
        nodes += [helper.make_node("Split", ["h1", "halves"], ["h1_up", "h1_gate"], axis=-1),
                  helper.make_node("Relu", ["h1_up"], ["h1_relu"]),
                  helper.make_node("Mul", ["h1_relu", "h1_gate"], ["h2"])]
    else:
        nodes.append(helper.make_node("Relu", ["h1"], ["h2"]))
    nodes += [helper.make_node("MatMul", ["h2", "w_down"], ["h3"], name="down"),
             helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h3", "embed_t"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _quantize(model, **options):
    out, records = PassManager([InferShapes(), QuantizeWeightsNBits(block_size=32, accuracy_level=0, **options)],
                               quiet=True).run(model)
    return out, records[-1].stats


def _run(model, ids):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]


def _blocks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each MatMulNBits' weight [K, N] as its blocks stand for them."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            out[node.name] = dequantize_blocks(inits[node.input[1]], inits[node.input[2]], attrs["bits"],
                                               attrs["block_size"])
    return out


def test_the_reader_gives_each_symmetric_tensors_values_and_block_scales(gguf_file):
    path, values = gguf_file
    read = {name: (v, s) for name, v, s in symmetric_blocks(path)}
    assert set(read) == set(KINDS)  # the F32 norm is not a blocked tensor
    for name, (v, s) in read.items():
        np.testing.assert_array_equal(v, values[name])
        assert s.shape == (v.shape[0], v.shape[1] // 32)
        levels = v.reshape(s.shape + (32,)) / np.where(s == 0, 1, s)[..., None]
        np.testing.assert_array_equal(levels, np.rint(levels))  # scale x integer, per block of 32
        assert np.abs(levels).max() <= {Q.Q8_0: 128, Q.Q5_0: 16, Q.Q4_0: 8}[KINDS[name][0]]


@pytest.mark.parametrize("merged", [False, True], ids=["separate", "merged-columns"])
def test_carried_blocks_stand_for_the_weights_exactly_where_plain_rounding_does_not(gguf_file, merged):
    path, values = gguf_file
    model = _graph(values, merged)
    source = SourceBlocks(symmetric_blocks(path))
    options = {"eight_bit": ("up", "head")}  # Q5_0 and Q8_0 need 8 bits; Q4_0 fits 4
    carried, stats = _quantize(model, source=source, **options)
    rounded, plain = _quantize(model, **options)
    assert stats["carried"] == 3 and plain["carried"] == 0
    assert stats["relative_error"] == {"up": 0.0, "down": 0.0, "head": 0.0}
    # Rounding again reproduces Q5_0 and Q4_0 (llama.cpp maps a block's extreme onto the lowest level, as
    # quantize_blocks does) but not Q8_0, whose extreme sits on +-127 of 8 bits' -128..127.
    assert plain["relative_error"]["up"] == plain["relative_error"]["down"] == 0.0
    assert plain["relative_error"]["head"] > 1e-3
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    blocks = _blocks(carried)
    np.testing.assert_array_equal(blocks["up_nbits"], weights["w_up"])
    np.testing.assert_array_equal(blocks["down_nbits"], weights["w_down"])
    ops = [n.op_type for n in carried.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("GatherBlockQuantized") == 1 and "MatMul" not in ops
    ids = np.array([[1, 5, 79, 0], [3, 3, 40, 2]])
    expected = _run(model, ids)
    got = _run(carried, ids)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)  # the float graph's numbers
    assert np.abs(_run(rounded, ids) - expected).max() > 10 * np.abs(got - expected).max()


def test_what_the_source_cannot_hold_exactly_is_rounded_as_usual(gguf_file, caplog):
    path, values = gguf_file
    source = SourceBlocks(symmetric_blocks(path))
    nudged = dict(values)
    nudged["blk.0.ffn_down.weight"] = values["blk.0.ffn_down.weight"].copy()
    nudged["blk.0.ffn_down.weight"][3, 7] = np.nextafter(nudged["blk.0.ffn_down.weight"][3, 7], np.float32(1))
    with caplog.at_level("DEBUG", logger="passes.quantize_weights_nbits"):
        _, stats = _quantize(_graph(nudged), source=source, eight_bit=("head",))
    # up: Q5_0's levels -16..15 do not fit 4 bits; down: one value moved by an ulp; the head (Q8_0, 8 bits) is
    assert stats["carried"] == 1 and stats["relative_error"]["head"] == 0.0
    assert stats["relative_error"]["up"] > 0 and stats["relative_error"]["down"] > 0
    text = caplog.text
    assert "do not fit 4 bits" in text and "column 3 is not a row of the source's blocks" in text
    assert source.blocks(values["blk.0.ffn_up.weight"].T, 8, 64) == "the source's blocks hold 32 values, not 64"
    trt, trt_stats = PassManager([InferShapes(), QuantizeWeightsNBits(block_size=32, target="trt", source=source)],
                                 quiet=True).run(_graph(values))
    assert trt_stats[-1].stats["carried"] == 0  # TensorRT's form keeps its positive scales


def test_a_report_written_before_carried_blocks_loads_with_none_carried():
    report = Int4Report("perplexity=0.02", 32, 4, {}, {}, 3, ("a",), (), 1.0)
    old = {k: v for k, v in report.to_json().items() if k != "carried"}
    assert Int4Report.from_json(old).carried == 0 and Int4Report.from_json(report.to_json()) == report
