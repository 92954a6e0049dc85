"""``PruneUnits`` (passes/prune_units.py) and its matcher (passes/prune_match.py): the pruned graph equals
the original MLP with the removed units' contributions gone and the least-squares refit applied (computed
here in NumPy, independently of the pass), for BERT's GELU MLP and LLaMA's gated one; the refit beats plain
removal; units visible outside the MLP are never removed."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.base import to_model
from passes.prune_match import unit_groups
from passes.prune_units import Moments, PruneUnits, refit
from passes.verify import run_graph

D, H = 16, 64
RNG = np.random.default_rng(0)
W1, B1 = RNG.standard_normal((D, H)).astype(np.float32) * 0.4, RNG.standard_normal(H).astype(np.float32) * 0.1
WG = RNG.standard_normal((D, H)).astype(np.float32) * 0.4
W2, B2 = RNG.standard_normal((H, D)).astype(np.float32) * 0.3, RNG.standard_normal(D).astype(np.float32) * 0.1
# correlated inputs (a low-rank mix), so some units are predictable from others and the refit has work to do
MIX = RNG.standard_normal((D, D)).astype(np.float32) * np.linspace(1.5, 0.05, D, dtype=np.float32)[:, None]


def _batches(count=8, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((4, 12, D)).astype(np.float32) @ MIX)} for _ in range(count)]


def _gelu(v):
    from scipy.special import erf  # scipy comes with scikit-learn

    return 0.5 * v * (1 + erf(v / np.sqrt(2)))


def _model(gated=False, expose_hidden=False, shared_down=False, transpose=False) -> onnx.ModelProto:
    """x -> [MatMul W1 + b1 -> GELU as exported (Div, Erf, Add, Mul, Mul)] or [SiLU(x WG) * (x W1)] -> MatMul W2
    -> + b2 -> + x (residual)."""
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "w1"), (B1, "b1"), (W2, "w2"), (B2, "b2"),
                                                           (WG, "wg"))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((np.sqrt(2), "c_sqrt2"), (1.0, "c_one"),
                                                                                 (0.5, "c_half"))]
    if gated:
        nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"]), helper.make_node("Sigmoid", ["g"], ["sg"]),
                 helper.make_node("Mul", ["g", "sg"], ["silu"]), helper.make_node("MatMul", ["x", "w1"], ["u"]),
                 helper.make_node("Mul", ["silu", "u"], ["hidden"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["u0"]), helper.make_node("Add", ["u0", "b1"], ["u"]),
                 helper.make_node("Div", ["u", "c_sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "c_one"], ["e1"]), helper.make_node("Mul", ["u", "e1"], ["m"]),
                 helper.make_node("Mul", ["m", "c_half"], ["hidden0"])]
        if transpose:
            nodes += [helper.make_node("Transpose", ["hidden0"], ["t"], perm=[0, 1, 2]),
                      helper.make_node("Identity", ["t"], ["hidden"])]
        else:
            nodes += [helper.make_node("Identity", ["hidden0"], ["hidden"])]
    nodes += [helper.make_node("MatMul", ["hidden", "w2"], ["down"]), helper.make_node("Add", ["down", "b2"], ["y0"]),
              helper.make_node("Add", ["y0", "x"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", D])]
    if expose_hidden:
        outputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", H]))
    if shared_down:  # the down weight read by a second MatMul
        nodes.append(helper.make_node("MatMul", ["hidden", "w2"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["b", "s", D]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _hidden(x, gated):
    if gated:
        g = x @ WG
        return (g / (1 + np.exp(-g))) * (x @ W1)
    return _gelu(x @ W1 + B1)


def _pruned(model, ratio, **kwargs):
    graph = gs.import_onnx(model)
    result = PruneUnits(ratio, _batches(), **kwargs).run(graph)
    return to_model(graph, model), result


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "gated"])
def test_the_pruned_mlp_equals_the_kept_units_with_the_least_squares_refit(gated):
    model = _model(gated)
    pruned, result = _pruned(model, 0.5)
    assert result.changed and result.stats["units_removed"] == 32 and result.stats["pruned"] == 1
    weights = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert weights["w1"].shape == (D, 32) and weights["w2"].shape == (32, D)
    if gated:
        assert weights["wg"].shape == (D, 32)  # the gate shrinks with the up-projection
    # the reference, in NumPy: moments of the hidden activations, kept units by var * |W2 row|^2, refit
    rows = np.concatenate([_hidden(b["x"], gated).reshape(-1, H) for b in _batches()]).astype(np.float64)
    moments = Moments(rows.sum(0), rows.T @ rows, len(rows))
    score = rows.var(axis=0) * np.sum(W2.astype(np.float64) ** 2, axis=1)
    keep = np.sort(np.argsort(-score, kind="stable")[:32])
    w2, delta = refit(W2, moments, keep)
    np.testing.assert_allclose(weights["w2"], w2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights["w1"], W1[:, keep])
    x = _batches(1, seed=7)[0]["x"]
    expected = _hidden(x, gated)[..., keep] @ w2 + B2 + delta + x
    np.testing.assert_allclose(run_graph(pruned, {"x": x})["y"], expected, rtol=1e-4, atol=1e-4)


def test_the_refit_recovers_more_than_removing_the_units_alone():
    model = _model()
    x = _batches(4, seed=9)
    original = [run_graph(model, b)["y"] for b in x]
    pruned, _ = _pruned(model, 0.5)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    graph = gs.import_onnx(plain)
    # plain removal: the same units, the original down rows, no bias change
    kept = np.sort(np.argsort(-(np.concatenate([_hidden(b["x"], False).reshape(-1, H) for b in _batches()]).var(0)
                                 * np.sum(W2 ** 2, axis=1)), kind="stable")[:32])
    for tensor in graph.tensors().values():
        if tensor.name == "w1":
            tensor.values = W1[:, kept]
        elif tensor.name == "b1":
            tensor.values = B1[kept]
        elif tensor.name == "w2":
            tensor.values = W2[kept]
    plain = to_model(graph, model)

    def error(candidate):
        return np.mean([np.mean((run_graph(candidate, b)["y"] - o) ** 2) for b, o in zip(x, original)])
    assert error(pruned) < 0.5 * error(plain)


@pytest.mark.parametrize("case", ["expose_hidden", "shared_down", "transpose"])
def test_units_visible_outside_the_mlp_are_never_removed(case):
    """A hidden tensor that is a graph output, a down weight another MatMul reads, a non-elementwise op between the
    projections: no group, nothing changes."""
    model = _model(**{case: True})
    assert unit_groups(gs.import_onnx(model)) == []
    pruned, result = _pruned(model, 0.5)
    assert not result.changed
    assert {i.name: numpy_helper.to_array(i).shape for i in pruned.graph.initializer}["w2"] == (H, D)


def test_ratio_zero_changes_nothing_and_a_pruned_graph_prunes_no_further_at_zero():
    model = _model()
    _, result = _pruned(model, 0.0)
    assert not result.changed
    pruned, _ = _pruned(model, 0.25)
    again, result = _pruned(pruned, 0.0)
    assert not result.changed and [n.op_type for n in again.graph.node] == [n.op_type for n in pruned.graph.node]
    with pytest.raises(ValueError, match="ratio"):
        PruneUnits(1.5, [])


C_IN, C_MID, C_OUT = 8, 32, 16


def _conv_model(kernel=1, residual=False):
    """x -> Conv 3x3 (+bias) -> BatchNormalization -> Relu -> MaxPool -> Conv kernel x kernel (no bias) -> y; with
    ``residual``, an Add of another branch before the second Conv, that branch read elsewhere too (a graph output,
    as a ResNet block's identity is read by the next block)."""
    rng = np.random.default_rng(3)
    arrays = {"w1": rng.standard_normal((C_MID, C_IN, 3, 3)).astype(np.float32) * 0.3,
              "b1": rng.standard_normal(C_MID).astype(np.float32) * 0.1,
              "gamma": rng.uniform(0.5, 1.5, C_MID).astype(np.float32),
              "beta": rng.standard_normal(C_MID).astype(np.float32),
              "mean": rng.standard_normal(C_MID).astype(np.float32) * 0.1,
              "var": rng.uniform(0.5, 1.5, C_MID).astype(np.float32),
              "w2": rng.standard_normal((C_OUT, C_MID, kernel, kernel)).astype(np.float32) * 0.2,
              "wr": rng.standard_normal((C_MID, C_IN, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2])]
    hidden = "p"
    if residual:
        nodes += [helper.make_node("Conv", ["x", "wr"], ["side"], name="side", strides=[2, 2]),
                  helper.make_node("Add", ["p", "side"], ["sum"])]
        hidden = "sum"
    pads = [kernel // 2] * 4
    nodes.append(helper.make_node("Conv", [hidden, "w2"], ["y"], name="conv2", pads=pads))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", C_OUT, 6, 6])]
    if residual:
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["b", C_MID, 6, 6]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", C_IN, 12, 12])]
    graph = helper.make_graph(nodes, "cnn", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, arrays


def _conv_batches(count=6, seed=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, C_IN, 12, 12)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("kernel", [1, 3], ids=["pointwise refit", "3x3 bias compensation"])
def test_conv_channels_go_from_both_convs_and_the_channelwise_ops_between(kernel):
    """Channels of conv1 leave its filters, its bias, the BatchNormalization's four parameters and conv2's input
    channels; a 1x1 conv2 is refit by least squares, a 3x3 one keeps its kernels and gets the removed channels'
    mean contribution as a bias. The pruned graph equals that computation (the expected model built here from
    NumPy weights, run by ONNX Runtime)."""
    model, a = _conv_model(kernel)
    graph = gs.import_onnx(model)
    result = PruneUnits(0.5, _conv_batches()).run(graph)
    pruned = to_model(graph, model)
    assert result.stats["pruned"] == 1 and result.stats["units_removed"] == 16
    # the reference: moments of the pooled activations (conv2's input), one row per pixel
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name="p"))
    rows = np.concatenate([np.moveaxis(run_graph(probe, b)["p"], 1, -1).reshape(-1, C_MID) for b in _conv_batches()])
    rows = rows.astype(np.float64)
    moments = Moments(rows.sum(0), rows.T @ rows, len(rows))
    w2 = a["w2"].astype(np.float64)
    score = rows.var(axis=0) * np.sum(np.moveaxis(w2, 1, 0).reshape(C_MID, -1) ** 2, axis=1)
    keep = np.sort(np.argsort(-score, kind="stable")[:16])
    removed = np.setdiff1d(np.arange(C_MID), keep)
    if kernel == 1:
        matrix, delta = refit(w2[:, :, 0, 0].T, moments, keep)
        new_w2 = matrix.T[:, :, None, None]
    else:
        new_w2, delta = w2[:, keep], np.einsum("c,ocij->o", rows.mean(0)[removed], w2[:, removed])
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    values = {"w1": a["w1"][keep], "b1": a["b1"][keep], "gamma": a["gamma"][keep], "beta": a["beta"][keep],
              "mean": a["mean"][keep], "var": a["var"][keep], "w2": new_w2.astype(np.float32)}
    for init in expected.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    expected.graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), "delta"))
    expected.graph.node[-1].input.append("delta")
    x = _conv_batches(1, seed=11)[0]
    np.testing.assert_allclose(run_graph(pruned, x)["y"], run_graph(expected, x)["y"], rtol=1e-4, atol=1e-4)


def test_a_residual_branch_read_elsewhere_leaves_the_pair_whole():
    model, _ = _conv_model(1, residual=True)
    assert [g.name for g in unit_groups(gs.import_onnx(model))] == []
    graph = gs.import_onnx(model)
    assert not PruneUnits(0.5, _conv_batches()).run(graph).changed
