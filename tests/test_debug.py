"""``planforge debug``: the first layer where a bundle's graph diverges from the FP32 export, with its
PyTorch module; and ``inspect --layers``: each node's precision and module."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.build import BuildRequest, Int8Options, build
from engines.bundle import add_artifacts, read_manifest
from engines.evaluate.debug import DebugRequest, debug
from engines.evaluate.layers import bundle_layers, trt_layers
from engines.evaluate.provenance import provenance
from passes.verify import expose_outputs, run_graph

RESNET = ("x:float32:[batch=1..2@1,3,32,32]",)
BERT = ("input_ids:int64:[batch=1..2@1,seq=4..16@8]:0..30522", "attention_mask:int64:[batch,seq]:1..2")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbg")
    return build(BuildRequest("resnet18", out=root / "resnet18", inputs=RESNET, build_root=root)).out


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbg-bert")
    return build(BuildRequest("bert_tiny", out=root / "bert", inputs=BERT, build_root=root)).out


def _plant(bundle, tmp_path, pick):
    """A copy of ``bundle`` whose trt graph has one weight perturbed (the node ``pick`` chooses), re-hashed
    into the manifest as a tampered build would be; returns (copy, node, its module)."""
    copy = shutil.copytree(bundle, tmp_path / "planted")
    manifest = read_manifest(copy)
    graph_name = manifest.backends.trt.graph
    model = onnx.load(str(copy / graph_name))
    where = provenance(onnx.load(str(copy / "model.onnx")))
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if pick(n, where.module(n, producer)))
    inits = {t.name: t for t in model.graph.initializer}
    weight = inits[node.input[1]]
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype)
    weight.CopyFrom(numpy_helper.from_array(values + 0.5 * np.abs(values).max() * noise, weight.name))
    role = manifest.artifacts[graph_name].role
    add_artifacts(copy, {graph_name: (model.SerializeToString(), role)})
    return copy, node, where.module(node, producer)


def test_an_untouched_bundle_reports_nothing_and_exposing_tensors_changes_no_output(resnet):
    result = debug(DebugRequest(resnet))
    assert result.ok and result.first == [] and result.compared > 40
    assert result.outputs and all(t.ratio < 0.1 for t in result.outputs)
    graph = onnx.load(str(resnet / read_manifest(resnet).backends.trt.graph))
    with np.load(resnet / "golden.npz") as golden:
        feed = {"x": golden["min/in/x"]}
    plain, exposed = run_graph(graph, feed), run_graph(expose_outputs(graph), feed)
    assert all(np.array_equal(plain[k], exposed[k]) for k in plain)


def test_a_perturbed_conv_is_found_as_the_first_diverging_layer_with_its_module(resnet, tmp_path, run_cli):
    planted, node, module = _plant(resnet, tmp_path, lambda n, m: n.op_type == "Conv" and m.startswith("layers.1.0"))
    result = debug(DebugRequest(planted, side="trt"))
    assert not result.ok and result.first[0].node == node.name and result.first[0].op == "Conv"
    assert result.first[0].module == module and module.startswith("layers.1.0")
    assert result.first[0].inputs_ratio <= 1.0 < result.first[0].ratio
    code, out, err = run_cli("debug", planted, "--json")
    assert code == 4 and node.name in err
    assert json.loads(out)["first"][0]["module"] == module


def test_a_perturbed_transformer_projection_is_found_with_its_module(bert, tmp_path):
    assert debug(DebugRequest(bert)).ok
    planted, node, module = _plant(bert, tmp_path, lambda n, m: n.op_type in ("MatMul", "Gemm")
                                   and m.startswith("layers.1.mlp.0"))
    result = debug(DebugRequest(planted, side="trt"))
    assert not result.ok and result.first[0].node == node.name and result.first[0].module == module
    assert module == "layers.1.mlp.0 (Linear)"


def test_untouched_fp16_and_int8_bundles_stay_within_their_bounds(tmp_path):
    fp16 = build(BuildRequest("resnet18", out=tmp_path / "fp16", inputs=RESNET, precision="fp16",
                              build_root=tmp_path)).out
    result = debug(DebugRequest(fp16, side="trt"))
    assert result.precision == "fp16" and result.ok, [(t.tensor, t.ratio) for t in result.diverging]
    int8 = build(BuildRequest("mlp", out=tmp_path / "int8", precision="int8", build_root=tmp_path)).out
    for side in ("trt", "ort"):
        assert debug(DebugRequest(int8, side=side)).ok


def test_inspect_layers_names_each_nodes_precision_and_module(tmp_path, run_cli):
    int8 = build(BuildRequest("mlp", out=tmp_path / "int8", precision="int8", build_root=tmp_path)).out
    manifest = read_manifest(int8)
    doc = bundle_layers(int8, manifest)
    ort = doc["graphs"][manifest.backends.ort.graph]
    assert ort["counts"].get("int8", 0) >= 1 and ort["counts"].get("qdq", 0) >= 2 and doc["modules_recorded"]
    model = onnx.load(str(int8 / manifest.backends.ort.graph))
    dq_fed = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(
        p.op_type == "DequantizeLinear" for p in model.graph.node if set(p.output) & set(n.input))}
    rows = {r["node"]: r for r in ort["nodes"]}
    assert dq_fed and all(rows[n]["precision"] == "int8" for n in dq_fed)
    assert any(r["module"].startswith("net.") or "Linear" in r["module"] for r in ort["nodes"])
    code, out, _ = run_cli("inspect", int8, "--layers", "--json")
    assert code == 0 and json.loads(out)["graphs"].keys() == doc["graphs"].keys()


def test_tensorrt_layer_json_maps_fused_layers_back_to_onnx_nodes_and_modules(resnet):
    """The engine inspector's JSON format (ProfilingVerbosity.DETAILED): a fused layer is named "a + b"."""
    manifest = read_manifest(resnet)
    graph = onnx.load(str(resnet / manifest.backends.trt.graph))
    where = provenance(onnx.load(str(resnet / "model.onnx")))
    conv, relu = next((a, b) for a in graph.graph.node for b in graph.graph.node
                      if a.op_type == "Conv" and b.op_type == "Relu" and b.input[0] == a.output[0])
    doc = json.dumps({"Layers": [{"Name": f"{conv.name} + {relu.name}", "LayerType": "CaskConvolution",
                                  "Outputs": [{"Name": relu.output[0], "Format/Datatype": "Half format NC/8HW8"}]},
                                 "some_reformat_layer"]})
    rows = trt_layers(doc, where, graph)
    assert rows[0]["onnx_nodes"] == [conv.name, relu.name] and rows[0]["precision"] == "fp16"
    assert (
        rows[0]["modules"] == sorted({where.module(conv), where.module(relu)})
        and "bn1 (BatchNorm2d)" in rows[0]["modules"]
    )
    assert rows[1] == {"layer": "some_reformat_layer", "type": "", "precision": "?", "onnx_nodes": [], "modules": []}


OUTLIER = '''import torch


class Outlier(torch.nn.Module):
    """b's input has one channel 300x the others that b ignores: per-tensor INT8 of that input zeroes the rest."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.a.weight[0] *= 100.0
            self.a.bias[0] = 300.0
            self.b.weight[:, 0] = 0.0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def make():
    return Outlier().eval(), ["x:float32:[batch=1..8@4,16]"]
'''


def test_bisect_names_the_layer_whose_float_precision_brings_the_outputs_within_budget(tmp_path, run_cli):
    (tmp_path / "outlier.py").write_text(OUTLIER)
    bundle = build(
        BuildRequest(
            f"{tmp_path / 'outlier.py'}:make",
            out=tmp_path / "b",
            precision="int8",
            build_root=tmp_path,
            int8=Int8Options(budget="relerr=0.9", allow_random_calibration=True),
        )
    ).out
    assert read_manifest(bundle).int8_report("trt").kept_float == ()  # the loose budget kept every layer INT8
    result = debug(DebugRequest(bundle, side="trt", bisect=True, budget="relerr=0.05"))
    assert not result.ok and result.first[0].module == "b (Linear)"
    assert result.bisect["passed"] and result.bisect["kept"] == [result.first[0].node]
    assert float(result.bisect["metric"].split()[1]) <= 0.05
    code, out, err = run_cli("debug", bundle, "--bisect", "--budget", "relerr=0.05")
    assert code == 4 and f"keeping {result.first[0].node} in float brings the outputs within budget" in \
        out.replace("\n", " ")


def test_bisect_on_an_fp32_graph_says_there_is_nothing_to_keep(resnet, tmp_path):
    planted, _, _ = _plant(resnet, tmp_path, lambda n, m: n.op_type == "Conv" and m.startswith("layers.1.0"))
    result = debug(DebugRequest(planted, side="trt", bisect=True))
    assert not result.bisect["passed"] and "FP32" in result.bisect["reason"]
