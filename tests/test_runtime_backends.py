"""Backend selection and its reasons, tampered bundles, concurrency, stats, inference failures."""

import json
import logging
import shutil
import threading

import numpy as np
import onnx
import pytest
from helpers import add_plan_artifact

from engines import runtime
from engines.build import BuildRequest, build
from foundation.errors import BundleError, InferenceError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtb")
    return build(BuildRequest("mlp", out=root / "mlp", build_root=root)).out


def _copy(bundle, tmp_path, edit=None):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    if edit:
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(copy, manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_auto_logs_one_info_line_naming_the_backends_this_machine_lacks(bundle, caplog):
    with caplog.at_level(logging.INFO, logger="engines.runtime"):
        engine = runtime.load(bundle)
    assert engine.backend == "ort-cpu"
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(records) == 1 and records[0][0] == "INFO"  # no WARNING for what a CPU machine lacks
    assert records[0][1].startswith("running on ONNX Runtime CPU (trt: the bundle has no TensorRT plan")
    assert "ort-cuda: onnxruntime has no CUDAExecutionProvider" in records[0][1]


def test_a_plan_here_is_skipped_because_tensorrt_cannot_load(bundle, tmp_path, caplog):
    copy = _copy(bundle, tmp_path, add_plan_artifact)
    with caplog.at_level(logging.INFO, logger="engines.runtime"):
        assert runtime.load(copy).backend == "ort-cpu"
    assert "(trt: " in caplog.text and ("native libraries" in caplog.text or "not installed" in caplog.text)
    with pytest.raises(BundleError, match="cannot run on TensorRT"):
        runtime.load(copy, backend="trt")


def test_a_truncated_plan_is_refused_before_anything_reads_it_even_under_auto(bundle, tmp_path):
    def truncated(copy, manifest):
        add_plan_artifact(copy, manifest, b"\x00" * 4096)
        (copy / "model.plan").write_bytes(b"\x00" * 100)
    copy = _copy(bundle, tmp_path, truncated)
    for backend in ("auto", "trt"):  # the sha256 mismatch first, not "no backend can run it here"
        with pytest.raises(BundleError, match="model.plan does not match the sha256"):
            runtime.load(copy, backend=backend)


def test_the_cpu_fallback_never_runs_an_fp16_graph(bundle, tmp_path):
    copy = _copy(bundle, tmp_path, lambda c, m: m["backends"]["ort"].update(precision="fp16"))
    with pytest.raises(
        BundleError, match="no backend can run it here: .*ort-cpu: the bundle's ONNX Runtime graph is FP16"
    ):
        runtime.load(copy)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "model.ort.onnx").unlink(), "artifact model.ort.onnx is missing"),
        (
            lambda c: (c / "model.ort.onnx").write_bytes((c / "model.ort.onnx").read_bytes()[:1000]),
            "does not match the sha256",
        ),
        (lambda c: (c / "manifest.json").unlink(), "has no manifest.json"),
    ],
)
def test_damaged_bundles_are_a_clear_bundle_error(bundle, tmp_path, damage, message):
    copy = _copy(bundle, tmp_path)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        runtime.load(copy)


def test_eight_threads_times_two_hundred_calls_equal_the_sequential_results(bundle):
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((1 + i % 7, 64)).astype(np.float32) for i in range(200)]
    with runtime.load(bundle) as engine:
        expected = [engine.infer({"x": x})["logits"] for x in feeds]
        results = [[None] * len(feeds) for _ in range(8)]

        def worker(t):
            for i in range(len(feeds)):
                j = (i * 7 + t * 13) % len(feeds)  # every thread walks the calls in its own order
                results[t][j] = engine.infer({"x": feeds[j]})["logits"]

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
    for per_thread in results:
        for got, want in zip(per_thread, expected):
            np.testing.assert_array_equal(got, want)
    assert stats["calls"] == 200 + 8 * 200 and stats["errors"] == 0
    assert sum(stats["latency_ms"]["buckets"].values()) == stats["calls"] and stats["backend"] == "ort-cpu"


def test_prometheus_metrics_count_the_calls(bundle):
    prometheus_client = pytest.importorskip("prometheus_client")
    labels = {"bundle": "mlp", "backend": "ort-cpu"}
    before = prometheus_client.REGISTRY.get_sample_value("planforge_infer_calls_total", labels) or 0
    with runtime.load(bundle) as engine:
        for _ in range(3):
            engine.infer({"x": np.zeros((2, 64), np.float32)})
    assert prometheus_client.REGISTRY.get_sample_value("planforge_infer_calls_total", labels) == before + 3
    assert prometheus_client.REGISTRY.get_sample_value("planforge_infer_latency_seconds_count", labels) >= 3


def test_torch_tensors_are_accepted_on_the_cpu(bundle):
    torch = pytest.importorskip("torch")
    x = torch.randn(3, 64)
    with runtime.load(bundle) as engine:
        np.testing.assert_array_equal(engine.infer({"x": x})["logits"], engine.infer({"x": x.numpy()})["logits"])
        with pytest.raises(Exception, match="expected dtype float32, found float64"):
            engine.infer({"x": x.double()})


def test_a_failure_at_inference_time_is_a_clear_error_and_is_counted(tmp_path, build_root):
    from helpers import helper, make_model

    # Gather from a 3-row table: the checks see shapes and dtypes, an index of 7 fails inside ONNX Runtime
    nodes = [helper.make_node("Gather", ["table", "index"], ["y"], axis=0)]
    model = make_model(nodes, [("index", np.int64, ["n"])], [("y", np.float32, ["n", 2])],
                       {"table": np.arange(6, dtype=np.float32).reshape(3, 2)})
    onnx.save(model, str(tmp_path / "gather.onnx"))
    out = build(BuildRequest(str(tmp_path / "gather.onnx"), out=tmp_path / "b", build_root=build_root,
                             inputs=("index:int64:[n=1..4@2]:0..3",))).out
    with runtime.load(out, check_values=False) as engine:  # the spec's range check would refuse 7 first
        assert engine.infer({"index": np.array([2, 0])})["y"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
        with pytest.raises(InferenceError, match="ort-cpu failed to run: .*fallback_on_error=True"):
            engine.infer({"index": np.array([7, 0])})
        assert engine.stats()["errors"] == 1 and engine.stats()["calls"] == 2
    with runtime.load(out, fallback_on_error=True, check_values=False) as engine:
        with pytest.raises(InferenceError, match="no backend left to retry"):
            engine.infer({"index": np.array([7])})
        assert engine.stats()["errors"] == 1
