"""2:4 structured sparsity (passes/sparsify_24.py, engines/build/sparsity.py): the pattern along the input
channels of Conv, MatMul and Gemm weights, the two largest of every four kept, the graph's numbers equal to
the layer run with the sparsified weight, zeros kept by FP16 conversion, ineligible layers untouched; the
build keeps the budget, records which layers went sparse, and check-trt reads them back."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import InferShapes, PassManager
from passes.base import to_model
from passes.convert_fp16 import ConvertToFp16
from passes.sparsify_24 import Sparsify24, holds_pattern, sparse_layers, sparsify
from passes.verify import run_graph

RNG = np.random.default_rng(0)


def test_two_of_every_four_input_channel_weights_are_zeroed_the_two_largest_kept():
    w = RNG.standard_normal((6, 8, 3, 3)).astype(np.float32)  # Conv [O, I, kh, kw]: groups along I
    s = sparsify(w, 1)
    assert holds_pattern(s, 1) and not holds_pattern(w, 1)
    groups = np.moveaxis(w, 1, -1).reshape(6, 3, 3, 2, 4)
    kept = np.moveaxis(s, 1, -1).reshape(6, 3, 3, 2, 4)
    largest = np.sort(np.abs(groups), axis=-1)[..., 2:]
    np.testing.assert_array_equal(np.sort(np.abs(kept), axis=-1)[..., 2:], largest)
    assert np.count_nonzero(s) == w.size // 2
    m = RNG.standard_normal((16, 5)).astype(np.float32)  # MatMul B [K, N]: along K
    assert holds_pattern(sparsify(m, 0), 0) and np.count_nonzero(sparsify(m, 0)) == m.size // 2


def _graph(channels=8, group=1, shared=False):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 6, 6])
    w = numpy_helper.from_array(RNG.standard_normal((8, channels // group, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(RNG.standard_normal((8 * 36, 16)).astype(np.float32), "b")
    g = numpy_helper.from_array(RNG.standard_normal((10, 16)).astype(np.float32), "g")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("MatMul", ["f", "b"], ["m"], name="matmul"),
             helper.make_node("Gemm", ["m", "g"], ["y"], name="gemm", transB=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["f", "b"], ["m2"], name="again"))
        outputs.append(helper.make_tensor_value_info("m2", TensorProto.FLOAT, [2, 16]))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, [w, b, g]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _sparse(model, **kwargs):
    graph = gs.import_onnx(model)
    result = Sparsify24(**kwargs).run(graph)
    return to_model(graph, model), result


def test_the_sparse_graph_computes_the_layers_with_the_sparsified_weights():
    model = _graph()
    sparse, result = _sparse(model)
    assert result.stats["eligible"] == 3 and result.stats["layers"] == ["conv", "matmul", "gemm"]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    expected_model = onnx.ModelProto()
    expected_model.CopyFrom(model)
    for init, axis in zip(expected_model.graph.initializer, (1, 0, 1)):  # w: I, b: K, g (transB): K
        init.CopyFrom(numpy_helper.from_array(sparsify(weights[init.name], axis), init.name))
    x = RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_graph(sparse, {"x": x})["y"], run_graph(expected_model, {"x": x})["y"])
    assert sparse_layers(sparse) == (["conv", "matmul", "gemm"], ["conv", "matmul", "gemm"])
    assert sparse_layers(model) == (["conv", "matmul", "gemm"], [])
    fp16, _ = PassManager([InferShapes(), ConvertToFp16()]).run(sparse)  # FP16 conversion keeps every zero
    assert sparse_layers(fp16)[1] == ["conv", "matmul", "gemm"]


@pytest.mark.parametrize("case, kwargs, eligible", [
    ("grouped conv", {"channels": 8, "group": 2}, ["matmul", "gemm"]),
    ("6 input channels", {"channels": 6}, ["matmul", "gemm"]),
    ("a weight read twice", {"shared": True}, ["conv", "gemm"]),
])
def test_layers_that_cannot_hold_the_pattern_are_left_dense(case, kwargs, eligible):
    sparse, result = _sparse(_graph(**kwargs))
    assert result.stats["layers"] == eligible
    assert sparse_layers(sparse)[1] == eligible


def test_dense_layers_named_by_the_budget_stay_dense():
    sparse, result = _sparse(_graph(), dense=("matmul",))
    assert result.stats["layers"] == ["conv", "gemm"] and sparse_layers(sparse)[1] == ["conv", "gemm"]


@pytest.fixture(scope="module")
def sparse_bundle(tmp_path_factory):
    from engines.build import BuildRequest, Int8Options, build

    root = tmp_path_factory.mktemp("sparse")
    # the zoo MLP is seeded, not trained: its logits are close, so a loose budget lets some layers go sparse
    return build(BuildRequest("mlp", out=root / "mlp", build_root=root, sparsity="2:4",
                              int8=Int8Options(budget="top1=0.6"))).out


def test_the_build_keeps_the_budget_records_the_layers_and_check_trt_reads_them_back(sparse_bundle, run_cli):
    from engines.bundle import read_manifest

    manifest = read_manifest(sparse_bundle)
    report = manifest.accuracy.sparsity
    assert report.pattern == "2:4" and report.eligible == 3 and len(report.sparse) + len(report.dense) == 3
    assert report.sparse and report.passed and report.budget.met(report.metric)
    trt = onnx.load(str(sparse_bundle / "model.trt.onnx"))
    ort = onnx.load(str(sparse_bundle / "model.ort.onnx"))
    assert sorted(sparse_layers(trt)[1]) == sorted(report.sparse)
    assert sparse_layers(ort)[1] == []  # ONNX Runtime has no sparse kernel: its graph stays dense
    code, out, _ = run_cli("check-trt", sparse_bundle / "model.trt.onnx", "--json")
    assert code == 0
    doc = json.loads(out)
    assert sorted(doc["sparse_24"]) == sorted(report.sparse) and doc["eligible_24"] == 3


def test_a_pattern_other_than_2_4_is_refused_in_one_line(run_cli, in_tmp):
    code, _, err = run_cli("build", "mlp", "--sparsity", "3:7")
    assert code == 2 and "3:7" in err and "Traceback" not in err
