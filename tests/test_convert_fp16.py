import numpy as np
import onnx
from helpers import helper, make_model, ops, run_pass, seeded

from passes.convert_fp16 import ConvertToFp16
from passes.infer_shapes import InferShapes
from passes.verify import run_graph

F32 = np.float32


def _block():
    """x -> MatMul(W) -> Add(b) -> Softmax -> Mul(mask) -> y; mask is -1e9 where masked."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Add", ["a", "mask"], ["am"]), helper.make_node("Softmax", ["am"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["y"])]
    mask = np.where(np.arange(8) < 6, 0.0, -1e9).astype(F32)
    inits = {"W": seeded((16, 8), 1), "b": seeded((8,), 2), "mask": mask, "scale": np.array(3.0, F32)}
    model = make_model(nodes, [("x", F32, ["n", 16])], [("y", F32, ["n", 8])], inits)
    return run_pass(InferShapes(), model)[1]


X = {"x": seeded((5, 16), 3)}


def _within_budget(model, out, feeds):
    expected, actual = run_graph(model, feeds), run_graph(out, feeds)
    for name, exp in expected.items():
        assert actual[name].dtype == exp.dtype  # graph outputs keep their type
        budget = ConvertToFp16.budget({name: exp})[name][0]
        assert np.abs(actual[name].astype(np.float64) - exp).max() <= budget


def test_fp16_converts_weights_and_compute_keeps_softmax_and_io_in_fp32():
    model = _block()
    result, out = run_pass(ConvertToFp16(), model)
    assert result.changed and result.stats["fp32_nodes"] == 1
    types = {i.name: i.data_type for i in out.graph.initializer}
    assert types["W"] == types["b"] == types["scale"] == onnx.TensorProto.FLOAT16
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert ops(out).count("Cast") == 4  # x in, softmax in, softmax out, y out
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    cast_in = next(n for n in out.graph.node if softmax.input[0] in n.output)
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == onnx.TensorProto.FLOAT
    assert np.abs(onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "mask"))).max() == 65000
    _within_budget(model, out, X)


def test_fp16_keeps_user_named_op_types_and_nodes_in_fp32():
    model = _block()
    _, out = run_pass(ConvertToFp16(keep=("MatMul",)), model)
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    weight = next(i for i in out.graph.initializer if i.name == matmul.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT and matmul.input[0] == "x"
    _within_budget(model, out, X)


def test_fp16_does_not_fire_on_graphs_without_float_tensors_and_is_idempotent():
    nodes = [helper.make_node("Add", ["i", "one"], ["y"])]
    ints = make_model(nodes, [("i", np.int64, [3])], [("y", np.int64, [3])], {"one": np.array(1, np.int64)})
    result, out = run_pass(ConvertToFp16(), ints)
    assert not result.changed and ops(out) == ["Add"]
    _, once = run_pass(ConvertToFp16(), _block())
    again, twice = run_pass(ConvertToFp16(), run_pass(InferShapes(), once)[1])
    assert not again.changed and ops(twice) == ops(once)
    np.testing.assert_array_equal(run_graph(once, X)["y"], run_graph(twice, X)["y"])


def test_fp16_casts_a_float_cast_of_an_integer_input_to_half():
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=1), helper.make_node("Mul", ["x", "mf"], ["y"])]
    model = make_model(nodes, [("x", F32, [2, 4]), ("mask", np.int64, [2, 4])], [("y", F32, [2, 4])])
    model = run_pass(InferShapes(), model)[1]
    result, out = run_pass(ConvertToFp16(), model)
    assert result.changed
    first = next(n for n in out.graph.node if n.input[0] == "mask")
    assert first.attribute[0].i == onnx.TensorProto.FLOAT16
    feeds = {"x": seeded((2, 4)), "mask": np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.int64)}
    _within_budget(model, out, feeds)


def test_a_node_reading_values_beyond_fp16_stays_fp32_and_masks_are_clipped_with_a_warning(caplog):
    """A BatchNormalization whose running variance exceeds 65504 keeps FP32 (recorded with the reason);
    an elementwise Add of a -1e9 mask is still clipped to -65000, and the log names the constant."""
    import logging

    from passes.convert_fp16 import fp32_nodes

    var = np.array([1.0, 2.0e5, 3.0, 7.0e4], F32)  # two channels beyond FP16's range
    nodes = [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "mask"], ["y"], name="masked")]
    inits = {"gamma": np.ones(4, F32), "beta": np.zeros(4, F32), "mean": np.zeros(4, F32), "var": var,
             "mask": np.where(np.arange(3) < 2, 0.0, -1e9).astype(F32).reshape(1, 1, 1, 3)}
    model = run_pass(InferShapes(), make_model(nodes, [("x", F32, [2, 4, 3, 3])], [("y", F32, [2, 4, 3, 3])],
                                               inits))[1]
    with caplog.at_level(logging.WARNING, logger="passes.convert_fp16"):
        _, out = run_pass(ConvertToFp16(), model)
    kept = {n["name"]: n["reason"] for n in fp32_nodes(out)}
    assert "bn" in kept and "var with values up to 2e+05, beyond FP16's 65504" in kept["bn"]
    var_out = next(i for i in out.graph.initializer if i.name == "var")
    assert var_out.data_type == onnx.TensorProto.FLOAT  # not clipped: the node computes in FP32
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(var_out), var)
    assert "1 values of mask clipped to +-65000" in caplog.text
    feeds = {"x": seeded((2, 4, 3, 3), 5) * 300}
    expected, actual = run_graph(model, feeds)["y"], run_graph(out, feeds)["y"]
    finite = expected > -1e8  # the masked column: -1e9 in FP32, -65000 in FP16, both "masked"
    budget = ConvertToFp16.budget({"y": np.where(finite, expected, 0)})["y"][0]
    assert np.abs(actual[finite] - expected[finite]).max() <= budget
    assert (actual[~finite] <= -64000).all()  # -65000 plus the scores: still far below any real one


def test_a_node_whose_fp16_output_breaks_the_budget_is_measured_and_kept_in_fp32(caplog):
    """(400 x)^2 overflows FP16 (up to 160000 > 65504) although every constant fits: the pass manager's
    verification fails, the pass finds where the error starts (the square, then the Mul reading it
    through a cast), keeps those in FP32 and runs again; the result meets the FP16 budget."""
    from foundation.numerics import fp16_atol
    from passes.base import PassManager
    from passes.convert_fp16 import fp32_nodes

    nodes = [helper.make_node("Mul", ["x", "c400"], ["m"], name="scale"),
             helper.make_node("Mul", ["m", "m"], ["sq"], name="square"),
             helper.make_node("Mul", ["sq", "c001"], ["y"], name="shrink"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    model = make_model(nodes, [("x", np.float32, [2, 64])], [("z", np.float32, [2, 64])],
                       {"c400": np.array(400.0, np.float32), "c001": np.array(0.001, np.float32)})
    feeds = [{"x": np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)}]
    expected = run_graph(model, feeds[0])["z"]
    with caplog.at_level("WARNING"):
        out, records = PassManager([InferShapes(), ConvertToFp16()], verify_feeds=feeds).run(model)
    stats = next(r for r in records if r.name == "ConvertToFp16").stats
    assert stats["measured_fp32"] == ["square", "shrink"]
    assert "is where its FP16 error starts (measured)" in caplog.text
    kept = {n["name"]: n["reason"] for n in fp32_nodes(out, (), tuple(stats["measured_fp32"]))}
    assert kept == {"square": "its FP16 output broke the budget (measured)",
                    "shrink": "its FP16 output broke the budget (measured)"}
    assert {n.name: n.op_type for n in out.graph.node}["scale"] == "Mul"  # still FP16: its output fits
    assert np.abs(run_graph(out, feeds[0])["z"] - expected).max() <= fp16_atol(expected)


def test_fp16_repair_does_not_fire_when_the_budget_holds():
    from passes.base import PassManager

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"], name="r")]
    model = make_model(nodes, [("x", np.float32, [2, 8])], [("z", np.float32, [2, 4])], {"W": seeded((8, 4), 1)})
    feeds = [{"x": seeded((2, 8), 2)}]
    out, records = PassManager([InferShapes(), ConvertToFp16()], verify_feeds=feeds).run(model)
    assert "measured_fp32" not in next(r for r in records if r.name == "ConvertToFp16").stats
    assert np.abs(run_graph(out, feeds[0])["z"] - run_graph(model, feeds[0])["z"]).max() < 1e-2
