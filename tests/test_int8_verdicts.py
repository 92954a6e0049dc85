"""INT8 verdicts that do not depend on the CPU: the TensorRT form judged by float emulation, the ONNX
Runtime form validated on (and recorded with) this CPU's class, re-validated where it is loaded."""

import json
import logging

import numpy as np
import onnx
import pytest
from helpers import helper

from engines.build import BuildRequest, build
from engines.build.int8.data import load_calibration
from engines.build.int8.forms import candidates
from engines.evaluate.compare import CompareRequest, compare
from engines.runtime import load
from engines.runtime.cpu import detect
from exporter.zoo import BY_NAME
from foundation.numerics import Budget, budget_metric
from foundation.spec import InputSpec
from passes import PassManager, pipeline
from passes.verify import run_graph, session


def emulate_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """An independent float emulation of ``model``'s Q/DQ, from the ONNX spec's formulas: weights are
    dequantized in NumPy, ``(q - zp) * s``; each activation QuantizeLinear -> DequantizeLinear pair
    becomes ``(clip(round(x / s) + zp, qmin, qmax) - zp) * s`` in plain float ops (Div, Round, Add,
    Clip, Sub, Mul). No QuantizeLinear or DequantizeLinear kernel runs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    nodes, extra = [], []
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q, scale, zp = (inits[n] for n in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [-1 if i == axis else 1 for i in range(q.ndim)] if scale.ndim else []
            weight = (q.astype(np.float64) - zp.reshape(shape or ()).astype(np.float64)) * scale.reshape(shape or ())
            extra.append(onnx.numpy_helper.from_array(weight.astype(np.float32), node.output[0]))
        elif node.op_type == "DequantizeLinear":
            quant = producers[node.input[0]]
            assert quant.op_type == "QuantizeLinear", f"{node.name}: expected a Q -> DQ pair"
            x, s_name, z_name = quant.input[:3]
            info = np.iinfo(inits[z_name].dtype)
            p = node.output[0] + "_emu"
            consts = {f"{p}_zp": np.float32(inits[z_name]), f"{p}_lo": np.float32(info.min),
                      f"{p}_hi": np.float32(info.max)}
            extra += [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
            nodes += [
                helper.make_node("Div", [x, s_name], [f"{p}_d"]),
                helper.make_node("Round", [f"{p}_d"], [f"{p}_r"]),
                helper.make_node("Add", [f"{p}_r", f"{p}_zp"], [f"{p}_a"]),
                helper.make_node("Clip", [f"{p}_a", f"{p}_lo", f"{p}_hi"], [f"{p}_c"]),
                helper.make_node("Sub", [f"{p}_c", f"{p}_zp"], [f"{p}_s"]),
                helper.make_node("Mul", [f"{p}_s", s_name], [node.output[0]]),
            ]
        elif node.op_type != "QuantizeLinear":
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    return out


@pytest.fixture(scope="module")
def digits_int8(build_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits_cnn-int8"
    return build(BuildRequest("digits_cnn", out=out, precision="int8", build_root=build_root)).out


def test_trt_verdict_equals_an_independent_float_emulation_of_its_qdq(digits_int8, build_root):
    manifest = json.loads((digits_int8 / "manifest.json").read_text())
    recorded = manifest["accuracy"]["int8"]["trt"]
    spec = InputSpec.from_json(manifest["inputs"])
    module = BY_NAME["digits_cnn"].build(build_root / ".cache")
    data = load_calibration(None, spec, BY_NAME["digits_cnn"], module)
    from passes.calibration import data_sha256

    assert data_sha256(data.calibration) == manifest["calibration"]["data_sha256"]  # the build's own batches
    graph = onnx.load(str(digits_int8 / "model.trt.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) >= 3  # really INT8
    emulated = emulate_qdq(graph)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in emulated.graph.node}
    fp32 = PassManager(pipeline("trt", "fp32"), quiet=True).run(onnx.load(str(digits_int8 / "model.onnx")))[0]
    reference = [[run_graph(fp32, b)["logits"]] for b in data.evaluation]
    actual = [[run_graph(emulated, b)["logits"]] for b in data.evaluation]
    budget = Budget.from_json(recorded["budget"])
    assert budget_metric(budget, reference, actual) == pytest.approx(recorded["final"], abs=1e-6)
    assert recorded["met"] == budget.met(recorded["final"]) and recorded["judged_by"].startswith("float emulation")
    # the same function, output for output: ONNX Runtime's Q/DQ as written vs the emulation
    for batch, expected in zip(data.evaluation, actual):
        got = run_graph(graph, batch)["logits"]
        np.testing.assert_allclose(got, expected[0], atol=1e-4 * np.abs(expected[0]).max(), rtol=0)


def test_ort_form_and_cpu_class_are_recorded_and_the_verdict_holds_here(digits_int8, build_root):
    manifest = json.loads((digits_int8 / "manifest.json").read_text())
    isa = detect().isa
    assert manifest["environment"]["cpu_isa"] == isa and manifest["environment"]["cpu_model"]
    assert manifest["calibration"]["cpu_isa"] == isa
    ort = manifest["accuracy"]["int8"]["ort"]
    assert ort["cpu_isa"] == isa and ort["form"]["form"] in candidates(isa)
    assert set(ort["form"]["measured"]) == set(candidates(isa)) and ort["form"]["reason"].startswith(
        ort["form"]["form"]
    )
    # the recorded final metric is what this CPU's kernels give on the held-out batches, recomputed here
    spec = InputSpec.from_json(manifest["inputs"])
    data = load_calibration(None, spec, BY_NAME["digits_cnn"], BY_NAME["digits_cnn"].build(build_root / ".cache"))
    fp32 = session(digits_int8 / "model.onnx", optimize=True)
    graph = session(digits_int8 / "model.ort.onnx", optimize=True)
    budget = Budget.from_json(ort["budget"])
    value = budget_metric(
        budget, [fp32.run(None, b) for b in data.evaluation], [graph.run(None, b) for b in data.evaluation]
    )
    assert value == pytest.approx(ort["final"], abs=1e-6) and ort["met"] == budget.met(value)


def test_loading_on_another_cpu_class_warns_once_naming_both(digits_int8, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="engines.runtime"):
        load(digits_int8, backend="ort-cpu").close()
    assert not [r for r in caplog.records if "validated on" in r.getMessage()]
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in digits_int8.iterdir():  # the same bundle as if built on an AVX2-only machine
        (moved / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((moved / "manifest.json").read_text())
    other = "avx2" if detect().isa != "avx2" else "avx512-vnni"
    manifest["accuracy"]["int8"]["ort"]["cpu_isa"] = other
    (moved / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engines.runtime"):
        load(moved, backend="ort-cpu").close()
    warned = [r.getMessage() for r in caplog.records if "validated on" in r.getMessage()]
    assert (
        len(warned) == 1 and f"validated on a {other} CPU" in warned[0] and f"this CPU is {detect().isa}" in warned[0]
    )

    result = compare(CompareRequest(moved, report=tmp_path / "r.json", cache_dir=tmp_path / ".cache"))
    assert result.cpu["cpu_isa"] == detect().isa and result.cpu["int8_ort_validated_on"] == other
    ort_pair = next(p for p in result.pairs if p.runner == "onnxruntime model.ort.onnx")
    assert ort_pair.budget["passed"]  # re-validated on this machine's kernels


def test_trt_budget_value_is_the_float_emulation_of_the_graph_it_returns():
    """A continuous metric (relerr) on a small MLP: the trt verdict equals the emulated graph's, to 1e-6."""
    from helpers import make_model, run_pass, seeded

    from engines.build.int8 import quantize_target
    from passes.calibration import calibrate
    from passes.infer_shapes import InferShapes

    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="second")]
    model = run_pass(InferShapes(), make_model(nodes, [("x", np.float32, ["n", 32])], [("y", np.float32, ["n", 8])],
                                               {"W1": seeded((32, 64), 1), "W2": seeded((64, 8), 2)}))[1]
    batches = [{"x": seeded((16, 32), i)} for i in range(4)]
    evaluation = [{"x": seeded((64, 32), 9)}]
    result = quantize_target(
        model, "trt", calibrate(model, batches, "max"), evaluation, Budget.parse("relerr=0.5", None)
    )
    assert not result.kept_float and result.final > 0  # all INT8, a real error
    expected = budget_metric(result.budget, [[run_graph(model, evaluation[0])["y"]]],
                      [[run_graph(emulate_qdq(result.model), evaluation[0])["y"]]])
    # tight: ONNX Runtime's optimized integer kernels miss this by 4e-8 even with VNNI (requantization rounding)
    assert result.final == pytest.approx(expected, abs=1e-9)


def test_the_ort_graph_is_timed_against_fp32_and_the_summary_says_when_int8_is_not_faster(digits_int8):
    import dataclasses

    from rich.console import Console

    from engines.bundle import Int8Report, read_manifest
    from engines.bundle.manifest import INT8_MIN_SPEEDUP
    from engines.cli.present import build_summary

    def summary(manifest) -> str:
        console = Console(record=True, width=400)
        build_summary(console, digits_int8, manifest, reused=False, seconds=1.0)
        return console.export_text()

    manifest = read_manifest(digits_int8)
    ort = manifest.int8_report("ort")
    assert ort.quantized and ort.latency_ms > 0 and ort.fp32_latency_ms > 0
    assert ort.speedup == pytest.approx(ort.fp32_latency_ms / ort.latency_ms, abs=1e-3)
    assert ort.form["fp32_latency_ms"] > 0  # the FP32 graph timed beside the candidate forms too
    assert manifest.int8_report("trt").speedup is None  # the trt graph runs on TensorRT: its CPU time says nothing
    text = summary(manifest)  # what this machine measured, either way
    assert f"{ort.speedup:.2f}x FP32 speed" in text
    assert ("INT8 ort: NOT FASTER than FP32" in text) == (ort.speedup < INT8_MIN_SPEEDUP) == ort.not_faster

    slower = dataclasses.replace(ort, latency_ms=0.0931, fp32_latency_ms=0.0903, speedup=0.97)
    assert Int8Report.from_json(slower.to_json()) == slower and slower.not_faster
    int8 = dict(manifest.accuracy.int8, ort=slower)
    text = summary(dataclasses.replace(manifest, accuracy=dataclasses.replace(manifest.accuracy, int8=int8)))
    assert (f"INT8 ort: NOT FASTER than FP32 on the build's {ort.cpu_isa} CPU: 0.97x (FP32 0.0903 ms, INT8 0.0931 ms "
            "per held-out batch)") in text
    older = {k: v for k, v in ort.to_json().items() if k not in ("latency_ms", "fp32_latency_ms", "speedup")}
    assert Int8Report.from_json(older).speedup is None and not Int8Report.from_json(older).not_faster  # before timing
