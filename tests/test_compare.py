"""``planforge compare``: Polygraphy comparisons of every bundle artifact against its reference."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from polygraphy.exception import PolygraphyException

from engines.build import BuildRequest, Int8Options, build
from engines.bundle import add_artifacts, read_manifest, verified_path
from engines.evaluate.compare import CompareRequest, compare, cosine, top1
from engines.evaluate.compare.data import load_data
from engines.evaluate.compare.runners import TorchRunner
from engines.evaluate.compare.tolerances import per_output, tolerances
from engines.runtime.cpu import detect
from exporter.zoo import BY_NAME
from foundation.errors import UsageError
from foundation.numerics import Budget
from foundation.spec import InputSpec

ORT_SIDES = {"onnxruntime model.onnx", "onnxruntime model.ort.onnx", "onnxruntime model.trt.onnx", "planforge ort-cpu"}


def ort_sides(bundle) -> set[str]:
    """The ONNX Runtime sides of a bundle: when both targets share one graph file, the trt side runs it as written."""
    backends = read_manifest(bundle).backends
    trt = f"onnxruntime {backends.trt.graph}" + (" as written" if backends.ort.graph == backends.trt.graph else "")
    return {"onnxruntime model.onnx", f"onnxruntime {backends.ort.graph}", trt, "planforge ort-cpu"}


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    return build(BuildRequest("mlp", out=root / "mlp", build_root=root)).out


@pytest.fixture()
def bundle_copy(mlp_bundle, tmp_path):
    return shutil.copytree(mlp_bundle, tmp_path / "mlp")


def _golden(bundle):
    with np.load(bundle / "golden.npz") as data:
        return {k: data[k] for k in data.files}


def test_an_untouched_bundle_passes_with_the_errors_onnx_runtime_shows(bundle_copy):
    result = compare(CompareRequest(bundle_copy))

    assert result.ok and result.reference == "pytorch" and result.data.source == "golden"
    assert {p.runner for p in result.pairs} == ORT_SIDES
    golden = _golden(bundle_copy)
    sess = ort.InferenceSession(str(bundle_copy / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    expected = max(float(np.abs(sess.run(None, {"x": golden[f"{p}/in/x"]})[0] - golden[f"{p}/out/logits"]).max())
                   for p in ("min", "max"))
    ort_pair = next(p for p in result.pairs if p.runner == "onnxruntime model.ort.onnx")
    assert ort_pair.outputs["logits"]["max_abs"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert 0 < expected <= 1e-4 and ort_pair.outputs["logits"]["cosine"] > 0.999999
    assert ort_pair.outputs["logits"]["top1"] == 1.0  # mlp is a classifier
    report = json.loads((bundle_copy / "report.json").read_text())
    assert report["compare"]["ok"] and "parity" in report  # the build's section is kept
    manifest = read_manifest(bundle_copy)
    for name in manifest.artifacts:  # the manifest lists report.json's new hash
        verified_path(bundle_copy, manifest, name)


def test_a_flipped_weight_fails_exactly_the_runners_that_load_it(bundle_copy, run_cli):
    graph = onnx.load(str(bundle_copy / "model.ort.onnx"))
    weight = max((i for i in graph.graph.initializer if len(i.dims) == 2), key=lambda i: np.prod(i.dims))
    values = onnx.numpy_helper.to_array(weight).copy()
    index = np.unravel_index(np.abs(values).argmax(), values.shape)
    values[index] = -values[index]
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    add_artifacts(bundle_copy, {"model.ort.onnx": (graph.SerializeToString(), "ort-graph")})  # re-hashed on purpose

    result = compare(CompareRequest(bundle_copy))

    failed = {p.runner for p in result.pairs if not p.passed}
    assert not result.ok and failed == {"onnxruntime model.ort.onnx", "planforge ort-cpu"}
    worst = next(p for p in result.pairs if p.runner == "planforge ort-cpu").outputs["logits"]["max_abs"]
    assert worst > 1e-3
    code, out, err = run_cli("compare", bundle_copy)
    assert code == 4 and "FAIL" in out
    assert err.count("error:") == 1 and "onnxruntime model.ort.onnx logits" in err and "Traceback" not in err


def test_a_per_output_override_replaces_the_precision_default(bundle_copy):
    result = compare(CompareRequest(bundle_copy, atol=("logits:0",), rtol=("0",), data="random", iterations=2))

    assert not result.ok  # PyTorch and ONNX Runtime are close, not bitwise equal
    tol = result.pairs[0].outputs["logits"]["tolerance"]
    assert (tol["atol"], tol["rtol"], tol["source"]) == (0.0, 0.0, "override")
    loose = compare(CompareRequest(bundle_copy, atol=("1e-2",), error_stat=("logits:median",)))
    assert loose.ok and loose.pairs[0].outputs["logits"]["tolerance"]["stat"] == "median"


@pytest.mark.parametrize("values, expected", [
    (("1e-3",), {"": 1e-3}),
    (("logits:1e-2", "2e-4"), {"logits": 1e-2, "": 2e-4}),
    (("past:key:0.5",), {"past:key": 0.5}),  # output names may hold colons: the value is after the last
])
def test_tolerance_parsing(values, expected):
    assert per_output(values, "--atol") == expected


@pytest.mark.parametrize("values, message", [
    (("logits:abc",), "is not a float"),
    ((":1e-3",), "expected VALUE or OUTPUT:VALUE"),
    (("-1",), "expected a number >= 0"),
])
def test_bad_tolerances_say_what_is_expected(values, message):
    with pytest.raises(UsageError, match=message):
        per_output(values, "--atol")


def test_precision_defaults_fp16_scale_with_the_output_and_int8_relerr_is_a_bound():
    ref = {"y": [np.array([[-4.0, 2.0]], np.float32)]}
    assert tolerances("fp32", ref, None, {})["y"].atol == 1e-4
    fp16 = tolerances("fp16", ref, None, {})["y"]
    assert (fp16.atol, fp16.stat) == (pytest.approx(2e-2 * 4 + 1e-3), "max")
    assert tolerances("int8", ref, Budget("top1", 0.99), {})["y"].atol is None
    assert tolerances("int8", ref, Budget("relerr", 0.05), {})["y"].atol == pytest.approx(0.2)
    with pytest.raises(UsageError, match="--error-stat 'logits:mode': 'mode' is not one of"):
        CompareRequest("b", error_stat=("logits:mode",)).overrides()


def test_pytorch_runner_returns_the_module_outputs_and_checks_inputs(tmp_path):
    module = BY_NAME["mlp"].build(tmp_path)
    spec = BY_NAME["mlp"].input_spec
    x = spec.random_feeds("max", seed=3)["x"]
    with TorchRunner(module, spec, ["logits"]) as runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        out = runner.infer({"x": x})
        assert runner.last_inference_time() > 0
        with pytest.raises(PolygraphyException):
            runner.infer({"x": x.astype(np.float64)})
    assert list(meta["x"].shape) == [None, 64]
    with torch.no_grad():
        np.testing.assert_array_equal(out["logits"], module(torch.from_numpy(x)).numpy())


def test_random_data_keeps_integer_inputs_in_their_value_range(tmp_path):
    spec = InputSpec.parse(["ids:int64:[batch=1..4@2,seq=1..16@8]:5..9", "mask:int64:[batch,seq]:0..2",
                            "x:float32:[batch,3]"])
    data = load_data("random", tmp_path, {}, spec, iterations=3, point="max", seed=7)
    again = load_data("random", tmp_path, {}, spec, iterations=3, point="max", seed=7)

    assert len(data.feeds) == 3
    for feeds, same in zip(data.feeds, again.feeds):
        assert feeds["ids"].shape == (4, 16) and feeds["ids"].dtype == np.int64
        assert feeds["ids"].min() >= 5 and feeds["ids"].max() <= 8
        assert set(np.unique(feeds["mask"])) <= {0, 1}
        assert np.abs(feeds["x"]).max() <= 1.0
        np.testing.assert_array_equal(feeds["ids"], same["ids"])


def test_user_npz_data_is_checked_against_the_input_spec(bundle_copy, tmp_path, run_cli):
    good = tmp_path / "data"
    good.mkdir()
    np.savez(good / "a.npz", x=np.ones((3, 64), np.float32))
    np.savez(good / "b.npz", x=np.zeros((5, 64), np.float32))
    result = compare(CompareRequest(bundle_copy, data=str(good)))
    assert result.ok and [list(f["x"].shape) for f in result.data.feeds] == [[3, 64], [5, 64]]

    np.savez(tmp_path / "bad.npz", image=np.ones((3, 64), np.float32))
    code, _, err = run_cli("compare", bundle_copy, "--data", tmp_path / "bad.npz")
    assert code == 10 and "missing x" in err and "unexpected image" in err
    code, _, err = run_cli("compare", bundle_copy, "--data", tmp_path / "nothing.npz")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli("compare", tmp_path)
    assert code == 9 and "manifest.json" in err


def test_similarity_metrics():
    ref = [np.array([[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]], np.float32)]
    assert cosine(ref, ref) == pytest.approx(1.0)
    assert cosine(ref, [-ref[0]]) == pytest.approx(-1.0)
    assert top1(ref, [np.array([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]], np.float32)]) == 0.5
    assert top1([np.zeros((4,), np.float32)], [np.zeros((4,), np.float32)]) is None  # not class scores


@pytest.fixture(scope="module")
def mlp_int8(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    return build(BuildRequest("mlp", out=root / "mlp-int8", precision="int8", build_root=root)).out, root


def test_int8_sides_are_decided_by_the_manifest_budget_on_the_evaluation_batches(mlp_int8, tmp_path):
    bundle, root = mlp_int8
    result = compare(CompareRequest(bundle, cache_dir=root / ".cache", save_inputs=tmp_path / "inputs.json"))

    assert result.data.source == "eval"  # auto: the data the budget was measured on at build time
    module = BY_NAME["mlp"].build(root)
    _, evaluation = BY_NAME["mlp"].calibration_data(module)
    sess = ort.InferenceSession(str(bundle / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        agree = np.concatenate([module(torch.from_numpy(b["x"])).numpy().argmax(-1) == sess.run(None, b)[0].argmax(-1)
                                for b in evaluation])
    pair = next(p for p in result.pairs if p.runner == "onnxruntime model.ort.onnx")
    assert pair.precision == "int8" and pair.budget["metric"] == "top1"
    assert pair.budget["value"] == pytest.approx(agree.mean()) and pair.budget["passed"] == (agree.mean() >= 0.99)
    assert pair.outputs["logits"]["tolerance"]["atol"] is None  # elementwise errors recorded, not bounded
    assert pair.outputs["logits"]["max_abs"] > 1e-4  # INT8 really differs elementwise
    exported = next(p for p in result.pairs if p.runner == "onnxruntime model.onnx")
    assert exported.budget is None and exported.outputs["logits"]["tolerance"]["atol"] == 1e-4
    # the TensorRT-form graph is judged by float emulation: ONNX Runtime with its graph optimizations off
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    emulated = ort.InferenceSession(str(bundle / "model.trt.onnx"), options, providers=["CPUExecutionProvider"])
    trt = next(p for p in result.pairs if p.runner == "onnxruntime model.trt.onnx")
    with torch.no_grad():
        expected = [module(torch.from_numpy(b["x"])).numpy() for b in evaluation]
    got = [emulated.run(None, b)[0] for b in evaluation]
    # mlp's TensorRT form meets top-1 >= 0.99 only with every layer in float: that graph is FP32, not INT8
    manifest = read_manifest(bundle)
    assert manifest.backends.trt.precision == trt.precision == "fp32" and not manifest.int8_report("trt").quantized
    assert trt.budget is None and trt.passed and not any(n.op_type == "QuantizeLinear"
                                                         for n in onnx.load(str(bundle / "model.trt.onnx")).graph.node)
    assert trt.outputs["logits"]["max_abs"] == pytest.approx(
        max(float(np.abs(e - g).max()) for e, g in zip(expected, got)), rel=1e-6
    )
    assert any("--graph-optimization-level ORT_DISABLE_ALL" in line and "model.trt.onnx" in line
               for line in result.polygraphy)
    assert result.cpu["cpu_isa"] == detect().isa == result.cpu["int8_ort_validated_on"]


def test_polygraphy_lines_work_as_printed_and_fail_when_the_graph_is_worse(mlp_int8, tmp_path):
    """The printed ``polygraphy run`` lines run from any directory, write nothing there, pass on the bundle
    (the INT8 line judging the budget as compare did), and fail on a graph with a damaged weight."""
    bundle, root = mlp_int8
    assert compare(CompareRequest(bundle, cache_dir=root / ".cache")).polygraphy == []  # no inputs saved: no lines
    inputs = tmp_path / "saved" / "inputs.json"
    inputs.parent.mkdir()
    result = compare(CompareRequest(bundle, cache_dir=root / ".cache", save_inputs=inputs))
    assert result.ok and len(result.polygraphy) == 3  # reference, ort (INT8: the budget script), trt
    int8_line = next(line for line in result.polygraphy if "model.ort.onnx" in line)
    assert "--compare-func-script" in int8_line and "inf" not in int8_line.split()
    work = tmp_path / "elsewhere"
    work.mkdir()
    polygraphy = str(Path(sys.executable).with_name("polygraphy"))
    printed = {}
    for line in result.polygraphy:
        run = subprocess.run([polygraphy, *shlex.split(line)[1:]], cwd=work, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        printed[line] = run.stdout + run.stderr
    assert list(work.iterdir()) == [] and (inputs.parent / "inputs.ref_outputs.json").is_file()
    pair = next(p for p in result.pairs if p.runner == "onnxruntime model.ort.onnx")
    assert f"planforge budget top1 >= 0.99: {pair.budget['value']:.6g} over {len(result.data.feeds)} batches: PASSED" \
        in printed[int8_line]

    # the INT8 line on a graph whose first MatMul weight is scrambled: the budget fails, so does the line
    model = onnx.load(str(bundle / "model.ort.onnx"))
    # int8, or uint8 where this CPU's build measured the u8u8 form the faster (AVX2: engines/build/int8/forms.py)
    weight = next(t for t in model.graph.initializer
                  if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) == 2)
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.random.default_rng(0).permutation(values.ravel())
                                                 .reshape(values.shape), weight.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    run = subprocess.run(
        [polygraphy, *shlex.split(int8_line.replace(str(bundle / "model.ort.onnx"), str(damaged)))[1:]],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr


def test_digits_gets_its_test_accuracy_per_side(build_root, tmp_path):
    from exporter.zoo.digits import accuracy

    bundle = build(BuildRequest("digits_cnn", out=tmp_path / "digits", build_root=build_root)).out
    result = compare(CompareRequest(bundle, cache_dir=build_root / ".cache"))

    values = result.task_metric["values"]
    assert set(values) == {"pytorch"} | ort_sides(bundle)
    module = BY_NAME["digits_cnn"].build(build_root / ".cache")
    assert values["pytorch"] == pytest.approx(accuracy(module, "test"))
    assert all(abs(v - values["pytorch"]) <= 1 / result.task_metric["samples"] for v in values.values())


def test_a_changed_model_source_is_refused_as_reference_and_the_exported_graph_can_stand_in(tmp_path, run_cli):
    source = tmp_path / "tiny.py"
    source.write_text(
        "import torch\n\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), ['x:float32:[batch=1..4@2,8]']\n"
    )
    bundle = build(BuildRequest(f"{source}:make", out=tmp_path / "tiny", build_root=tmp_path)).out
    assert compare(CompareRequest(bundle, report=tmp_path / "r.json")).reference == "pytorch"

    source.write_text(source.read_text().replace("Linear(8, 4)", "Linear(8, 4, bias=False)"))
    code, _, err = run_cli("compare", bundle)
    assert code == 2 and "not the one the bundle was built from" in err and "--reference onnx" in err
    result = compare(CompareRequest(bundle, reference="onnx", report=tmp_path / "r.json"))
    assert result.ok and result.reference == "onnxruntime model.onnx"
    assert {p.runner for p in result.pairs} == ort_sides(bundle) - {"onnxruntime model.onnx"}
    assert json.loads((tmp_path / "r.json").read_text())["compare"]["reference"] == "onnxruntime model.onnx"


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_a_factory_whose_weights_differ_per_call_is_refused_as_reference_and_a_seeded_one_compares(tmp_path, run_cli,
                                                                                                 seeded):
    """Build and compare run with different global RNG states, as two processes would."""
    from exporter.resolve import resolve, weights_sha256

    source = tmp_path / "net.py"
    source.write_text(
        "import torch\n\n\ndef make():\n"
        + ("    torch.manual_seed(0)\n" if seeded else "")
        + "    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), ['x:float32:[batch=1..4@2,8]']\n"
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        bundle = build(BuildRequest(f"{source}:make", out=tmp_path / "net", build_root=tmp_path)).out
        recorded = read_manifest(bundle).model.weights_sha256
        torch.manual_seed(1)
        assert recorded == weights_sha256(resolve(f"{source}:make", tmp_path).module)  # the factory's weights, as built
        torch.manual_seed(2)
        code, out, err = run_cli("compare", bundle)
    if seeded:
        assert code == 0, out + err
        return
    assert (
        code == 2 and "the factory returned different weights than at build time (seed it or load a checkpoint)" in err
    )
    assert "--reference onnx" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["model"]["weights_sha256"]  # a bundle from before the weights were recorded: compared as it was
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with torch.random.fork_rng():
        torch.manual_seed(2)
        code, out, err = run_cli("compare", bundle)
    assert code == 4 and "check(s) failed" in err  # the other weights, found only by every check failing


def test_compare_repeats_the_build_verdict_on_the_stored_evaluation_batches(tmp_path, caplog):
    """Any model, not only the zoo: the held-out batches travel in the bundle and are compare's default."""
    import logging

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(10):  # every fifth batch is held out: 2 batches of 16 samples
        np.savez(calib / f"b{i}.npz", x=np.random.default_rng(i).standard_normal((16, 64)).astype(np.float32))
    with caplog.at_level(logging.WARNING):
        bundle = build(
            BuildRequest(
                "mlp",
                out=tmp_path / "b",
                precision="int8",
                build_root=tmp_path,
                int8=Int8Options(calib=str(calib), budget="cosine=0.99"),
            )
        ).out
    manifest = read_manifest(bundle)
    assert manifest.calibration.evaluation_file == "evaluation.npz" and manifest.calibration.evaluation_samples == 32
    assert manifest.artifacts["evaluation.npz"].role == "evaluation"
    assert "only 32 held-out samples" not in caplog.text  # 32 is the documented minimum
    result = compare(CompareRequest(bundle, report=tmp_path / "r.json", cache_dir=tmp_path / ".cache"))
    assert result.data.source == "eval" and "evaluation.npz" in result.data.description
    assert len(result.data.feeds) == 2
    assert any(manifest.int8_report(t).quantized for t in ("ort", "trt"))
    for target, runner in (("ort", "onnxruntime model.ort.onnx"), ("trt", "onnxruntime model.trt.onnx")):
        report, pair = manifest.int8_report(target), next(p for p in result.pairs if p.runner == runner)
        if report.quantized:  # the build's final metric, recomputed by compare against PyTorch
            assert pair.budget["value"] == pytest.approx(report.final, abs=1e-4) and pair.budget["passed"]


def test_a_small_held_out_set_is_warned_about(tmp_path, caplog):
    import logging

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(5):
        np.savez(calib / f"b{i}.npz", x=np.random.default_rng(i).standard_normal((4, 64)).astype(np.float32))
    with caplog.at_level(logging.WARNING):
        build(
            BuildRequest(
                "mlp", out=tmp_path / "b", precision="int8", build_root=tmp_path, int8=Int8Options(calib=str(calib))
            )
        )
    assert "the budget is measured on only 4 held-out samples (fewer than 32)" in caplog.text


def test_compare_data_takes_the_calibration_layouts_npy_npz_and_directories(run_cli, in_tmp):
    code, _, err = run_cli("build", "mlp", "-o", "b")
    assert code == 0, err
    rng = np.random.default_rng(0)
    (in_tmp / "batches").mkdir()
    for i in range(3):
        np.save(in_tmp / "batches" / f"{i}.npy", rng.standard_normal((2, 64)).astype(np.float32))
    np.savez(in_tmp / "one.npz", x=rng.standard_normal((4, 64)).astype(np.float32))
    for data, count in (("batches", 3), ("one.npz", 1), ("batches/1.npy", 1)):
        code, out, err = run_cli("compare", "b", "--data", data, "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["ok"] and doc["data"]["iterations"] == count
    code, _, err = run_cli("compare", "b", "--data", "nothing_here")
    assert code == 2 and "no such file" in err
