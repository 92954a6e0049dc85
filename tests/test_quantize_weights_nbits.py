"""QuantizeWeightsNBits: MatMul weights -> MatMulNBits (4 bits, 8 where the budget says), a tied embedding
-> GatherBlockQuantized on the head's table. The maths (blocks, the exact extreme, packing) against NumPy;
the quantized graph under ONNX Runtime against the float graph holding the dequantized weights (so every
difference is the kernel's, not the rounding's); the table stored once; what must not fire; idempotence."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import InferShapes, PassManager
from passes.quantize_weights_nbits import QuantizeWeightsNBits, dequantize_blocks, quantize_blocks

VOCAB, HIDDEN, FF = 80, 64, 96


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_round_to_the_nearest_level_and_hold_each_blocks_extreme_exactly(bits):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 24)).astype(np.float32)
    packed, scales, _ = quantize_blocks(weight, bits, 32)
    assert packed.shape == (24, 4, 32 * bits // 8) and packed.dtype == np.uint8 and scales.shape == (24, 4)
    back = dequantize_blocks(packed, scales, bits, 32)
    blocks = np.abs(back - weight).T.reshape(24, 4, 32)
    step = np.abs(scales)[..., None]
    inside = np.abs(weight.T.reshape(24, 4, 32) / scales[..., None]) <= 2 ** (bits - 1) - 0.5
    assert (blocks[inside] <= (step / 2 + 1e-6).repeat(32, -1)[inside]).all()  # round to nearest
    assert (blocks <= step + 1e-6).all()  # the far end of the range stops one level short of -extreme
    extremes = np.abs(weight).T.reshape(24, 4, 32).argmax(-1)
    exact = np.take_along_axis((back - weight).T.reshape(24, 4, 32), extremes[..., None], -1)
    assert np.abs(exact).max() < 1e-6
    if bits == 4:  # two values per byte, the lower nibble holding the even k
        q = np.clip(np.rint(weight.T.reshape(24, 4, 32) / scales[..., None]) + 8, 0, 15).astype(np.uint8)
        assert (packed & 0x0F == q[..., 0::2]).all() and (packed >> 4 == q[..., 1::2]).all()


def _decoder_like(k_ff: int = FF, tied_transpose: bool = True) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W1) -> Relu -> MatMul(W2) -> MatMul(E^T): an embedding, an MLP and a head
    tied to the embedding (through a Transpose, as torch exports it, or a folded copy)."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w1 = rng.standard_normal((HIDDEN, k_ff)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((k_ff, HIDDEN)).astype(np.float32) * 0.2
    inits = [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embedding"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="up"),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="down")]
    if tied_transpose:
        nodes += [helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h3", "embed_t"], ["logits"], name="head")]
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "head_weight"))
        nodes.append(helper.make_node("MatMul", ["h3", "head_weight"], ["logits"], name="head"))
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _quantize(model, **options):
    out, records = PassManager([InferShapes(), QuantizeWeightsNBits(**options)]).run(model)
    return out, records[-1]


def _dequantized_float_graph(model: onnx.ModelProto, options: dict) -> onnx.ModelProto:
    """The float graph whose weights are what the 4/8-bit blocks stand for (the reference for the kernels)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    eight = set(options.get("eight_bit", ()))
    weights = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
    bits = {"w1": 8 if "up" in eight else 4, "w2": 8 if "down" in eight else 4, "embed": 4}
    for tensor in copy.graph.initializer:
        w = weights[tensor.name]
        w = w.T if tensor.name == "embed" else w
        packed, scales, _ = quantize_blocks(w, bits.get(tensor.name, 4), 32)
        back = dequantize_blocks(packed, scales, bits.get(tensor.name, 4), 32)
        tensor.CopyFrom(numpy_helper.from_array((back.T if tensor.name == "embed" else back).astype(np.float32),
                                                tensor.name))
    return copy


def _run(model, ids):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


@pytest.mark.parametrize("options", [{}, {"eight_bit": ("up",)}], ids=["int4", "int4+int8"])
def test_the_quantized_graph_computes_the_dequantized_weights(options):
    model = _decoder_like()
    quantized, record = _quantize(model, block_size=32, accuracy_level=0, **options)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops and ops.count("GatherBlockQuantized") == 1
    assert "Gather" not in ops and "Transpose" not in ops
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in quantized.graph.node
            if n.op_type == "MatMulNBits"}
    assert bits == {"up_nbits": 8 if options else 4, "down_nbits": 4, "head_nbits": 4}
    assert record.stats["int4"] == (2 if options else 3) and record.stats["embedding_4bit"] == 1
    stored = sum(numpy_helper.to_array(t).nbytes for t in quantized.graph.initializer)
    assert stored < 0.4 * sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)  # E stored once
    ids = np.array([[1, 5, 79, 0], [3, 3, 40, 2]])
    expected = _run(_dequantized_float_graph(model, options), ids)
    np.testing.assert_allclose(_run(quantized, ids), expected, atol=2e-4, rtol=1e-4)
    assert max(record.stats["relative_error"].values()) < 0.15  # 4 bits of a Gaussian: ~0.1


def test_accuracy_level_4_quantizes_the_activations_too_and_stays_close():
    model = _decoder_like()
    quantized, _ = _quantize(model, block_size=32, accuracy_level=4)
    ids = np.array([[1, 5, 79, 0]])
    expected = _run(_dequantized_float_graph(model, {}), ids)
    got = _run(quantized, ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 0.03  # int8 activations per block


def test_a_head_the_exporter_folded_into_a_copy_of_the_table_still_shares_it():
    quantized, record = _quantize(_decoder_like(tied_transpose=False), block_size=32, accuracy_level=0)
    assert record.stats["embedding_4bit"] == 1
    assert "embed" not in {t.name for t in quantized.graph.initializer}


def test_weights_it_cannot_hold_are_left_in_float_with_the_reason(caplog):
    model = _decoder_like(k_ff=40)  # down's K = 40 is not a multiple of 32
    with caplog.at_level(logging.DEBUG, logger="passes.quantize_weights_nbits"):
        quantized, record = _quantize(model, block_size=32, accuracy_level=0, keep=("up",))
    assert "K = 40 is not a multiple of the block size 32" in caplog.text
    assert "kept in float by the accuracy budget" in caplog.text
    assert [n.name for n in quantized.graph.node if n.op_type == "MatMul"] == ["up", "down"]
    assert record.stats["int4"] == 1


def test_running_again_changes_nothing():
    quantized, _ = _quantize(_decoder_like(), block_size=32, accuracy_level=0)
    assert not _quantize(quantized, block_size=32, accuracy_level=0)[1].changed


def test_a_rescored_head_gives_8_bit_logits_for_its_best_candidates_and_4_bit_ones_for_the_rest():
    model = _decoder_like()
    rescored, record = _quantize(model, block_size=32, accuracy_level=0, eight_bit=("head",), rescore=4)
    ops = [n.op_type for n in rescored.graph.node]
    assert record.stats["rescored_head"] == "head" and ops.count("TopK") == 1 and "ScatterElements" in ops
    assert ops.count("GatherBlockQuantized") == 2  # the embedding and the candidates read the one 8-bit table
    tables = [(n.input[0], n.input[2]) for n in rescored.graph.node if n.op_type == "GatherBlockQuantized"]
    assert tables[0] == tables[1]  # the same blocks and the same scales
    ids = np.array([[1, 5, 79, 0], [3, 3, 40, 2]])
    got = _run(rescored, ids)
    eight, _ = _quantize(model, block_size=32, accuracy_level=0, eight_bit=("head",))  # the plain 8-bit head
    exact = _run(eight, ids)
    close = np.isclose(got, exact, atol=1e-4, rtol=0)
    assert (close.sum(-1) >= 4).all()  # the k candidates carry the 8-bit head's logits exactly
    assert (close.sum(-1) < VOCAB // 2).all()  # the rest carry the 4-bit pass's
    assert (got.argmax(-1) == exact.argmax(-1)).all()  # greedy decoding sees the 8-bit head


def test_tensorrts_form_is_blocked_dequantize_linear_with_zero_point_0_and_the_same_values():
    from engines.trt_build.compat import check_model

    model = _decoder_like()
    trt, _ = _quantize(model, block_size=32, accuracy_level=0, target="trt", eight_bit=("up",))
    ops = [n.op_type for n in trt.graph.node]
    assert ops.count("DequantizeLinear") == 3 and ops.count("MatMul") == 3 and "MatMulNBits" not in ops
    types = {i.name: i.data_type for i in trt.graph.initializer}
    dq = [n for n in trt.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(types[n.input[0]] for n in dq) == sorted([TensorProto.INT8, TensorProto.INT4, TensorProto.INT4])
    assert all(len(n.input) == 2 for n in dq)  # no zero point: 0
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def back(w, bits):  # TensorRT's grid: positive scales, the largest magnitude onto +-7 (+-127)
        packed, scales, _ = quantize_blocks(w, bits, 32, positive=True)
        assert (scales > 0).all()
        return dequantize_blocks(packed, scales, bits, 32)

    ids = np.array([[1, 5, 79, 0]])
    hidden = np.maximum(weights["embed"][ids] @ back(weights["w1"], 8), 0) @ back(weights["w2"], 4)
    expected = hidden @ back(weights["embed"].T, 4)  # the embedding keeps its float table in this form
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as written, as TensorRT reads it
    got = ort.InferenceSession(trt.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)
    assert check_model(trt).ok


def _split_up(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its "up" MatMul cut into two MatMuls on column halves and a Concat: another graph's merging
    of the same weights (the ort graph merges q/k/v and gate/up; TensorRT's does not)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    w1 = next(numpy_helper.to_array(t) for t in copy.graph.initializer if t.name == "w1")
    half = w1.shape[1] // 2
    copy.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w1[:, :half]), "w1a"),
                                   numpy_helper.from_array(np.ascontiguousarray(w1[:, half:]), "w1b")])
    up = next(i for i, n in enumerate(copy.graph.node) if n.name == "up")
    del copy.graph.node[up]
    for node in [helper.make_node("Concat", ["h1b", "h1c"], ["h1"], axis=-1),  # inserted in reverse, at `up`
                 helper.make_node("MatMul", ["h0", "w1b"], ["h1c"], name="up_b"),
                 helper.make_node("MatMul", ["h0", "w1a"], ["h1b"], name="up_a")]:
        copy.graph.node.insert(up, node)
    return copy


def test_another_graph_takes_the_budgets_bits_weight_by_weight_by_value():
    """The ort graph's pass records each weight column's bits; TensorRT's graph, merged differently, gives each
    of its MatMuls the bits of its columns -- even with a threshold of 0, which alone would put all at 8 bits
    (a GGUF's carried weights have 4-bit error 0 in the ort graph)."""
    model = _decoder_like()
    record: dict = {}
    _quantize(model, block_size=32, accuracy_level=0, eight_bit=("up",), record=record)
    assert set(record.values()) == {4, 8} and len(record) == FF + HIDDEN + VOCAB
    split = _split_up(model)
    trt, stats = _quantize(split, block_size=32, accuracy_level=0, target="trt", column_bits=record,
                           eight_bit_error=0.0)
    assert stats.stats["matched"] == 4 and stats.stats["int8"] == 2 and stats.stats["int4"] == 2
    assert sorted(stats.stats["eight_bit"]) == ["up_a", "up_b"]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def back(w, bits):  # TensorRT's grid (test above)
        packed, scales, _ = quantize_blocks(w, bits, 32, positive=True)
        return dequantize_blocks(packed, scales, bits, 32)

    ids = np.array([[1, 5, 79, 0]])
    w1 = weights["w1"]
    up = np.concatenate([back(w1[:, :FF // 2], 8), back(w1[:, FF // 2:], 8)], axis=1)
    expected = np.maximum(weights["embed"][ids] @ up, 0) @ back(weights["w2"], 4) @ back(weights["embed"].T, 4)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(trt.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)
    _, alone = _quantize(split, block_size=32, accuracy_level=0, target="trt", eight_bit_error=0.0,
                                 column_bits={b"nothing": 8})  # no column recorded: the threshold decides
    assert alone.stats["matched"] == 0 and alone.stats["int8"] == 4


def test_a_threshold_from_the_budget_picks_the_same_8_bit_weights_in_another_graph():
    model = _decoder_like()
    _, record = _quantize(model, block_size=32, accuracy_level=0)
    errors = record.stats["relative_error"]
    worst = max(errors, key=errors.get)
    _, again = _quantize(model, block_size=32, accuracy_level=0, eight_bit_error=errors[worst])
    assert again.stats["int8"] == 1 and again.stats["int4"] == 2
    assert again.stats["relative_error"][worst] < errors[worst] / 4  # that one at 8 bits
