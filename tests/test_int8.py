"""INT8: Q/DQ rules for both targets against a NumPy reference, calibration, cache, bad data, budget."""


import numpy as np
import onnx
import pytest
from helpers import helper, make_model, ops, run_pass, seeded

from engines.build.int8 import EMULATED, quantize_target
from engines.build.int8.data import load_calibration
from engines.build.int8.forms import candidates
from engines.runtime.cpu import detect
from foundation.errors import CalibrationError
from foundation.numerics import Budget
from foundation.spec import InputSpec
from passes.calibration import calibrate, data_sha256, graph_sha256, load_ranges, mse_range, save_ranges
from passes.infer_shapes import InferShapes
from passes.quantize_ort import FORMS, QuantizeForOnnxRuntime
from passes.quantize_trt import QuantizeForTensorRT
from passes.verify import run_graph

F32 = np.float32


def fake_quant(x, scale, axis=None):
    """q = round_half_even(clip(x / s, -128, 127)) * s, the reference for symmetric INT8."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    s = np.asarray(scale, F32).reshape(shape)
    return np.clip(np.round(x / s), -128, 127) * s


def _init(model, name):
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _dq_of(model, consumer_op):
    """(int8 weight, scale, zero point, axis) of the DequantizeLinear feeding ``consumer_op``'s weight."""
    node = next(n for n in model.graph.node if n.op_type == consumer_op)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[1])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return _init(model, dq.input[0]), _init(model, dq.input[1]), _init(model, dq.input[2]), axis


def _linear(op, **attrs):
    if op == "Conv":
        w, x_shape, y_shape = (
            seeded((4, 3, 3, 3), 1) * np.array([1, 10, 0.1, 3], F32)[:, None, None, None],
            [2, 3, 6, 6],
            [2, 4, 4, 4],
        )
    elif op == "Gemm":
        w = seeded((5, 6), 1) if attrs.get("transB") else seeded((6, 5), 1)
        x_shape, y_shape = [3, 6], [3, 5]
    else:
        w, x_shape, y_shape = seeded((6, 5), 1), [3, 6], [3, 5]
    model = make_model([helper.make_node(op, ["x", "W"], ["y"], name=op.lower(), **attrs)], [("x", F32, x_shape)],
                       [("y", F32, y_shape)], {"W": w})
    return run_pass(InferShapes(), model)[1], w, x_shape


@pytest.mark.parametrize("op, attrs, axis", [("Conv", {}, 0), ("Gemm", {"transB": 1}, 0), ("Gemm", {}, 1),
                                             ("MatMul", {}, 1)])
def test_trt_weights_are_int8_per_channel_on_the_output_axis_and_match_numpy(op, attrs, axis):
    model, w, x_shape = _linear(op, **attrs)
    x = seeded(x_shape, 2) * 2
    ranges = {"x": (float(x.min()), float(x.max()))}
    result, out = run_pass(QuantizeForTensorRT(ranges=ranges), model)
    assert result.stats == {"nodes": 1, "weights": 1, "activations": 1}
    q, scale, zero, got_axis = _dq_of(out, op)
    assert got_axis == axis and q.dtype == np.int8 and not zero.any() and zero.dtype == np.int8
    channels = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    np.testing.assert_allclose(scale, np.abs(channels).max(1) / 127, rtol=1e-6)
    np.testing.assert_array_equal(
        q, np.clip(np.round(w / scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])), -128, 127)
    )
    # the whole graph under ONNX Runtime equals the NumPy reference of fake-quantized x and W
    x_scale = max(abs(ranges["x"][0]), abs(ranges["x"][1])) / 127
    xq, wq = fake_quant(x, x_scale), fake_quant(w, scale, axis)
    if op == "Conv":
        ref_model = model.__class__()
        ref_model.CopyFrom(model)
        ref_model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(wq.astype(F32), "W"))
        reference = run_graph(ref_model, {"x": xq.astype(F32)})["y"]
    elif op == "Gemm" and attrs.get("transB"):
        reference = xq @ wq.T
    else:
        reference = xq @ wq
    np.testing.assert_allclose(run_graph(out, {"x": x})["y"], reference, atol=1e-5, rtol=1e-5)
    assert not run_pass(QuantizeForTensorRT(ranges=ranges), out)[0].changed  # idempotent


def qdq_reference(original, quantized, feeds):
    """The original float graph run on inputs and weights passed through the Q/DQ pairs found in
    ``quantized`` (NumPy: q = clip(round(x / s) + zp, qmin, qmax), x' = (q - zp) * s)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    feeds = dict(feeds)
    originals = {n.name: n for n in original.graph.node}
    readers = {t: (n.name, i) for n in quantized.graph.node for i, t in enumerate(n.input)}
    for node in quantized.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in feeds:
            scale, zp = inits[node.input[1]], inits[node.input[2]]
            info = np.iinfo(zp.dtype)
            q = np.clip(np.round(feeds[node.input[0]] / scale) + zp.astype(np.int64), info.min, info.max)
            feeds[node.input[0]] = ((q - zp.astype(np.int64)) * scale).astype(F32)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            q, scale, zp = inits[node.input[0]].astype(F32), inits[node.input[1]], inits[node.input[2]].astype(F32)
            shape = [-1 if i == axis else 1 for i in range(q.ndim)] if axis is not None else []
            weight = (q - (zp.reshape(shape) if shape else zp)) * (scale.reshape(shape) if shape else scale)
            consumer, index = readers[node.output[0]]
            name = originals[consumer].input[index]  # the float weight this DequantizeLinear replaced
            for init in reference.graph.initializer:
                if init.name == name:
                    init.CopyFrom(onnx.numpy_helper.from_array(weight.astype(F32), name))
    return run_graph(reference, feeds)


def test_trt_shares_one_activation_pair_and_quantizes_the_residual_input():
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "skip"], ["y"], name="add")]
    model = make_model(nodes, [("x", F32, [1, 3, 5, 5]), ("skip", F32, [1, 3, 5, 5])],
                       [("y", F32, [1, 3, 5, 5]), ("b", F32, [1, 3, 5, 5])],
                       {"W1": seeded((3, 3, 3, 3), 1), "W2": seeded((3, 3, 3, 3), 2)})
    model = run_pass(InferShapes(), model)[1]
    ranges = {"x": (-3.0, 3.0), "skip": (-2.0, 2.0)}
    result, out = run_pass(QuantizeForTensorRT(ranges=ranges), model)
    assert result.stats["nodes"] == 3 and ops(out).count("QuantizeLinear") == 2  # x once, skip once
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert add.input[0] == "a" and add.input[1] != "skip"
    feeds = {"x": seeded((1, 3, 5, 5), 3), "skip": seeded((1, 3, 5, 5), 4)}
    expected = qdq_reference(model, out, feeds)
    for name, value in run_graph(out, feeds).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_trt_does_not_quantize_excluded_layers_or_layers_without_a_range():
    model, _, _ = _linear("MatMul")
    for quantizer in (
        QuantizeForTensorRT(ranges={}),
        QuantizeForTensorRT(ranges={"x": (-1.0, 1.0)}, exclude=("matmul_0",)),
    ):
        model.graph.node[0].name = "matmul_0"
        result, out = run_pass(quantizer, model)
        assert not result.changed and ops(out) == ["MatMul"]


@pytest.mark.parametrize("form, weight_dtype, weight_max", [("u8s8", np.int8, 127), ("u8s8-rr", np.int8, 64),
                                                           ("u8u8", np.uint8, 255)])
def test_ort_forms_have_unsigned_activations_and_their_own_per_channel_weights(form, weight_dtype, weight_max):
    model, _, _ = _linear("Conv")
    x = seeded((2, 3, 6, 6), 2)
    ranges = {"x": (float(x.min()), float(x.max())), "y": (-30.0, 30.0)}
    result, out = run_pass(QuantizeForOnnxRuntime(ranges=ranges, form=form), model)
    assert result.changed and result.stats["form"] == form
    q_act = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert _init(out, q_act.input[2]).dtype == np.uint8
    q, _, zero, axis = _dq_of(out, "Conv")
    assert q.dtype == weight_dtype and axis == 0 and zero.dtype == weight_dtype
    centred = q.astype(np.int64) - zero.astype(np.int64).reshape(-1, 1, 1, 1)
    assert np.abs(centred).max() <= weight_max and (form == "u8u8" or not zero.any())
    if form == "u8s8-rr":  # 7 bits: pairs of 255 * 64 products fit a signed 16-bit sum
        assert 2 * 255 * np.abs(centred).max() <= 2**15 - 1
    conv_out = next(n for n in out.graph.node if n.op_type == "Conv").output[0]
    quantized_y = run_graph(out, {"x": x})["y"]
    # reference: x and W through their Q/DQ pairs, then y through its own (ONNX Runtime quantizes outputs too)
    y = qdq_reference(model, out, {"x": x})["y"]
    q_out = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv_out)
    scale, zp = _init(out, q_out.input[1]), _init(out, q_out.input[2]).astype(np.int64)
    expected = (np.clip(np.round(y / scale) + zp, 0, 255) - zp) * scale
    np.testing.assert_allclose(quantized_y, expected, atol=1e-5, rtol=1e-5)


def test_ort_units_cover_adds_between_two_convs_so_all_in_float_is_fp32():
    import onnx_graphsurgeon as gs

    from passes.quantization import candidates
    from passes.quantize_ort import units

    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]  # no TensorRT candidate: two Conv inputs
    model = make_model(nodes, [("x", F32, [1, 3, 5, 5])], [("y", F32, [1, 3, 5, 5])],
                       {"W1": seeded((3, 3, 3, 3), 1), "W2": seeded((3, 3, 3, 3), 2)})
    model = run_pass(InferShapes(), model)[1]
    ranges = {"x": (-3.0, 3.0), "a": (-9.0, 9.0), "b": (-9.0, 9.0), "y": (-15.0, 15.0)}
    graph = gs.import_onnx(model)
    assert [n.name for n in candidates(graph)] == ["conv1", "conv2"]
    assert [n.name for n in units(graph)] == ["conv1", "conv2", "add"]
    feeds = {"x": seeded((1, 3, 5, 5), 3)}
    expected = run_graph(model, feeds)["y"]

    _, convs_only = run_pass(QuantizeForOnnxRuntime(ranges=ranges, exclude=("conv1", "conv2")), model)
    assert "QuantizeLinear" in ops(convs_only)  # ONNX Runtime's quantizer still quantizes the Add
    assert np.abs(run_graph(convs_only, feeds)["y"] - expected).max() > 1e-3
    result, all_float = run_pass(QuantizeForOnnxRuntime(ranges=ranges, exclude=("conv1", "conv2", "add")), model)
    assert "QuantizeLinear" not in ops(all_float)
    np.testing.assert_allclose(run_graph(all_float, feeds)["y"], expected, atol=1e-6, rtol=1e-6)


def test_ort_units_reach_every_tensor_the_quantizer_touches_with_followers_grouped():
    import onnx_graphsurgeon as gs

    from passes.quantize_ort import units

    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="reflect"),  # fed by the graph input
             helper.make_node("Conv", ["p", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["m"], ["s"], name="sigmoid"),
             helper.make_node("Concat", ["s", "m"], ["y"], name="concat", axis=1)]
    model = make_model(nodes, [("x", F32, [1, 3, 6, 6])], [("y", F32, [1, 8, 3, 3])],
                       {"W": seeded((4, 3, 3, 3), 1), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)})
    model = run_pass(InferShapes(), model)[1]
    feeds = {"x": seeded((1, 3, 6, 6), 2)}
    ranges = {t: (-4.0, 4.0) for t in ("x", "p", "c", "r", "m", "s", "y")}
    found = units(gs.import_onnx(model))
    assert [u.nodes for u in found] == [("pad",), ("conv", "relu", "pool"), ("sigmoid", "concat")]
    expected = run_graph(model, feeds)["y"]

    everything = tuple(n for u in found for n in u.nodes)
    _, all_float = run_pass(QuantizeForOnnxRuntime(ranges=ranges, exclude=everything), model)
    assert "QuantizeLinear" not in ops(all_float)  # every unit in float is the float graph
    np.testing.assert_allclose(run_graph(all_float, feeds)["y"], expected, atol=1e-6, rtol=1e-6)
    _, input_pad_only = run_pass(QuantizeForOnnxRuntime(ranges=ranges, exclude=everything[1:]), model)
    q_inputs = {n.input[0] for n in input_pad_only.graph.node if n.op_type == "QuantizeLinear"}
    assert "x" in q_inputs  # quantizing the input Pad alone quantizes the graph input: a unit of its own
    assert np.abs(run_graph(input_pad_only, feeds)["y"] - expected).max() > 1e-4


def test_the_compute_forms_quantize_layers_but_not_the_residual_arithmetic_around_them():
    import onnx_graphsurgeon as gs

    from passes.quantize_ort import units

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
             helper.make_node("Add", ["h", "x"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "g", "b"], ["n"], name="norm", axis=-1),
             helper.make_node("Relu", ["n"], ["y"], name="act")]
    model = make_model(nodes, [("x", F32, [4, 8])], [("y", F32, [4, 8])],
                       {"W": seeded((8, 8), 1), "g": np.ones(8, F32), "b": np.zeros(8, F32)})
    model = run_pass(InferShapes(), model)[1]
    feeds = {"x": seeded((4, 8), 2)}
    ranges = calibrate(model, [feeds], "max")
    expected = run_graph(model, feeds)["y"]
    graph = gs.import_onnx(model)
    assert [u.name for u in units(graph)] == ["proj", "residual", "norm"]  # every op the quantizer knows
    compute = units(graph, FORMS["u8s8-compute"].op_types)
    assert [u.nodes for u in compute] == [("proj", "act")]  # the Relu joins the layer upstream of the float norm
    _, quantized = run_pass(QuantizeForOnnxRuntime(ranges=ranges, form="u8s8-compute"), model)
    q_tensors = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert {"x", "h"} <= q_tensors and not q_tensors & {"r", "n"}  # the Add's and the norm's outputs stay float
    assert np.abs(run_graph(quantized, feeds)["y"] - expected).max() <= 0.05 * np.abs(expected).max()
    _, all_float = run_pass(QuantizeForOnnxRuntime(ranges=ranges, form="u8s8-compute",
                                                   exclude=tuple(n for u in compute for n in u.nodes)), model)
    assert "QuantizeLinear" not in ops(all_float)
    np.testing.assert_allclose(run_graph(all_float, feeds)["y"], expected, atol=1e-6, rtol=1e-6)


# calibration -----------------------------------------------------------------------------------

def _mlp():
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="second"),
    ]
    return run_pass(InferShapes(), make_model(nodes, [("x", F32, ["n", 8])], [("y", F32, ["n", 4])],
                                              {"W1": seeded((8, 16), 1), "W2": seeded((16, 4), 2)}))[1]


BATCHES = [{"x": seeded((16, 8), i)} for i in range(4)]


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse"])
def test_every_calibration_method_gives_ranges_inside_the_observed_ones(method):
    ranges = calibrate(_mlp(), BATCHES, method)
    observed = np.concatenate([b["x"] for b in BATCHES])
    lo, hi = ranges["x"]
    assert observed.min() - 1e-6 <= lo < 0 < hi <= observed.max() + 1e-6
    assert {"x", "h", "r", "y"} <= set(ranges)


def _int8_mse(values: np.ndarray, t: float) -> float:
    """Squared error of symmetric INT8 with threshold ``t`` on the samples themselves (not a histogram)."""
    s = t / 127.0
    return float(((np.clip(np.round(values / s), -127, 127) * s - values) ** 2).sum())


def test_mse_threshold_clips_outliers_at_the_error_minimum():
    values = np.concatenate([np.random.default_rng(0).standard_normal(100_000), [60.0]])
    hist, edges = np.histogram(np.abs(values), bins=2048)
    lo, hi = mse_range(hist, edges.astype(F32), values.min(), values.max())
    assert 2.0 < hi < 0.8 * 60.0  # the outlier is clipped (its squared error still pulls t far above the bulk)
    assert lo == pytest.approx(max(values.min(), -hi))  # symmetric, cut to the observed minimum
    # the chosen threshold is the minimum of the real error, found here by brute force over a fine grid
    grid = np.linspace(0.5, np.abs(values).max(), 400)
    errors = [_int8_mse(values, t) for t in grid]
    assert _int8_mse(values, hi) <= 1.02 * min(errors)
    assert _int8_mse(values, hi) < 0.7 * _int8_mse(values, np.abs(values).max())  # better than no clipping


def test_mse_range_is_cut_to_the_observed_range():
    values = np.random.default_rng(1).uniform(0.0, 4.0, 10_000)  # one-sided: nothing below 0
    hist, edges = np.histogram(values, bins=512)
    lo, hi = mse_range(hist, edges.astype(F32), values.min(), values.max())
    assert lo == pytest.approx(values.min()) and 0 < hi <= values.max()


def test_cache_is_reused_only_when_graph_data_and_method_match(tmp_path):
    model, path = _mlp(), tmp_path / "calibration.json"
    ranges = calibrate(model, BATCHES, "max")
    g, d = graph_sha256(model), data_sha256(BATCHES)
    save_ranges(path, {"trt": {"graph_sha256": g, "ranges": {k: list(v) for k, v in ranges.items()}}}, "max", d, 64)
    assert load_ranges(path, "trt", g, d, "max") == ranges
    assert load_ranges(path, "trt", g, d, "entropy") is None
    assert load_ranges(path, "trt", g, data_sha256(BATCHES[:2]), "max") is None
    assert load_ranges(path, "ort", g, d, "max") is None
    other = _mlp()
    other.graph.initializer[0].raw_data = np.zeros((8, 16), F32).tobytes()
    assert load_ranges(path, "trt", graph_sha256(other), d, "max") is None
    path.write_text("{broken")
    assert load_ranges(path, "trt", g, d, "max") is None


# calibration data ------------------------------------------------------------------------------

SPEC = InputSpec.parse(["x:float32:[batch=1..16@4,8]"])


def test_calibration_directory_of_npy_and_npz_batches(tmp_path):
    for i in range(5):
        np.save(tmp_path / f"b{i}.npy", seeded((4, 8), i))
    data = load_calibration(str(tmp_path), SPEC)
    assert len(data.calibration) == 4 and len(data.evaluation) == 1 and data.samples == 16


@pytest.mark.parametrize("write, message", [
    (lambda d: None, "holds no .npz or .npy files"),
    (lambda d: np.save(d / "a.npy", np.zeros((4, 8), np.float64)), "a.npy: input 'x': expected dtype float32"),
    (lambda d: np.save(d / "a.npy", np.zeros((4, 9), F32)), r"a.npy: input 'x': dim 1 \(fixed\) is 9"),
    (lambda d: np.savez(d / "a.npz", y=np.zeros((4, 8), F32)), "a.npz: expected inputs x; missing x"),
    (lambda d: (d / "a.npy").write_bytes(b"not numpy"), "a.npy is not a readable NumPy file"),
])
def test_bad_calibration_data_names_the_file_and_the_expected_spec(tmp_path, write, message):
    write(tmp_path)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(str(tmp_path), SPEC)


def test_calibration_from_a_function_and_random_only_when_allowed(tmp_path, caplog):
    (tmp_path / "feeds.py").write_text(
        "import numpy as np\ndef batches():\n    return [{'x': np.ones((2, 8), np.float32) * i} for i in range(3)]\n"
        "def broken():\n    raise OSError('no dataset mounted')\n")
    data = load_calibration(f"{tmp_path}/feeds.py:batches", SPEC)
    assert data.source.startswith("function:") and len(data.calibration) == 2
    with pytest.raises(CalibrationError, match="failed: OSError: no dataset mounted"):
        load_calibration(f"{tmp_path}/feeds.py:broken", SPEC)
    with pytest.raises(CalibrationError, match="--allow-random-calibration"):
        load_calibration(None, SPEC)
    assert load_calibration(None, SPEC, allow_random=True).source == "random"
    assert "CALIBRATING ON RANDOM DATA" in caplog.text


@pytest.mark.parametrize("bad", [1, 4])  # a calibration batch, the held-out batch (evaluation.npz)
def test_token_ids_outside_the_spec_range_are_refused_at_build_with_the_runtime_message(bad, tmp_path, run_cli):
    """Data the runtime would refuse (compare feeds evaluation.npz to it) is refused before any INT8 work."""
    from engines import runtime
    from foundation.errors import RuntimeInputError

    nodes = [helper.make_node("Gather", ["table", "ids"], ["vectors"]),
             helper.make_node("MatMul", ["vectors", "W"], ["y"])]
    onnx.save(make_model(nodes, [("ids", np.int64, ["n", 3])], [("y", F32, ["n", 3, 2])],
                         {"table": seeded((10, 4), 1), "W": seeded((4, 2), 2)}), tmp_path / "emb.onnx")
    spec = "ids:int64:[n=1..8@4,3]:0..10"
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        ids = rng.integers(0, 10, (4, 3))
        ids[0, 1] = 10 if i == bad else ids[0, 1]  # one id past the vocabulary of 10
        np.savez(calib / f"b{i}.npz", ids=ids.astype(np.int64))
    code, _, err = run_cli("build", tmp_path / "emb.onnx", "--input", spec, "-o", tmp_path / "fp32")
    assert code == 0, err
    with runtime.load(tmp_path / "fp32") as engine, pytest.raises(RuntimeInputError) as refused:
        engine.infer({"ids": np.load(calib / f"b{bad}.npz")["ids"]})
    code, _, err = run_cli("build", tmp_path / "emb.onnx", "--input", spec, "--precision", "int8", "--calib", calib,
                           "-o", tmp_path / "int8")
    assert code == CalibrationError.exit_code == 6
    message = " ".join(err.split())  # the CLI wraps long lines
    assert f"b{bad}.npz: {refused.value}" in message and "..10 fall outside the spec's range 0..10" in message
    assert not (tmp_path / "int8").exists()


# budget ----------------------------------------------------------------------------------------

def test_budget_fallback_leaves_the_layer_that_breaks_the_budget_in_float():
    """ISA-independent: trt is judged by float emulation, ort in a form that cannot saturate on this CPU."""
    model = _mlp()
    ranges = calibrate(model, BATCHES, "max")
    ranges["x"] = (-1e4, 1e4)  # a badly calibrated input: quantizing the first layer zeroes its input
    evaluation = [{"x": seeded((32, 8), 9)}]
    for target in ("trt", "ort"):
        strict = quantize_target(model, target, ranges, evaluation, Budget.parse("relerr=0.05", None))
        assert strict.cpu_isa == detect().isa
        assert strict.judged_by == (EMULATED if target == "trt" else f"ONNX Runtime CPU kernels on {detect().isa}")
        if target == "ort":
            assert strict.form.form in candidates(detect().isa) and "u8s8" not in candidates("avx2")
        kept = [k["name"] for k in strict.kept_float]
        assert kept == ["first"] and strict.full_int8 > 0.5 and strict.final <= 0.05
        assert strict.sensitivity[kept[0]] > max(v for n, v in strict.sensitivity.items() if n != kept[0])
        y = run_graph(strict.model, evaluation[0])["y"]
        assert (
            np.abs(y - run_graph(model, evaluation[0])["y"]).max()
            <= 0.05 * np.abs(run_graph(model, evaluation[0])["y"]).max()
        )
        assert any(n.op_type == "DequantizeLinear" for n in strict.model.graph.node)  # the other layer is INT8


def test_budget_parsing_and_defaults():
    assert str(Budget.parse(None, "classification")) == "top1 >= 0.99"
    assert str(Budget.parse(None, "embedding")) == "cosine >= 0.99"
    assert str(Budget.parse(None, None)) == "relerr <= 0.05"
    assert Budget.parse("relerr=0.1", None).met(0.05) and not Budget.parse("top1=0.99", None).met(0.98)


def test_cosine_budget_fails_a_sample_that_collapsed_to_zero():
    """One definition of cosine (foundation.numerics): both all-zero agree; one all-zero does not."""
    from foundation.numerics import budget_metric, cosine_per_sample

    ref = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], F32)
    collapsed = np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], F32)
    np.testing.assert_allclose(cosine_per_sample(ref, collapsed), [1.0, 0.0, 1.0])
    assert budget_metric(Budget("cosine", 0.99), [[ref]], [[collapsed]]) == pytest.approx(2 / 3)
    assert not Budget("cosine", 0.99).met(budget_metric(Budget("cosine", 0.99), [[ref]], [[collapsed]]))


def test_a_budget_with_an_attention_mask_judges_only_the_positions_it_keeps():
    """Padding positions' outputs are discarded by every user: their error neither fails nor dilutes the verdict;
    outputs not led by [batch, seq] (a pooled vector) are judged whole."""
    from foundation.errors import UsageError
    from foundation.numerics import budget_metric, kept_positions, relative_squared_error

    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int64)
    keep = mask.astype(bool)
    hidden, pooled = rng.standard_normal((2, 5, 3)).astype(F32), rng.standard_normal((2, 3)).astype(F32)
    noisy = hidden + 0.05 * rng.standard_normal(hidden.shape).astype(F32)  # a small error everywhere...
    noisy[~keep] = 100.0  # ...and garbage at the padding positions
    pooled_noisy = pooled + 0.01
    names, feeds = ["last_hidden_state", "pooled"], [{"input_ids": mask * 7, "attention_mask": mask}]
    ref, act = [[hidden, pooled]], [[noisy, pooled_noisy]]

    cosine = Budget.parse(None, "embedding").for_inputs(["input_ids", "attention_mask"])
    assert cosine.mask == "attention_mask" and str(cosine) == "cosine >= 0.99 at the positions attention_mask keeps"
    assert Budget.from_json(cosine.to_json()) == cosine
    assert Budget.from_json({"metric": "cosine", "threshold": 0.99}).mask is None  # a manifest from before: whole
    assert Budget.parse(None, "embedding").for_inputs(["x"]).mask is None
    expected = []  # per sample: its kept positions and its pooled vector, one vector
    for b in range(2):
        r = np.concatenate([hidden[b][keep[b]].ravel(), pooled[b]]).astype(np.float64)
        a = np.concatenate([noisy[b][keep[b]].ravel(), pooled_noisy[b]]).astype(np.float64)
        expected.append(r @ a / np.linalg.norm(r) / np.linalg.norm(a))
    value = budget_metric(cosine, ref, act, names, feeds)
    assert value == pytest.approx(np.mean(expected), abs=1e-6) and value > 0.99 and cosine.met(value)
    whole = budget_metric(Budget.parse(None, "embedding"), ref, act, names, feeds)
    assert whole < 0.5  # judged over every position, the padding garbage decides
    assert budget_metric(Budget.parse("cosine@min=0.99", None).for_inputs(["attention_mask"]), ref, act, names,
                         feeds) == pytest.approx(min(expected), abs=1e-6)

    relerr = Budget.parse("last_hidden_state:relerr=0.05", None).for_inputs(["attention_mask"])
    err, scale = np.abs(noisy - hidden)[keep], np.abs(hidden[keep]).max()
    assert budget_metric(relerr, ref, act, names, feeds) == pytest.approx(err.max() / scale, rel=1e-5)
    mean = Budget.parse("last_hidden_state:relerr@mean=0.05", None).for_inputs(["attention_mask"])
    assert budget_metric(mean, ref, act, names, feeds) == pytest.approx(err.mean() / scale, rel=1e-5)  # 21 elements
    sample = Budget.parse("last_hidden_state:relerr@sample=0.05", None).for_inputs(["attention_mask"])
    per = [np.abs(noisy[b] - hidden[b])[keep[b]].max() / np.abs(hidden[b][keep[b]]).max() for b in range(2)]
    assert budget_metric(sample, ref, act, names, feeds) == pytest.approx(max(per), rel=1e-5)

    tokens = rng.standard_normal((2, 5, 4)).astype(F32)  # per-token labels: position (0, 2) flips, padding flips too
    flipped = tokens.copy()
    flipped[0, 2], flipped[~keep] = -flipped[0, 2], -flipped[~keep]
    top1 = Budget.parse("top1=0.5", None).for_inputs(["attention_mask"])
    assert budget_metric(top1, [[tokens]], [[flipped]], ["labels"], feeds) == pytest.approx(6 / 7)
    starts = np.array([[0.1, 0.9, 0.2, 5.0, 0.0], [0.3, 0.1, 2.0, 0.4, 9.0]], F32)  # scores over the positions
    moved = starts.copy()
    moved[1, 3] = 3.0  # the kept argmax of sample 1 moves; the padding maxima (5.0, 9.0) are ignored
    assert budget_metric(top1, [[starts]], [[moved]], ["start"], feeds) == pytest.approx(1 / 2)
    assert budget_metric(Budget.parse("top1=0.5", None), [[starts]], [[moved]], ["start"]) == 1.0  # unmasked: 5.0, 9.0

    keeps = kept_positions(cosine, ref, feeds)
    assert keeps[0][0] is not None and keeps[0][1] is None  # [batch, seq]-led outputs only
    squared = np.square(noisy - hidden)[keep].sum() / np.square(hidden[keep]).sum()
    pooled_squared = np.square(pooled_noisy - pooled).sum() / np.square(pooled).sum()
    assert relative_squared_error(ref, act, keeps) == pytest.approx((squared + pooled_squared) / 2, rel=1e-4)
    with pytest.raises(UsageError, match="the attention_mask of each batch is needed"):
        budget_metric(cosine, ref, act, names)


def test_build_and_compare_judge_a_model_with_an_attention_mask_at_the_positions_it_keeps(tmp_path, run_cli):
    """End to end on a small token model: the manifest's budget records the mask, the build's budget line says so,
    and compare's verdict (and its Polygraphy line) is the masked metric of the stored held-out batches."""
    import json
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from engines.bundle import read_manifest
    from passes.verify import session

    table = seeded((50, 8), 1)
    table[0] *= 40.0  # the padding token's row: large outputs at padding positions, as a real [PAD] may give
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=1),
             helper.make_node("Unsqueeze", ["m", "axis"], ["mu"]), helper.make_node("Add", ["e", "mu"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"])]
    onnx.save(make_model(nodes, [("ids", np.int64, ["n", "s"]), ("attention_mask", np.int64, ["n", "s"])],
                         [("y", F32, ["n", "s", 4])], {"table": table, "W": seeded((8, 4), 2),
                                                      "axis": np.array([2], np.int64)}), tmp_path / "tok.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        lengths = rng.integers(2, 7, 8)
        mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int64)
        np.savez(calib / f"b{i}.npz", ids=rng.integers(1, 50, (8, 6)) * mask, attention_mask=mask)
    inputs = ("--input", "ids:int64:[n=1..8@8,s=1..6@6]:0..50", "--input", "attention_mask:int64:[n,s]:0..2")
    code, out, err = run_cli("build", tmp_path / "tok.onnx", *inputs, "--precision", "int8", "--calib", calib,
                             "--budget", "relerr=0.2", "-o", tmp_path / "b")
    assert code == 0, err
    assert "INT8 ort: budget relerr <= 0.2 at the positions attention_mask keeps met" in " ".join(out.split())
    manifest = read_manifest(tmp_path / "b")
    assert manifest.calibration.budget.mask == manifest.int8_report("ort").budget.mask == "attention_mask"

    saved = tmp_path / "saved" / "inputs.json"
    saved.parent.mkdir()
    code, out, err = run_cli("compare", tmp_path / "b", "--report", tmp_path / "r.json", "--save-inputs", saved)
    assert code == 0, out + err
    pair = next(p for p in json.loads((tmp_path / "r.json").read_text())["compare"]["pairs"]
                if p["runner"] == "onnxruntime model.ort.onnx")
    evaluation = [dict(np.load(f)) for f in sorted(calib.glob("*.npz"))][4::5]  # the held-out batches
    reference = session(tmp_path / "b" / "model.onnx", optimize=True)
    graph = session(tmp_path / "b" / "model.ort.onnx", optimize=True)
    ref = [reference.run(None, b)[0].astype(np.float64) for b in evaluation]
    act = [graph.run(None, b)[0].astype(np.float64) for b in evaluation]
    kept = [b["attention_mask"].astype(bool) for b in evaluation]
    masked = (max(np.abs(a - r)[k].max() for r, a, k in zip(ref, act, kept))
              / max(np.abs(r[k]).max() for r, k in zip(ref, kept)))
    whole = max(np.abs(a - r).max() for r, a in zip(ref, act)) / max(np.abs(r).max() for r in ref)
    assert pair["budget"]["value"] == pytest.approx(masked, rel=1e-5) and abs(masked - whole) > 1e-3
    assert pair["budget"]["value"] == pytest.approx(manifest.int8_report("ort").final, rel=1e-3)  # the build's verdict
    assert pair["budget"]["budget"] == "relerr <= 0.2 at the positions attention_mask keeps" and pair["passed"]
    lines = json.loads((tmp_path / "r.json").read_text())["compare"]["polygraphy_commands"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))  # this checkout's planforge
    for line in (lines[0], next(line for line in lines if "model.ort.onnx" in line)):  # reference, then the INT8 line
        run = subprocess.run([str(Path(sys.executable).with_name("polygraphy")), *shlex.split(line)[1:]], cwd=tmp_path,
                             capture_output=True, text=True, env=env, check=False)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"{pair['budget']['value']:.6g} over 2 batches: PASSED" in run.stdout + run.stderr, run.stdout[-3000:]


def _search(n_layers, heavy, time_limit=None, seen=None):
    """A FallbackSearch over units l0..l{n-1}, the ``heavy`` ones (by index) far more harmful than the rest:
    the error of a graph is the sum of its quantized units' harm (as squared errors roughly add), and the
    budget holds once every heavy unit is in float."""
    from engines.build.int8.sensitivity import FallbackSearch, Trial
    from passes.quantization import Unit

    names = [f"l{i}" for i in range(n_layers)]
    harm = {n: (1.0 + i) if i in heavy else 1e-4 * (1 + i % 3) for i, n in enumerate(names)}
    calls = []

    def evaluate(excluded):
        calls.append(tuple(excluded))
        quantized = [n for n in names if n not in excluded]
        met = not any(names[i] in quantized for i in heavy)
        return Trial(tuple(excluded), 1.0 if met else 0.5, sum(harm[n] for n in quantized))

    units = [Unit(n, "MatMul", (n, f"{n}_relu")) for n in names]  # an anchor with a follower
    def strip_followers(excluded):
        (seen if seen is not None else []).append(tuple(excluded))
        return evaluate(tuple(e for e in excluded if not e.endswith("_relu")))

    search = FallbackSearch(units, strip_followers, Budget("top1", 0.99), "trt", time_limit)
    return search, search.run(), [names[i] for i in sorted(heavy, reverse=True)], calls


def test_fallback_search_keeps_the_most_sensitive_units_in_float_with_fewer_evaluations_than_units():
    for heavy in ({7}, {3, 20, 33}, {0, 1, 2, 3, 4, 5}):
        search, found, worst, calls = _search(40, heavy)
        trial, kept = found
        assert trial.value == 1.0 and [u.name for u in kept] == worst  # exactly the heavy ones, worst first
        assert search.evaluations == len(calls) < 40  # group testing: not one evaluation per unit
        assert all(search.why(n).startswith("sensitivity: quantized alone") for n in worst)


def test_fallback_search_reverts_a_unit_with_its_followers():
    seen = []
    search, found, _, _ = _search(9, {4}, seen=seen)
    trial, kept = found
    assert [u.nodes for u in kept] == [("l4", "l4_relu")] and trial.value == 1.0
    assert ("l4", "l4_relu") in seen  # the follower was excluded with its anchor


def test_fallback_search_past_its_time_limit_keeps_unmeasured_units_in_float():
    search, found, _, calls = _search(12, {1, 5}, time_limit=0.0)
    assert search.sensitivity == {} and len(calls) == 1  # nothing measured: only "all in float" was tried
    trial, kept = found
    assert trial.value == 1.0 and len(kept) == 12
    assert search.why(kept[0].name).startswith("not measured before the INT8 time limit")


def test_cosine_budget_takes_outputs_that_are_not_batch_first():
    from foundation.numerics import budget_metric

    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((4, 3)).astype(F32), rng.standard_normal((2, 4, 5)).astype(F32), np.float32(3.0)]
    same = budget_metric(Budget("cosine", 0.99), [ref], [[x.copy() for x in ref]])
    assert same == pytest.approx(1.0)
    flipped = [ref[0], -ref[1], ref[2]]  # the time-major output reversed: its cosine is -1
    assert budget_metric(Budget("cosine", 0.99), [ref], [flipped]) == pytest.approx((1 - 1 + 1) / 3)


def test_budgets_per_output_with_statistics_parse_measure_and_round_trip():
    from foundation.errors import UsageError
    from foundation.numerics import budget_metric

    rng = np.random.default_rng(0)
    probs, boxes = rng.standard_normal((8, 5)).astype(F32), rng.uniform(0, 100, (8, 4)).astype(F32)
    noisy_boxes = boxes.copy()
    noisy_boxes[0, 0] += 10.0  # one outlier: 10% of the max |box| on one element, nothing elsewhere
    flipped = probs.copy()
    flipped[0] = -flipped[0]  # one sample's top-1 changes
    names = ["probs", "boxes"]
    ref, act = [[probs, boxes]], [[flipped, noisy_boxes]]

    top1 = Budget.parse("probs:top1=0.85", None)
    assert (top1.output, top1.metric, str(top1)) == ("probs", "top1", "probs:top1 >= 0.85")
    assert budget_metric(top1, ref, act, names) == pytest.approx(7 / 8) and top1.met(7 / 8)
    worst = Budget.parse("boxes:relerr=0.05", None)
    value = budget_metric(worst, ref, act, names)
    assert value == pytest.approx(10.0 / boxes.max(), rel=1e-5) and not worst.met(value)
    quantile = Budget.parse("boxes:relerr@p90=0.05", None)  # one element in 32: the 90th percentile ignores it
    assert budget_metric(quantile, ref, act, names) == 0.0 and quantile.met(0.0)
    per_sample = Budget.parse("boxes:relerr@sample=0.05", None)
    assert budget_metric(per_sample, ref, act, names) == pytest.approx(10.0 / boxes[0].max(), rel=1e-5)
    cosine_min = Budget.parse("probs:cosine@min=0.5", None)
    assert budget_metric(cosine_min, ref, act, names) == pytest.approx(-1.0)
    for budget in (top1, worst, quantile, per_sample, cosine_min):
        assert Budget.from_json(budget.to_json()) == budget
    with pytest.raises(UsageError, match="no output 'logits'"):
        Budget.parse("logits:top1=0.9", None).check_outputs(names)
    with pytest.raises(UsageError, match="budget statistic top1@p99"):
        Budget.parse("top1@p99=0.9", None)


def test_a_user_metric_decides_the_budget_with_named_outputs_and_feeds(tmp_path):
    from foundation.errors import UsageError
    from foundation.numerics import budget_metric

    hook = tmp_path / "task.py"
    hook.write_text(
        "import numpy as np\n"
        "def pitch_bins(reference, candidate, feeds):\n"
        "    same = float(np.mean(np.argmax(reference['probs'], -1) == np.argmax(candidate['probs'], -1)))\n"
        "    assert set(feeds) == {'x'} and feeds['x'].shape[0] == reference['probs'].shape[0]\n"
        "    return same, same >= 0.9\n"
    )
    budget = Budget.parse(None, None, metric_hook=f"{hook}:pitch_bins")
    assert budget.metric == "user" and str(budget) == f"{hook}:pitch_bins passes"
    rng = np.random.default_rng(1)
    probs = [rng.standard_normal((4, 6)).astype(F32) for _ in range(3)]
    feeds = [{"x": rng.standard_normal((4, 2)).astype(F32)} for _ in range(3)]
    same = budget_metric(budget, [[p] for p in probs], [[p + 1e-3] for p in probs], ["probs"], feeds)
    assert same == 1.0 and budget.met(same)
    bad = budget_metric(budget, [[p] for p in probs], [[-p] for p in probs], ["probs"], feeds)
    assert bad == 0.0 and not budget.met(bad) and budget.loss(bad) > budget.loss(same)
    assert Budget.from_json(budget.to_json()) == budget
    with pytest.raises(UsageError, match="--budget and --metric both given"):
        Budget.parse("top1=0.9", None, metric_hook=f"{hook}:pitch_bins")
    with pytest.raises(UsageError, match="has no function 'missing'"):
        budget_metric(Budget("user", 0.0, hook=f"{hook}:missing"), [[probs[0]]], [[probs[0]]], ["probs"], feeds[:1])
