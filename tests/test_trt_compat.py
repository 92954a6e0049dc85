"""``planforge check-trt``: what the TensorRT ONNX parser refuses, predicted on the CPU from its operator
table, and the Q/DQ placement lint. Each rule has a planted graph that trips it and one that must not."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.trt_build.compat import check_model
from engines.trt_build.compat.table import DATA, load_table

F, I64 = TensorProto.FLOAT, TensorProto.INT64
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "trt_onnx_operators.md"


def model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)  # ORT reads <= 10


def rules(m, status=None):
    return sorted({(f.rule, f.node) for f in check_model(m).findings if status is None or f.status == status})


def unary(op, dtype=F, shape=(2, 3), **attrs):
    return model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [("x", dtype, shape)], [("y", dtype, None)])


def test_the_table_holds_every_row_of_the_tensorrt_11_1_parser_document():
    table = load_table("11.1")
    doc = json.loads((DATA / "onnx_operators_11.1.json").read_text())
    assert len(table.operators) == doc["rows"] == 201 and sum(o.supported for o in table.operators.values()) == 159
    assert "7c51a63a719180eb5160c874c111746f3fb46a6b" in table.source and (table.opset_min, table.opset_max) == (9, 24)
    if not REFERENCE.is_file():
        pytest.skip("the reference transcription is not beside this checkout")
    rows = re.findall(r"^\| (\w+) \| ([YN]) \|", REFERENCE.read_text(), re.M)
    assert {op: s == "Y" for op, s in rows} == {op: o.supported for op, o in table.operators.items()}


@pytest.mark.parametrize(
    "graph, expected",
    [
        (unary("Unique"), [("unsupported-op", "n")]),
        (unary("Relu"), []),
        (
            model(
                [helper.make_node("Gelu", ["x"], ["y"], name="n", domain="com.microsoft")],
                [("x", F, (2,))],
                [("y", F, None)],
            ),
            [("plugin", "n")],
        ),
        (
            model(
                [helper.make_node("QLinearMatMul", list("abcdefgh"), ["y"], name="n")],
                [(c, F, (2,)) for c in "abcdefgh"],
                [("y", F, None)],
            ),
            [("unsupported-op", "n")],
        ),
        (
            model([helper.make_node("Relu", ["x"], ["y"], name="n")], [("x", F, (2,))], [("y", F, None)], opset=25),
            [("opset", "(model)")],
        ),
        (unary("NonZero", TensorProto.BFLOAT16), [("type", "n")]),
        (unary("NonZero", TensorProto.FLOAT16), []),
        (unary("Sqrt", TensorProto.DOUBLE), [("type", "n")]),
    ],
)
def test_operators_domains_opsets_and_types(graph, expected):
    assert rules(graph) == expected


def test_double_is_a_check_and_bf16_where_not_listed_is_refused():
    assert rules(unary("Sqrt", TensorProto.DOUBLE), "check") == [("type", "n")]
    assert rules(unary("NonZero", TensorProto.BFLOAT16), "refused") == [("type", "n")]


def test_uint8_only_at_network_io_and_quantized_types_only_through_qdq():
    cast_in = model([helper.make_node("Cast", ["x"], ["y"], name="c", to=F)], [("x", TensorProto.UINT8, (2,))],
                    [("y", F, None)])
    assert rules(cast_in) == []
    inside = model([helper.make_node("Cast", ["x"], ["u"], name="c1", to=TensorProto.UINT8),
                    helper.make_node("Cast", ["u"], ["y"], name="c2", to=F)], [("x", F, (2,))], [("y", F, None)])
    assert rules(inside) == [("uint8", "c1")]
    int8_cast = model([helper.make_node("Cast", ["x"], ["q"], name="c1", to=TensorProto.INT8),
                       helper.make_node("Cast", ["q"], ["y"], name="c2", to=F)], [("x", F, (2,))], [("y", F, None)])
    assert rules(int8_cast) == [("quantized-type", "c1"), ("quantized-type", "c2")]
    qdq = model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")], [("x", F, (2,))],
                [("y", F, None)], [("s", np.float32(0.1)), ("z", np.int8(0))])
    assert rules(qdq) == []


def _qdq(zero_point, computed=False):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    inits = [("s", np.float32(0.1))]
    inputs = [("x", F, (2,))]
    if computed:
        inputs.append(("z", TensorProto.INT8, ()))
    else:
        inits.append(("z", np.int8(zero_point)))
    return model(nodes, inputs, [("y", F, None)], inits)


def test_qdq_zero_points_must_be_zero():
    assert rules(_qdq(3), "refused") == [("qdq-zero-point", "dq"), ("qdq-zero-point", "q")]
    assert rules(_qdq(0)) == []
    assert rules(_qdq(0, computed=True), "check") == [("qdq-zero-point", "dq"), ("qdq-zero-point", "q")]


def _reduce(axes_from_input):
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="n", keepdims=1)]
    if axes_from_input:
        return model(nodes, [("x", F, (2, 3)), ("axes", I64, (1,))], [("y", F, None)], opset=18)
    return model(nodes, [("x", F, (2, 3))], [("y", F, None)], [("axes", np.array([1], np.int64))], opset=18)


def test_inputs_that_must_be_initializers():
    assert rules(_reduce(True), "refused") == [("constant-input", "n")]
    assert rules(_reduce(False)) == []
    squeeze = model([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="n")],
                    [("x", F, (1, 3)), ("axes", I64, (1,))], [("y", F, None)])
    assert rules(squeeze, "check") == [("constant-input", "n")]


def _topk(k, sorted_=1, computed=False):
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="n", sorted=sorted_)
    inputs = [("x", F, (2, 5000))] + ([("k", I64, (1,))] if computed else [])
    inits = [] if computed else [("k", np.array([k], np.int64))]
    return model([node], inputs, [("v", F, None), ("i", I64, None)], inits)


def test_topk_k_below_3840_and_sorted():
    assert rules(_topk(10)) == []
    assert rules(_topk(4000), "refused") == [("attribute", "n")]
    assert rules(_topk(10, sorted_=0), "refused") == [("attribute", "n")]
    assert rules(_topk(10, computed=True), "check") == [("constant-input", "n")]


def test_pooling_rank_dilations_and_indices():
    assert rules(unary("MaxPool", shape=(1, 3, 8, 8), kernel_shape=[2, 2])) == []
    assert rules(unary("MaxPool", shape=(1, 3, 8), kernel_shape=[2])) == [("rank", "n")]
    assert rules(unary("MaxPool", shape=(1, 3, 8, 8), kernel_shape=[2, 2], dilations=[2, 2])) == [("attribute", "n")]
    indices = model([helper.make_node("MaxPool", ["x"], ["y", "i"], name="n", kernel_shape=[2, 2])],
                    [("x", F, (1, 3, 8, 8))], [("y", F, None), ("i", I64, None)])
    assert rules(indices) == [("outputs", "n")]


def test_attribute_restrictions_resize_scatter_lstm_layernorm_dropout():
    def resize(**attrs):
        return model(
            [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="n", **attrs)],
            [("x", F, (1, 3, 4, 4))],
            [("y", F, None)],
            [("scales", np.array([1, 1, 2, 2], np.float32))],
        )
    assert rules(resize(mode="linear")) == []
    assert rules(resize(mode="cubic")) == [("attribute", "n")]
    assert rules(resize(mode="linear", antialias=1), "refused") == [("attribute", "n")]
    scatter = model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="n", reduction="add")],
                    [("x", F, (4,)), ("i", I64, (1, 1)), ("u", F, (1,))], [("y", F, None)], opset=18)
    assert rules(scatter) == [("attribute", "n")]
    lstm = model([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="n", hidden_size=2, layout=1)],
                 [("x", F, (1, 2, 3))], [("y", F, None)],
                 [("w", np.zeros((1, 8, 3), np.float32)), ("r", np.zeros((1, 8, 2), np.float32))])
    assert rules(lstm) == [("attribute", "n")]
    layer_norm = model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="n")],
                       [("x", F, (2, 3))], [("y", F, None), ("mean", F, None)], [("g", np.ones(3, np.float32))])
    assert rules(layer_norm) == [("outputs", "n")]
    dropout = model([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="n")], [("x", F, (2,))], [("y", F, None)],
                    [("r", np.float32(0.5)), ("t", np.bool_(True))])
    assert rules(dropout) == [("constant-input", "n")]


def test_the_standard_attention_op_needs_4d_and_no_cache():
    def attention(rank, past=False):
        shape = (1, 2, 4, 8) if rank == 4 else (1, 4, 16)
        inputs = ["q", "k", "v"] + (["", "pk", "pv"] if past else [])
        extra = [("pk", F, shape), ("pv", F, shape)] if past else []
        attrs = {} if rank == 4 else {"q_num_heads": 2, "kv_num_heads": 2}
        return model([helper.make_node("Attention", inputs, ["y"], name="n", **attrs)],
                     [("q", F, shape), ("k", F, shape), ("v", F, shape), *extra], [("y", F, None)], opset=23)
    assert rules(attention(4)) == []
    assert rules(attention(3)) == [("rank", "n")]
    assert rules(attention(4, past=True)) == [("inputs", "n")]


# --- Q/DQ placement --------------------------------------------------------------------------------

def _conv(quantize_weight=True, axis=0, scale=0.05, residual=None):
    """x -> Q/DQ -> Conv(W via DQ) [-> Add(residual)]."""
    w = np.random.default_rng(0).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    inits = [("s", np.float32(scale)), ("z", np.int8(0)), ("wq", w), ("ws", np.full(4 if axis == 0 else 3, 0.01,
                                                                                      np.float32)),
             ("wz", np.zeros(4 if axis == 0 else 3, np.int8)), ("wf", w.astype(np.float32) * 0.01)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx")]
    if quantize_weight:
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=axis))
    nodes.append(helper.make_node("Conv", ["xd", "wd" if quantize_weight else "wf"], ["c"], name="conv", pads=[1] * 4))
    inputs, out = [("x", F, (1, 3, 8, 8))], "c"
    if residual is not None:
        inputs.append(("r", F, (1, 4, 8, 8)))
        other = "r"
        if residual == "quantized":
            nodes += [helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="qr"),
                      helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd"], name="dqr")]
            other = "rd"
        nodes.append(helper.make_node("Add", ["c", other], ["sum"], name="add"))
        out = "sum"
    return model(nodes, inputs, [(out, F, None)], inits)


def test_qdq_placement_on_weighted_layers():
    assert rules(_conv()) == []
    assert rules(_conv(quantize_weight=False), "check") == [("qdq-inputs", "conv")]
    assert rules(_conv(axis=1), "check") == [("qdq-weight-axis", "conv")]
    assert rules(_conv(scale=0.0), "refused") == [("qdq-scale", "dqx"), ("qdq-scale", "qx")]
    assert rules(_conv(scale=float("inf")), "refused") == [("qdq-scale", "dqx"), ("qdq-scale", "qx")]


def test_qdq_residual_add_and_stray_pairs():
    assert rules(_conv(residual="float"), "check") == [("qdq-residual", "add")]
    assert rules(_conv(residual="quantized")) == []
    stray = model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                   helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
                   helper.make_node("Softmax", ["d"], ["y"], name="softmax")], [("x", F, (2, 3))], [("y", F, None)],
                  [("s", np.float32(0.1)), ("z", np.int8(0))])
    assert rules(stray, "check") == [("qdq-placement", "dq")]
    twice = model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"], name="q1"),
                   helper.make_node("QuantizeLinear", ["x", "s2", "z"], ["q2"], name="q2"),
                   helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="dq1"),
                   helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["d2"], name="dq2"),
                   helper.make_node("Add", ["d1", "d2"], ["y"], name="add")], [("x", F, (2, 3))], [("y", F, None)],
                  [("s", np.float32(0.1)), ("s2", np.float32(0.2)), ("z", np.int8(0))])
    assert rules(twice, "check") == [("qdq-twice", "q2")]


# --- the CLI and the build -----------------------------------------------------------------------

def test_check_trt_cli_on_bundles_and_files(build_root, tmp_path, run_cli):
    from engines.build import BuildRequest, build

    bundle = build(BuildRequest("mlp", out=build_root / "mlp-compat", precision="int8", build_root=build_root)).out
    code, out, err = run_cli("check-trt", bundle, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["refused"] == 0 and report["graph"].endswith("model.trt.onnx") and report["nodes"] > 0
    from engines.bundle import read_manifest
    assert read_manifest(bundle).trt_check["refused"] == 0  # the build recorded the same verdict
    ort_graph = bundle / read_manifest(bundle).backends.ort.graph
    code, out, err = run_cli("check-trt", ort_graph, "--as-is")
    assert code == 12 and "refused" in err and "Traceback" not in err  # ONNX Runtime's INT8 form: UINT8, zero points
    assert "UINT8 inside the network" in out or "zero point" in out


def test_a_refused_operator_fails_a_require_trt_build_before_any_tensorrt_call(tmp_path, run_cli):
    path = tmp_path / "unique.onnx"
    m = model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
               helper.make_node("Unique", ["r"], ["y"], name="unique", sorted=1)],
              [("x", F, (8,))], [("y", F, ("n",))])
    onnx.save(m, str(path))
    code, out, err = run_cli("build", path, "-o", tmp_path / "b")
    assert code == 0, err
    from engines.bundle import read_manifest
    check = read_manifest(tmp_path / "b").trt_check
    assert check["refused"] == 1 and check["findings"][0]["node"] == "unique"
    assert "1 refused" in out
    code, _, err = run_cli("build", path, "-o", tmp_path / "c", "--require-trt")
    assert code == 7 and "Unique" in err and "--require-trt" in err and not (tmp_path / "c").exists()


SMALL = {"resnet18": ("x:float32:[batch=1..2@1,3,32,32]",), "mobilenet_v2": ("x:float32:[batch=1..2@1,3,32,32]",),
         "vit_tiny": ("x:float32:[batch=1..2@1,3,224,224]",),
         "bert_tiny": ("input_ids:int64:[batch=1..2@1,seq=4..16@8]:0..30522", "attention_mask:int64:[batch,seq]:1..2")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "resnet18", "mobilenet_v2", "vit_tiny", "bert_tiny", "gpt_tiny", "digits_cnn"])
def test_every_zoo_models_trt_graph_is_clean_in_fp32_and_fp16(name, build_root, tmp_path):
    from exporter.export import export_onnx
    from exporter.resolve import resolve
    from passes import PassManager, pipeline

    resolved = resolve(name, build_root / ".cache")
    spec = resolved.input_spec.override(SMALL.get(name, ()))
    export_onnx(resolved.module, spec, resolved.output_names, tmp_path / "model.onnx")
    exported = onnx.load(str(tmp_path / "model.onnx"))
    for precision in ("fp32", "fp16"):
        graph, _ = PassManager(pipeline("trt", precision)).run(exported)
        report = check_model(graph)
        assert report.findings == (), (precision, [(f.node, f.rule, f.message) for f in report.findings])
        assert report.nodes == len(graph.graph.node)


@pytest.mark.parametrize(
    "graph, expected",
    [
        (
            model(
                [helper.make_node("GridSample", ["x", "g"], ["y"], name="n")],
                [("x", F, (1, 1, 4, 4, 4)), ("g", F, (1, 2, 2, 2, 3))],
                [("y", F, None)],
                opset=20,
            ),
            [("rank", "n")],
        ),
        (
            model(
                [helper.make_node("GridSample", ["x", "g"], ["y"], name="n")],
                [("x", F, (1, 1, 4, 4)), ("g", F, (1, 2, 2, 2))],
                [("y", F, None)],
            ),
            [],
        ),
        (unary("EyeLike", shape=(3, 3)), []),
        (unary("EyeLike", shape=("n", 3)), [("static-shape", "n")]),
        (unary("RandomNormalLike", seed=1.0), [("attribute", "n")]),
        (unary("RandomNormalLike"), []),
        (
            model(
                [helper.make_node("CumSum", ["x", "axis"], ["y"], name="n")],
                [("x", F, (2, 3)), ("axis", I64, ())],
                [("y", F, None)],
            ),
            [("constant-input", "n")],
        ),
        (
            model(
                [helper.make_node("CumSum", ["x", "axis"], ["y"], name="n")],
                [("x", F, (2, 3))],
                [("y", F, None)],
                [("axis", np.int64(1))],
            ),
            [],
        ),
        (
            model(
                [
                    helper.make_node(
                        "If",
                        ["c"],
                        ["y"],
                        name="n",
                        then_branch=helper.make_graph(
                            [helper.make_node("Identity", ["x"], ["t"])],
                            "t",
                            [],
                            [helper.make_tensor_value_info("t", F, (2,))],
                        ),
                        else_branch=helper.make_graph(
                            [helper.make_node("Neg", ["x"], ["e"])],
                            "e",
                            [],
                            [helper.make_tensor_value_info("e", F, (2,))],
                        ),
                    )
                ],
                [("c", TensorProto.BOOL, ()), ("x", F, (2,))],
                [("y", F, None)],
            ),
            [("control-flow", "n")],
        ),
        (
            model(
                [
                    helper.make_node(
                        "If",
                        ["c"],
                        ["y"],
                        name="n",
                        then_branch=helper.make_graph(
                            [helper.make_node("Unique", ["x"], ["t"], name="u")],
                            "t",
                            [],
                            [helper.make_tensor_value_info("t", F, None)],
                        ),
                        else_branch=helper.make_graph(
                            [helper.make_node("Neg", ["x"], ["e"])],
                            "e",
                            [],
                            [helper.make_tensor_value_info("e", F, None)],
                        ),
                    )
                ],
                [("c", TensorProto.BOOL, ()), ("x", F, (2,))],
                [("y", F, None)],
            ),
            [("control-flow", "n"), ("unsupported-op", "u")],
        ),
        (
            model(
                [helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="n", hidden_size=2)],
                [("x", F, (1, 2, 3))],
                [("y", F, None)],
                [("w", np.zeros((1, 8, 3), np.float32)), ("r", np.zeros((1, 8, 2), np.float32))],
            ),
            [],
        ),
    ],
)
def test_more_restrictions_each_with_a_case_that_passes(graph, expected):
    assert rules(graph) == expected
