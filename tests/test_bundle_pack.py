"""What a bundle stores: one graph file when both targets wrote the same bytes, capped golden data,
and ``planforge pack`` (a verified copy, or only what production loads, with its own manifest)."""

import filecmp
import json

import numpy as np
import onnxruntime as ort
import pytest

from engines import runtime
from engines.build import BuildRequest, build, stages
from engines.bundle import read_manifest, verified_path
from engines.deploy.triton import write_repository
from engines.evaluate.compare import CompareRequest, compare
from foundation.errors import BundleError, IntegrityError, UsageError

TINY = (
    "import torch\n\n\ndef make():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(8, 16), "
    "torch.nn.ReLU(), torch.nn.Linear(16, 4)), ['x:float32:[batch=1..64@8,8]']\n"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    (root / "tiny.py").write_text(TINY)
    return build(BuildRequest(f"{root / 'tiny.py'}:make", out=root / "tiny", build_root=root)).out


def _golden(bundle):
    with np.load(bundle / "golden.npz") as data:
        return {k: data[k] for k in data.files}


def test_identical_target_graphs_are_stored_once_and_both_backends_load_it(tiny, tmp_path):
    manifest = read_manifest(tiny)
    assert manifest.backends.ort.graph == manifest.backends.trt.graph == "model.trt.onnx"
    assert not (tiny / "model.ort.onnx").exists() and "model.ort.onnx" not in manifest.artifacts
    golden = _golden(tiny)
    with runtime.load(tiny, backend="ort-cpu") as engine:
        got = engine.infer(golden["max/in/x"])
    np.testing.assert_allclose(next(iter(got.values())), golden["max/out/" + manifest.output_names[0]],
                               atol=1e-5, rtol=1e-4)
    result = compare(CompareRequest(tiny, report=tmp_path / "r.json"))
    shared = {p.runner: p for p in result.pairs if p.graph == "model.trt.onnx"}
    assert result.ok and set(shared) == {"onnxruntime model.trt.onnx", "onnxruntime model.trt.onnx as written"}
    assert {p.target for p in shared.values()} == {"ort", "trt"}
    models = write_repository(tiny, tmp_path / "repo")  # the ORT model gets the shared graph
    ort_model = next(m for m in models if m.endswith("_ort"))
    assert filecmp.cmp(tmp_path / "repo" / ort_model / "1" / "model.onnx", tiny / "model.trt.onnx", shallow=False)


def test_graphs_that_differ_are_both_kept(build_root):
    bundle = build(BuildRequest("mlp", out=build_root / "mlp-two", build_root=build_root)).out
    manifest = read_manifest(bundle)
    assert manifest.backends.ort.graph == "model.ort.onnx" and manifest.backends.trt.graph == "model.trt.onnx"
    assert not filecmp.cmp(bundle / "model.ort.onnx", bundle / "model.trt.onnx", shallow=False)


def test_golden_data_keeps_the_smallest_points_within_the_cap(monkeypatch, tmp_path):
    golden = {f"{p}/{side}/{n}": np.zeros((b, 100), np.float32)
              for p, b in (("min", 1), ("opt", 8), ("max", 64)) for side, n in (("in", "x"), ("out", "y"))}
    assert set(stages.capped_golden(golden)) == set(golden)
    kept = stages.capped_golden(golden, cap=2 * 9 * 400)  # min (800 B) and opt (6400 B) fit, max does not
    assert {k.split("/")[0] for k in kept} == {"min", "opt"} and all(kept[k] is golden[k] for k in kept)
    assert {k.split("/")[0] for k in stages.capped_golden(golden, cap=1)} == {"min"}  # the smallest always stays

    (tmp_path / "tiny.py").write_text(TINY)
    monkeypatch.setattr(stages, "GOLDEN_CAP", 1)
    bundle = build(BuildRequest(f"{tmp_path / 'tiny.py'}:make", out=tmp_path / "capped", build_root=tmp_path)).out
    assert {k.split("/")[0] for k in _golden(bundle)} == {"min"}
    report = json.loads((bundle / "report.json").read_text())
    assert set(report["graphs"]["model.trt.onnx"]["points"]) == {"min", "max"}  # the build checked every point
    result = compare(CompareRequest(bundle, data="golden", report=tmp_path / "r.json"))
    assert result.ok and len(result.data.feeds) == 1


def test_pack_copies_a_verified_bundle_and_runtime_only_keeps_what_production_loads(tiny, tmp_path, run_cli):
    full = tmp_path / "full"
    code, out, err = run_cli("pack", tiny, "-o", full)
    assert code == 0, err
    assert read_manifest(full).artifacts == read_manifest(tiny).artifacts
    assert all(filecmp.cmp(tiny / n, full / n, shallow=False) for n in read_manifest(tiny).artifacts)

    lean = tmp_path / "lean"
    code, out, err = run_cli("pack", tiny, "-o", lean, "--runtime-only")
    assert code == 0, err
    manifest = read_manifest(lean)
    assert set(manifest.artifacts) == {"model.trt.onnx"} and sorted(p.name for p in lean.iterdir()) == \
        ["manifest.json", "model.trt.onnx"]
    assert manifest.packed["runtime_only"] and "golden.npz" in manifest.packed["omitted"] and "left out" in out
    assert manifest.artifacts["model.trt.onnx"] == read_manifest(tiny).artifacts["model.trt.onnx"]
    verified_path(lean, manifest, "model.trt.onnx")  # its own manifest verifies
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    with runtime.load(lean) as a, runtime.load(tiny) as b:
        np.testing.assert_array_equal(next(iter(a.infer(x).values())), next(iter(b.infer(x).values())))
    expected = ort.InferenceSession(str(tiny / "model.trt.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    with runtime.load(lean) as a:
        np.testing.assert_allclose(next(iter(a.infer(x).values())), expected[0], atol=1e-6)

    code, _, err = run_cli("compare", lean)  # what needs the left-out data says so
    assert code != 0 and "runtime-only pack" in err and "Traceback" not in err
    with pytest.raises(BundleError, match="runtime-only pack"):
        verified_path(lean, manifest, "golden.npz")

    code, _, err = run_cli("pack", tiny, "-o", lean, "--runtime-only")
    assert code != 0 and "--force" in err
    code, _, err = run_cli("pack", tiny, "-o", tiny)
    assert code != 0 and "the bundle itself" in err


def test_pack_refuses_a_tampered_bundle_and_writes_nothing(tiny, tmp_path):
    import shutil

    from engines.bundle.pack import pack

    copy = shutil.copytree(tiny, tmp_path / "copy")
    (copy / "golden.npz").write_bytes(b"changed")
    with pytest.raises(IntegrityError, match="golden.npz"):
        pack(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["copy"]
    pack(copy, tmp_path / "out", runtime_only=True)  # what production loads is intact: that pack is fine
    with pytest.raises(UsageError, match="--force"):
        pack(copy, tmp_path / "out", runtime_only=True)
