"""FuseLinearAffine, FuseMatMulAdd, FuseGelu, FuseLayerNorm, FuseRmsNorm."""

import math

import numpy as np
import pytest
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from passes.fuse_gelu import FuseGelu
from passes.fuse_layer_norm import FuseLayerNorm
from passes.fuse_linear_affine import FuseLinearAffine
from passes.fuse_matmul_add import FuseMatMulAdd
from passes.fuse_rms_norm import FuseRmsNorm
from passes.infer_shapes import InferShapes

F32 = np.float32


def _scalar(v):
    return np.array(v, F32)


def check(pass_obj, model, feeds, expect_ops, stats=None, atol=1e-5):
    """Structure, numbers and idempotence of one pass on one model."""
    model = run_pass(InferShapes(), model)[1]
    result, out = run_pass(pass_obj, model)
    assert result.changed, result
    assert sorted(ops(out)) == sorted(expect_ops)
    if stats is not None:
        assert result.stats == stats
    assert_same_outputs(model, out, feeds, atol=atol)
    again, twice = run_pass(pass_obj, out)
    assert not again.changed and ops(twice) == ops(out)
    return out


def check_not_fired(pass_obj, model, feeds):
    model = run_pass(InferShapes(), model)[1]
    result, out = run_pass(pass_obj, model)
    assert not result.changed and sorted(ops(out)) == sorted(ops(model))
    assert_same_outputs(model, out, feeds)


# FuseLinearAffine ------------------------------------------------------------------------------

def _conv_then(op, const):
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"]), helper.make_node(op, ["c", "k"], ["y"])]
    inits = {"W": seeded((4, 3, 1, 1), 1), "B": seeded((4,), 2), "k": const}
    return make_model(nodes, [("x", F32, ["n", 3, 5, 5])], [("y", F32, ["n", 4, 5, 5])], inits)


@pytest.mark.parametrize("op, const", [
    ("Mul", np.linspace(0.5, 2, 4).astype(F32).reshape(4, 1, 1)),
    ("Div", np.linspace(0.5, 2, 4).astype(F32).reshape(1, 4, 1, 1)),
    ("Add", seeded((4, 1, 1), 3)),
    ("Sub", _scalar(0.25)),
])
def test_linear_affine_folds_per_channel_constants_into_conv(op, const):
    check(FuseLinearAffine(), _conv_then(op, const), {"x": seeded((2, 3, 5, 5))}, ["Conv"], {"fused": 1})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_linear_affine_folds_into_gemm_with_beta_and_trans_b(trans_b):
    w = seeded((6, 4) if trans_b else (4, 6), 1)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=trans_b, beta=0.5, alpha=2.0),
             helper.make_node("Mul", ["g", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inits = {"W": w, "C": seeded((6,), 2), "s": np.linspace(-1, 1, 6).astype(F32), "b": seeded((1, 6), 4)}
    model = make_model(nodes, [("x", F32, ["n", 4])], [("y", F32, ["n", 6])], inits)
    out = check(FuseLinearAffine(), model, {"x": seeded((3, 4))}, ["Gemm"], {"fused": 2})
    assert out.graph.node[0].attribute  # alpha/transB kept


def test_linear_affine_does_not_fire_on_spatial_constants_or_shared_outputs():
    spatial = _conv_then("Mul", seeded((4, 5, 5), 5))  # varies over H and W: not per channel
    check_not_fired(FuseLinearAffine(), spatial, {"x": seeded((2, 3, 5, 5))})
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"]),
             helper.make_node("Relu", ["c"], ["z"])]
    shared = make_model(nodes, [("x", F32, [1, 3, 5, 5])], [("y", F32, [1, 4, 5, 5]), ("z", F32, [1, 4, 5, 5])],
                        {"W": seeded((4, 3, 1, 1)), "k": _scalar(2.0)})
    check_not_fired(FuseLinearAffine(), shared, {"x": seeded((1, 3, 5, 5))})


# FuseMatMulAdd ---------------------------------------------------------------------------------

def _matmul_add(a_shape, bias_shape=(6,)):
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"]), helper.make_node("Add", ["b", "m"], ["y"])]
    out_shape = list(a_shape[:-1]) + [6]
    return make_model(nodes, [("a", F32, list(a_shape))], [("y", F32, out_shape)],
                      {"W": seeded((4, 6), 1), "b": seeded(bias_shape, 2)})


def test_matmul_add_becomes_gemm_for_2d_inputs():
    check(FuseMatMulAdd(), _matmul_add(("n", 4)), {"a": seeded((3, 4))}, ["Gemm"], {"fused": 1})
    check(FuseMatMulAdd(), _matmul_add(("n", 4), (1, 6)), {"a": seeded((3, 4))}, ["Gemm"])


def test_matmul_add_does_not_fire_for_3d_inputs_or_full_matrix_bias():
    check_not_fired(FuseMatMulAdd(), _matmul_add(("b", "s", 4)), {"a": seeded((2, 3, 4))})
    check_not_fired(FuseMatMulAdd(), _matmul_add((3, 4), (3, 6)), {"a": seeded((3, 4))})


# FuseGelu --------------------------------------------------------------------------------------

def _gelu_erf(order: str, opset: int = 18):
    """0.5 * x * (1 + erf(x / sqrt 2)) in the three product orders exporters write."""
    nodes = [helper.make_node("Div", ["x", "r2"], ["d"]) if order != "mul-scale" else
             helper.make_node("Mul", ["x", "ir2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"])]
    if order in ("x-first", "mul-scale"):
        nodes += [helper.make_node("Mul", ["x", "p"], ["xp"]), helper.make_node("Mul", ["xp", "half"], ["y"])]
    elif order == "half-first":
        nodes += [helper.make_node("Mul", ["p", "half"], ["ph"]), helper.make_node("Mul", ["x", "ph"], ["y"])]
    else:  # (0.5 * x) * p
        nodes += [helper.make_node("Mul", ["half", "x"], ["hx"]), helper.make_node("Mul", ["hx", "p"], ["y"])]
    inits = {"r2": _scalar(math.sqrt(2)), "ir2": _scalar(1 / math.sqrt(2)), "one": _scalar(1), "half": _scalar(0.5)}
    return make_model(nodes, [("x", F32, ["n", 8])], [("y", F32, ["n", 8])], inits, opset=opset)


def _gelu_tanh(opset: int = 18):
    nodes = [helper.make_node("Pow", ["x", "three"], ["x3"]), helper.make_node("Mul", ["x3", "k"], ["kx3"]),
             helper.make_node("Add", ["x", "kx3"], ["inner"]), helper.make_node("Mul", ["inner", "c"], ["arg"]),
             helper.make_node("Tanh", ["arg"], ["t"]), helper.make_node("Add", ["t", "one"], ["p"]),
             helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["hx", "p"], ["y"])]
    inits = {"three": _scalar(3), "k": _scalar(0.044715), "c": _scalar(math.sqrt(2 / math.pi)),
             "one": _scalar(1), "half": _scalar(0.5)}
    return make_model(nodes, [("x", F32, ["n", 8])], [("y", F32, ["n", 8])], inits, opset=opset)


X8 = {"x": seeded((4, 8)) * 3}


@pytest.mark.parametrize("order", ["x-first", "half-first", "half-x", "mul-scale"])
def test_gelu_erf_forms_become_contrib_gelu_for_ort(order):
    out = check(FuseGelu(target="ort"), _gelu_erf(order), X8, ["Gelu"], {"erf": 1})
    assert out.graph.node[0].domain == "com.microsoft"
    assert any(o.domain == "com.microsoft" for o in out.opset_import)


def test_gelu_tanh_form_becomes_fast_gelu_for_ort_and_standard_gelu_at_opset_20_for_trt():
    check(FuseGelu(target="ort"), _gelu_tanh(), X8, ["FastGelu"], {"tanh": 1}, atol=1e-4)
    out = check(FuseGelu(target="trt"), _gelu_tanh(opset=20), X8, ["Gelu"], {"tanh": 1}, atol=1e-4)
    assert out.graph.node[0].domain == "" and out.graph.node[0].attribute[0].s == b"tanh"
    check(FuseGelu(target="trt"), _gelu_erf("x-first", opset=20), X8, ["Gelu"], {"erf": 1})


def test_gelu_does_not_fire_below_opset_20_for_trt_or_on_a_wrong_constant():
    check_not_fired(FuseGelu(target="trt"), _gelu_erf("x-first", opset=18), X8)
    wrong = _gelu_erf("x-first")
    wrong.graph.initializer[[i.name for i in wrong.graph.initializer].index("half")].CopyFrom(
        __import__("onnx").numpy_helper.from_array(_scalar(0.6), "half"))
    check_not_fired(FuseGelu(target="ort"), wrong, X8)


# FuseLayerNorm / FuseRmsNorm -------------------------------------------------------------------

def _layer_norm(opset=18, affine=True, axes=(-1,), square="Pow"):
    def mean(inp, out):
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, "axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [inp], [out], axes=list(axes), keepdims=1)
    nodes = [
        mean("x", "mu"),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"])
        if square == "Pow"
        else helper.make_node("Mul", ["d", "d"], ["d2"]),
        mean("d2", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n" if affine else "y"]),
    ]
    inits = {"two": _scalar(2), "eps": _scalar(1e-5), "axes": np.array(axes, np.int64)}
    if affine:
        nodes += [helper.make_node("Mul", ["n", "g"], ["ng"]), helper.make_node("Add", ["ng", "b"], ["y"])]
        inits.update(g=seeded((16,), 1), b=seeded((16,), 2))
    if opset < 18:
        inits.pop("axes")
    return make_model(nodes, [("x", F32, ["b", "s", 16])], [("y", F32, ["b", "s", 16])], inits, opset=opset)


X16 = {"x": seeded((2, 3, 16)) * 2 + 1}


@pytest.mark.parametrize("opset, affine, square", [(18, True, "Pow"), (17, True, "Mul"), (18, False, "Pow")])
def test_layer_norm_chain_becomes_layer_normalization(opset, affine, square):
    check(
        FuseLayerNorm(), _layer_norm(opset, affine, square=square), X16, ["LayerNormalization"], {"fused": 1}, atol=1e-5
    )


def test_layer_norm_does_not_fire_over_a_non_trailing_axis():
    nodes_model = _layer_norm(axes=(1,))
    check_not_fired(FuseLayerNorm(), nodes_model, X16)


def _rms_norm(opset=18, form="div", weight=True):
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["x2"]),
        helper.make_node("ReduceMean", ["x2", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["r"]),
    ]
    out = "n" if weight else "y"
    if form == "div":
        nodes.append(helper.make_node("Div", ["x", "r"], [out]))
    else:
        nodes += [helper.make_node("Reciprocal", ["r"], ["ir"]), helper.make_node("Mul", ["x", "ir"], [out])]
    inits = {"two": _scalar(2), "eps": _scalar(1e-6), "axes": np.array([-1], np.int64)}
    if weight:
        nodes.append(helper.make_node("Mul", ["n", "w"], ["y"]))
        inits["w"] = seeded((16,), 3)
    return make_model(nodes, [("x", F32, ["b", 16])], [("y", F32, ["b", 16])], inits, opset=opset)


@pytest.mark.parametrize("form, weight", [("div", True), ("reciprocal", True), ("div", False)])
def test_rms_norm_becomes_simplified_layer_norm_for_ort(form, weight):
    out = check(FuseRmsNorm(target="ort"), _rms_norm(form=form, weight=weight), {"x": seeded((3, 16))},
                ["SimplifiedLayerNormalization"], {"fused": 1})
    assert out.graph.node[0].domain == ""  # ONNX Runtime registers it in the default domain


def test_rms_norm_becomes_standard_rms_normalization_at_opset_23_for_trt_only():
    check(FuseRmsNorm(target="trt"), _rms_norm(opset=23), {"x": seeded((3, 16))}, ["RMSNormalization"])
    check_not_fired(FuseRmsNorm(target="trt"), _rms_norm(opset=18), {"x": seeded((3, 16))})


def test_rms_norm_does_not_fire_when_the_mean_is_over_another_tensor():
    model = _rms_norm()
    for node in model.graph.node:
        if node.op_type == "Div":
            node.input[0] = "x2"  # x^2 / rms: not an RMSNorm
    check_not_fired(FuseRmsNorm(target="ort"), model, {"x": seeded((3, 16))})
