"""ONNX files nobody here wrote, as users bring them: PaddleOCR's direction classifier (rapidocr's
wheel: dims written -1 and '?'), Silero's VAD (dims written 0, an ``sr`` input that must be 16000),
and planted graphs for what those files do not show (a name with ':', a float value range)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import helper, make_model, seeded

from engines import runtime
from engines.bundle import read_manifest
from exporter.resolve import check_assumed, spec_from_onnx
from foundation.errors import UsageError
from foundation.spec import InputSpec, TensorSpec, assumed_dims


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    return path if path.is_file() else None


PADDLE_CLS = _package_file("rapidocr_onnxruntime", "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
SILERO = _package_file("silero_vad", "data", "silero_vad.onnx")
needs_paddle = pytest.mark.skipif(PADDLE_CLS is None, reason="needs rapidocr-onnxruntime (make test installs it)")
needs_silero = pytest.mark.skipif(SILERO is None, reason="needs silero-vad (make test installs it)")
SEQUENCE8 = Path(onnx.__file__).parent / "backend" / "test" / "data" / "simple" / "test_sequence_model8"
needs_sequence8 = pytest.mark.skipif(not (SEQUENCE8 / "model.onnx").is_file(),
                                     reason="needs ONNX's backend case simple/test_sequence_model8 (ships with onnx)")


def _original(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _sequence8_data() -> tuple[dict, np.ndarray]:
    """The case's own inputs (X, Splits) and expected output from its test_data_set_0."""
    def read(name):
        return onnx.numpy_helper.to_array(onnx.load_tensor(str(SEQUENCE8 / "test_data_set_0" / name)))

    return {"X": read("input_0.pb"), "Splits": read("input_1.pb")}, read("output_0.pb")


def test_minus_one_zero_and_missing_dims_are_dynamic_and_assumed_until_given():
    graph = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [-1, 3, 0, "?"])],
                       [("y", np.float32, [-1, 3, 0, "?"])])
    spec = spec_from_onnx(graph)
    assert [(d.is_dynamic, d.assumed) for d in spec["x"].dims] == [(True, True), (False, False), (True, True),
                                                                    (True, True)]
    assert [(t, a) for t, a, _ in assumed_dims(spec)] == [("x", 0), ("x", 2), ("x", 3)]
    with pytest.raises(UsageError, match=r"dynamic dims without a range: x axis 2 \(x_dim2\), x axis 3 \(x_dim3\)"):
        check_assumed(spec, "m.onnx")
    given = spec.override(["x:float32:[n=1..8@2,3,h=4..16@8,w=4..16@8]"])
    assert assumed_dims(given) == []
    check_assumed(given, "m.onnx")


def test_only_a_leading_dim_is_assumed_and_the_warning_names_it(caplog):
    graph = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, ["N", 3])],
                       [("y", np.float32, ["N", 3])])
    spec = spec_from_onnx(graph)
    with caplog.at_level("WARNING"):
        check_assumed(spec, "m.onnx")
    assert "assuming x axis 0 (N) = 1..16@4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_assumed(spec.override(["x:float32:[N=1..4@2,3]"]), "m.onnx")
    assert "assuming" not in caplog.text  # --input covered it: no warning


def test_float_value_ranges_and_names_with_colons():
    spec = InputSpec.parse(['"input:0":float32:[b=1..4@2,3,8,8]:-2.118..2.64', "sr:int64:[]:16000..16001"])
    assert spec.names == ["input:0", "sr"] and spec["input:0"].value_range == (-2.118, 2.64)
    assert InputSpec.parse(str(t) for t in spec) == spec  # the written form parses back, quotes included
    feeds = spec.random_feeds("max", seed=3)
    assert feeds["input:0"].min() >= -2.118 and feeds["input:0"].max() < 2.64 and feeds["sr"] == 16000
    assert TensorSpec.parse("'a:b':int64:[2]:0..5").name == "a:b"
    with pytest.raises(UsageError, match="int64 values need an integer range"):
        TensorSpec.parse("ids:int64:[2]:0.5..3")


def test_a_graph_with_a_colon_in_its_input_name_builds_from_a_quoted_spec(run_cli, in_tmp):
    nodes = [helper.make_node("MatMul", ["input:0", "W"], ["logits:0"])]
    onnx.save(make_model(nodes, [("input:0", np.float32, [-1, 4])], [("logits:0", np.float32, [-1, 2])],
                         {"W": seeded((4, 2), 1)}), in_tmp / "tf.onnx")
    code, out, err = run_cli("build", "tf.onnx", "--input", '"input:0":float32:[batch=1..8@4,4]:-1.5..1.5')
    assert code == 0, err
    manifest = read_manifest(in_tmp / "build" / "tf")
    assert manifest.inputs["input:0"].value_range == (-1.5, 1.5)
    x = np.linspace(-1.5, 1.4, 12, dtype=np.float32).reshape(3, 4)
    with runtime.load(in_tmp / "build" / "tf") as engine:
        np.testing.assert_allclose(
            engine.infer({"input:0": x})["logits:0"], x @ seeded((4, 2), 1), rtol=1e-5, atol=1e-6
        )


@needs_paddle
def test_paddleocr_classifier_with_minus_one_dims_is_refused_without_sizes_then_builds(run_cli, in_tmp):
    code, _, err = run_cli("build", str(PADDLE_CLS))
    assert code == 2 and "dynamic dims without a range: x axis 2 (x_dim2), x axis 3 (x_dim3)" in err
    assert '--input "x:float32:[x_dim0=1..16@4,3,x_dim2=MIN..MAX@OPT,x_dim3=MIN..MAX@OPT]"' in err
    code, out, err = run_cli("build", str(PADDLE_CLS), "--input", "x:float32:[batch=1..16@4,3,48,192]:-1.0..1.0")
    assert code == 0, err
    bundle = in_tmp / "build" / PADDLE_CLS.stem
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["outputs"][0]["shape"] == ["batch", 2]  # measured, not the file's [-1, 2]
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 48, 192)).astype(np.float32)
    with runtime.load(bundle) as engine:
        got = engine.infer({"x": x})
    np.testing.assert_allclose(next(iter(got.values())), _original(PADDLE_CLS, {"x": x})[0], atol=1e-4, rtol=1e-3)


@needs_silero
def test_silero_vad_onnx_builds_when_the_profile_check_feeds_its_sr_value_range(run_cli, in_tmp):
    inputs = ("--input", "input:float32:[batch=1..8@2,576]:-1.0..1.0", "--input", "state:float32:[2,batch,128]")
    code, _, err = run_cli("build", str(SILERO), *inputs, "--input", "sr:int64:[]:0..2")  # sr 0 or 1: the file refuses
    assert code == 2 and "does not run" in err and "real ranges" in err  # sr 0 or 1: refused, one line
    code, out, err = run_cli("build", str(SILERO), *inputs, "--input", "sr:int64:[]:16000..16001", "--force")
    assert code == 0, err
    rng = np.random.default_rng(1)
    feeds = {"input": rng.uniform(-0.5, 0.5, (3, 576)).astype(np.float32),
             "state": np.zeros((2, 3, 128), np.float32), "sr": np.array(16000, np.int64)}
    with runtime.load(in_tmp / "build" / SILERO.stem) as engine:
        got = engine.infer(feeds)
    expected = _original(SILERO, feeds)
    np.testing.assert_allclose(got["output"], expected[0], atol=1e-5, rtol=1e-4)


def test_a_bundle_records_its_source_absolutely_and_finds_it_again_when_moved_with_it(run_cli, in_tmp, tmp_path):
    """Built from ../project/m.py; compare runs from another directory, then after project and bundle
    move together; a changed source is refused by its hash."""
    import os
    import shutil

    project = in_tmp / "project"
    project.mkdir()
    (project / "m.py").write_text(
        "import torch\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), ['x:float32:[b=1..4@2,4]']\n"
    )
    os.chdir(project)
    code, _, err = run_cli("build", "m.py:model", "-o", str(project / "bundle"))
    assert code == 0, err
    manifest = read_manifest(project / "bundle")
    assert (
        manifest.model.source == f"{(project / 'm.py').resolve()}:model" and manifest.model.relative == "../m.py:model"
    )
    os.chdir(in_tmp)
    code, out, err = run_cli("compare", str(project / "bundle"), "--reference", "pytorch")
    assert code == 0, out + err
    moved = tmp_path / "elsewhere"
    shutil.move(str(project), str(moved))
    code, out, err = run_cli("compare", str(moved / "bundle"), "--reference", "pytorch")
    assert code == 0, out + err  # found beside the bundle, same hash
    (moved / "m.py").write_text((moved / "m.py").read_text().replace("Linear(4, 3)", "Linear(4, 3, bias=False)"))
    code, out, err = run_cli("compare", str(moved / "bundle"), "--reference", "pytorch")
    assert code == 2 and "is not the one the bundle was built from" in err


@needs_sequence8
def test_a_graph_random_feeds_cannot_run_is_refused_in_one_line_naming_what_to_pass(run_cli, in_tmp):
    """SplitToSequence needs sum(Splits) == len(X): random Splits cannot run the original graph."""
    code, _, err = run_cli("optimize", SEQUENCE8 / "model.onnx", "-o", "o.onnx", "--target", "ort")
    assert code == 2 and "internal error" not in err and "Traceback" not in err, err
    assert "cannot be verified on random data at the input spec" in err and "split_size_sum" in err
    assert "Pass --feed" in err and "--input NAME:DTYPE:[DIMS]:LO..HI" in err and "--no-verify-passes" in err
    assert not (in_tmp / "o.onnx").exists()
    code, _, err = run_cli("build", SEQUENCE8 / "model.onnx")
    assert code == 2 and "internal error" not in err and "does not run under ONNX Runtime" in err, err


@needs_sequence8
@pytest.mark.parametrize(
    "how", [("--no-verify-passes",), ("--input", "X:float32:[3]", "--input", "Splits:int64:[3]:1..2")]
)
def test_a_graph_random_feeds_cannot_run_optimizes_unverified_or_at_a_spec_that_runs(run_cli, in_tmp, how):
    code, out, err = run_cli("optimize", SEQUENCE8 / "model.onnx", "-o", "o.onnx", "--target", "ort", *how)
    assert code == 0, err
    if how[0] == "--no-verify-passes":
        assert "not compared" in out and "cannot be verified on random data" in err
    else:
        assert "max abs difference from the input graph: len 0" in out
    feeds, expected = _sequence8_data()
    np.testing.assert_array_equal(_original(in_tmp / "o.onnx", feeds)[0], expected)


@needs_sequence8
def test_a_graph_random_feeds_cannot_run_is_verified_on_the_users_own_feeds(run_cli, in_tmp):
    feeds, expected = _sequence8_data()
    np.savez(in_tmp / "data.npz", **feeds)
    code, out, err = run_cli("optimize", SEQUENCE8 / "model.onnx", "-o", "o.onnx", "--target", "ort",
                             "--feed", "data.npz")
    assert code == 0, err
    assert "max abs difference from the input graph: len 0" in out and "assuming" not in err
    np.testing.assert_array_equal(_original(in_tmp / "o.onnx", feeds)[0], expected)
    np.save(in_tmp / "x.npy", feeds["X"])
    code, _, err = run_cli("optimize", SEQUENCE8 / "model.onnx", "-o", "p.onnx", "--target", "ort", "--feed", "X=x.npy")
    assert code == 2 and "--feed gives no array for input Splits" in err and not (in_tmp / "p.onnx").exists()
    np.save(in_tmp / "splits.npy", np.array([1, 1, 1], np.int64))  # sums to 3, X (empty) to 0
    code, _, err = run_cli("optimize", SEQUENCE8 / "model.onnx", "-o", "p.onnx", "--target", "ort", "--feed", "X=x.npy",
                           "--feed", "Splits=splits.npy")
    assert code == 2 and "cannot be verified on the --feed data" in err and "split_size_sum" in err
