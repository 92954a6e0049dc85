"""The runtime on ONNX Runtime CPU: results, input checks, tampering, lean import."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from helpers import helper, make_model, seeded

from engines import runtime
from engines.build import BuildRequest, build
from foundation.errors import BundleError, RuntimeInputError


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    return build(BuildRequest("mlp", out=root / "mlp", build_root=root)).out


def test_infer_reproduces_the_golden_pytorch_outputs(mlp_bundle):
    golden = np.load(mlp_bundle / "golden.npz")
    with runtime.load(mlp_bundle) as engine:
        assert engine.backend == "ort-cpu"
        assert engine.input_specs.names == ["x"] and engine.output_specs[0].name == "logits"
        assert engine.profiles[0]["max"] == {"x": [64, 64]}
        for point in ("min", "max"):
            out = engine.infer({"x": golden[f"{point}/in/x"]})
            np.testing.assert_allclose(out["logits"], golden[f"{point}/out/logits"], atol=1e-5, rtol=1e-4)


def test_non_contiguous_feeds_are_accepted(mlp_bundle):
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32).T  # (8, 64), Fortran order
    with runtime.load(mlp_bundle) as engine:
        np.testing.assert_allclose(engine.infer({"x": x})["logits"],
                                   engine.infer({"x": np.ascontiguousarray(x)})["logits"])


@pytest.mark.parametrize("feeds, message", [
    ({"x": np.zeros((2, 64), np.float64)}, "expected dtype float32, found float64"),
    ({"x": np.zeros((65, 64), np.float32)}, r"dim 0 \(batch\) is 65, allowed 1..64"),
    ({"x": np.zeros((2, 63), np.float32)}, r"dim 1 \(fixed\) is 63, allowed 64"),
    ({"y": np.zeros((2, 64), np.float32)}, "missing x; unexpected y"),
    ({"x": [[0.0] * 64]}, "expected a NumPy array"),
])
def test_bad_feeds_are_rejected_before_onnx_runtime_sees_them(mlp_bundle, feeds, message):
    with runtime.load(mlp_bundle) as engine, pytest.raises(RuntimeInputError, match=message):
        engine.infer(feeds)


def test_explicit_backends_that_cannot_load_say_why(mlp_bundle):
    with pytest.raises(BundleError, match="cannot run on TensorRT: .*(TensorRT|tensorrt)"):
        runtime.load(mlp_bundle, backend="trt")
    with pytest.raises(BundleError, match="CUDAExecutionProvider"):
        runtime.load(mlp_bundle, backend="ort-cuda")


def test_a_tampered_graph_is_refused_before_onnx_runtime_reads_it(mlp_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mlp_bundle, copy)
    data = bytearray((copy / "model.ort.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.ort.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        runtime.load(copy)


def test_a_manifest_from_a_newer_schema_is_refused(mlp_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mlp_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema 99"):
        runtime.load(copy)


def test_runtime_imports_without_torch_onnx_graphsurgeon_or_polygraphy(mlp_bundle):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "onnx_graphsurgeon", "polygraphy"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from engines import runtime
        with runtime.load({str(mlp_bundle)!r}) as engine:
            out = engine.infer({{"x": np.zeros((2, 64), np.float32)}})
        print(out["logits"].shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 10)"


def test_the_runtime_api_says_what_went_wrong_for_an_array_a_closed_runner_and_an_id_out_of_range(tmp_path):
    from foundation.errors import UsageError

    onnx_path = tmp_path / "emb.onnx"
    nodes = [helper.make_node("Gather", ["table", "ids"], ["vectors"])]
    onnx.save(make_model(nodes, [("ids", np.int64, ["n", 3])], [("vectors", np.float32, ["n", 3, 4])],
                         {"table": seeded((10, 4), 1)}), onnx_path)
    result = build(BuildRequest(str(onnx_path), inputs=("ids:int64:[n=1..4@2,3]:0..10",), build_root=tmp_path))
    ids = np.array([[1, 2, 9]], np.int64)
    with runtime.load(result.out) as engine:
        by_array = engine.infer(ids)["vectors"]  # one input: the array alone
        np.testing.assert_allclose(by_array, seeded((10, 4), 1)[ids], rtol=0, atol=0)
        with pytest.raises(RuntimeInputError, match=r"values 1\.\.10 fall outside the spec's range 0\.\.10"):
            engine.infer({"ids": np.array([[1, 2, 10]], np.int64)})
    with pytest.raises(UsageError, match="runner is closed"):
        engine.infer({"ids": ids})
    with runtime.load(result.out, check_values=False) as engine:  # opted out: ONNX Runtime's own error
        with pytest.raises(Exception) as caught:
            engine.infer({"ids": np.array([[1, 2, 10]], np.int64)})
        assert "fall outside" not in str(caught.value)
