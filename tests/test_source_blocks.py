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
from exporter.gguf_blocks import blocked_tensors
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
    raw = {name: (gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, kind), kind)
           for name, (kind, shape) in KINDS.items()}
    norm = {"output_norm.weight": np.ones(HIDDEN, np.float32)}
    path = _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", raw, norm)
    return path, {name: gguf.quants.dequantize(data, kind) for name, (data, kind) in raw.items()}


def _write_gguf(path, quantized: dict, floats: dict | None = None):
    """A GGUF file at ``path`` with ``quantized`` tensors (name -> (raw bytes, kind)) and ``floats``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, kind) in quantized.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    for name, value in (floats or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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


def _quantize(model, accuracy_level=0, **options):
    out, records = PassManager([InferShapes(), QuantizeWeightsNBits(block_size=32, accuracy_level=accuracy_level,
                                                                    **options)],
                               quiet=True).run(model)
    return out, records[-1].stats


def _run(model, ids=None, x=None):
    """The graph's output under ONNX Runtime, fed ``ids`` (the LM graph) or ``x`` (the MLP graph)."""
    feeds = {"ids": ids} if x is None else {"x": x}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


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
    read = {name: (v, s) for name, v, s, offsets in blocked_tensors(path) if offsets is None}
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
    source = SourceBlocks(blocked_tensors(path))
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
    source = SourceBlocks(blocked_tensors(path))
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


# Blocks with an offset: Q4_K (256-value super-blocks of eight 32-value sub-blocks, each with a 6-bit scale and
# min) and Q4_1 (32 values, fp16 d and m). The gguf package has no Q4_K quantizer, so _q4_k writes its bytes
# (a plain min/max one); what the values are is the gguf package's own dequantize of those bytes.
K4, N4, N1 = 256, 64, 32


def _q4_k(weights: np.ndarray) -> np.ndarray:
    """ggml's ``block_q4_K`` bytes [rows, K / 256 * 144] of ``weights`` [rows, K]: per sub-block the range
    [min(x, 0), max(x)] over levels 0..15, its scale and offset in 6 bits against the super-block's fp16 d/dmin."""
    rows, k = weights.shape
    sub = weights.reshape(-1, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale, offset = (sub.max(-1) - low) / 15, -low
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (offset.max(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-12)), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(offset / np.maximum(dmin.astype(np.float32), 1e-12)), 0, 63).astype(np.uint8)
    step = d.astype(np.float32) * sc
    q = np.clip(np.rint((sub + (dmin.astype(np.float32) * m)[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    packed = np.concatenate([(sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=-1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=-1).reshape(rows, -1)


@pytest.fixture(scope="module")
def offset_file(tmp_path_factory):
    """A GGUF with a Q4_K, a Q4_0 (K = 256) and a Q4_1 tensor, and their values as gguf dequantizes them."""
    rng = np.random.default_rng(1)
    weights = {"blk.0.ffn_up.weight": (Q.Q4_K, (N4, K4)), "blk.0.ffn_gate.weight": (Q.Q4_0, (N4, K4)),
               "blk.0.ffn_down.weight": (Q.Q4_1, (N1, N4))}
    raw = {}
    for name, (kind, shape) in weights.items():
        w = (rng.standard_normal(shape) * 0.05 + 0.02).astype(np.float32)  # a mean away from 0: real offsets
        raw[name] = (_q4_k(w) if kind == Q.Q4_K else gguf.quants.quantize(w, kind), kind)
    path = _write_gguf(tmp_path_factory.mktemp("gguf") / "offsets.gguf", raw)
    return path, {name: gguf.quants.dequantize(data, kind) for name, (data, kind) in raw.items()}


def _offset_graph(values: dict, merged: bool = False) -> onnx.ModelProto:
    """x [b, s, 256] -> MatMul(up: Q4_K) [-> concat gate: Q4_0 columns] -> Relu -> slice 64 -> MatMul(down: Q4_1)."""
    up = values["blk.0.ffn_up.weight"].T
    if merged:
        up = np.concatenate([up, values["blk.0.ffn_gate.weight"].T], axis=1)
    down = values["blk.0.ffn_down.weight"].T  # [64, 32]
    inits = [numpy_helper.from_array(np.ascontiguousarray(up), "w_up"),
             numpy_helper.from_array(np.ascontiguousarray(down), "w_down"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([down.shape[0]], np.int64), "width"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["h1"], name="up"),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("Slice", ["h2", "zero", "width", "last"], ["h3"]),
             helper.make_node("MatMul", ["h3", "w_down"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_the_reader_gives_offset_blocks_scales_and_offsets_that_rebuild_the_values_bit_for_bit(offset_file):
    path, values = offset_file
    read = {name: (v, s, o) for name, v, s, o in blocked_tensors(path)}
    assert read["blk.0.ffn_gate.weight"][2] is None  # Q4_0: symmetric
    for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        v, s, o = read[name]
        np.testing.assert_array_equal(v, values[name])
        assert s.shape == o.shape == (v.shape[0], v.shape[1] // 32)
        blocks = v.reshape(s.shape + (32,))
        levels = np.rint((blocks + o[..., None]) / s[..., None])
        assert levels.min() >= 0 and levels.max() <= 15
        np.testing.assert_array_equal(levels * s[..., None] - o[..., None], blocks)
        assert np.abs(o).max() > 0  # the offsets are not all zero: the test data has them


@pytest.mark.parametrize("merged", [False, True], ids=["separate", "offset-and-symmetric-columns"])
def test_offset_blocks_are_carried_with_a_block_sum_correction_and_give_the_float_graphs_numbers(
        offset_file, merged):
    path, values = offset_file
    model = _offset_graph(values, merged)
    source = SourceBlocks(blocked_tensors(path))
    carried, stats = _quantize(model, source=source)
    rounded, plain = _quantize(model)
    assert stats["carried"] == 2 and stats["carried_offsets"] == 2 and plain["carried"] == 0
    assert stats["relative_error"] == {"up": 0.0, "down": 0.0}
    assert plain["relative_error"]["up"] > 0.01 and plain["relative_error"]["down"] > 0.01
    ops = [n.op_type for n in carried.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("ReduceSum") == 2 and ops.count("MatMul") == 2
    onnx.checker.check_model(carried, full_check=True)
    # the levels, scales and correction stand for the weights: MatMulNBits' blocks + each block's correction
    inits = {t.name: numpy_helper.to_array(t) for t in carried.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in [n for n in carried.graph.node if n.op_type == "MatMulNBits"]:
        name = node.name.removesuffix("_nbits")
        add = next(n for n in carried.graph.node if n.op_type == "Add" and node.output[0] in n.input)
        matmul = next(n for n in carried.graph.node if n.op_type == "MatMul" and n.output[0] in add.input)
        correction = inits[matmul.input[1]]
        rebuilt = dequantize_blocks(inits[node.input[1]], inits[node.input[2]], 4, 32) + np.repeat(
            correction, 32, axis=0)
        np.testing.assert_allclose(rebuilt, weights[f"w_{name}"], rtol=0, atol=1e-6)
        if merged and name == "up":  # the Q4_0 columns need none
            assert np.all(correction[:, N4:] == 0) and np.any(correction[:, :N4] != 0)
    x = np.random.default_rng(2).standard_normal((2, 3, K4)).astype(np.float32)
    expected = _run(model, x=x)
    got = _run(carried, x=x)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert np.abs(_run(rounded, x=x) - expected).max() > 10 * np.abs(got - expected).max()


def test_at_8_bits_offset_blocks_are_rounded_as_usual(offset_file, caplog):
    path, values = offset_file
    with caplog.at_level("DEBUG", logger="passes.quantize_weights_nbits"):
        out, stats = _quantize(_offset_graph(values), source=SourceBlocks(blocked_tensors(path)),
                               eight_bit=("up", "down"))
    assert stats["carried"] == 0 and "ReduceSum" not in [n.op_type for n in out.graph.node]
    assert 0 < stats["relative_error"]["up"] < 0.01 and 0 < stats["relative_error"]["down"] < 0.01
    assert "has offset blocks: 8 bits round them" in caplog.text


def test_with_int8_activations_carried_offset_blocks_are_no_worse_than_rounding(offset_file):
    """Accuracy level 4 rounds the input to int8 per block, and that error is multiplied by what MatMulNBits
    holds, ``s * (level - zero point)``, not by the weight: the correction cancels the difference only in exact
    arithmetic. (With the zero point at 8 bits' 128 for levels 0..15 this graph was 25x worse than rounding.)"""
    path, values = offset_file
    model = _offset_graph(values)

    def error(**options):
        out, _ = _quantize(model, accuracy_level=4, **options)
        return np.abs(_run(out, x=x) - expected).max()

    x = np.random.default_rng(3).standard_normal((2, 5, K4)).astype(np.float32)
    expected = _run(model, x=x)
    carried, rounded = error(source=SourceBlocks(blocked_tensors(path))), error()
    assert carried <= rounded * 1.01, (carried, rounded)


def test_offset_blocks_are_not_carried_into_a_tied_table(offset_file, caplog):
    """A tied table is read by GatherBlockQuantized as well, which takes no correction: rounded as usual."""
    path, values = offset_file
    table = values["blk.0.ffn_down.weight"]  # Q4_1 [32 rows, 64]: a 32-token vocabulary of width 64
    inits = [numpy_helper.from_array(table, "embed")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"], name="embedding"),
             helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embed_t"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    with caplog.at_level("DEBUG", logger="passes.quantize_weights_nbits"):
        _, stats = _quantize(model, source=SourceBlocks(blocked_tensors(path)))
    assert stats["carried"] == 0 and stats["relative_error"]["head"] > 0
    assert "has offset blocks: a tied table's other reader (GatherBlockQuantized) takes no correction" in caplog.text
