"""TensorRT on a GPU (``pytest -m trt``): build a zoo engine and compare it with ONNX Runtime.

These skip, with the reason, wherever TensorRT's native libraries or an NVIDIA GPU are missing
(every machine this project's CI runs on). They run the plan through Polygraphy's TrtRunner, a
dependency already, so they need no CUDA binding of planforge's own.
"""

import numpy as np
import pytest

from engines.build import BuildRequest, ProfileOptions, build
from engines.runtime.trt_status import tensorrt_status

AVAILABLE, REASON = tensorrt_status()
pytestmark = [pytest.mark.trt, pytest.mark.skipif(not AVAILABLE, reason=f"needs TensorRT and a GPU: {REASON}")]


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_zoo_engine_matches_onnx_runtime(build_root, precision, atol):
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from passes.verify import run_graph

    out = build_root / f"digits-trt-{precision}"
    result = build(
        BuildRequest(
            "digits_cnn",
            out=out,
            precision=precision,
            require_trt=True,
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..8@4", "batch=9..64@32")),
        )
    )
    trt = result.manifest.to_json()["backends"]["trt"]
    assert trt["plan"] == "model.plan" and result.manifest.environment.compute_capability
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    reference = run_graph(str(out / "model.ort.onnx"), {"x": x})["logits"]
    with TrtRunner(EngineFromBytes((out / "model.plan").read_bytes())) as runner:
        got = runner.infer({"x": x})["logits"]
    np.testing.assert_allclose(got, reference, atol=atol, rtol=atol)
    again = build(
        BuildRequest(
            "digits_cnn",
            out=out,
            precision=precision,
            require_trt=True,
            force=True,
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..8@4", "batch=9..64@32")),
        )
    )
    assert again.manifest.backends.trt.reused is True  # the engine cache


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runtime_on_tensorrt_matches_onnx_runtime_across_threads_and_device_tensors(build_root, cuda_graphs):
    import threading

    import torch

    from engines import runtime

    out = build_root / "digits-trt-runtime"
    build(
        BuildRequest(
            "digits_cnn",
            out=out,
            require_trt=True,
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..8@4", "batch=9..64@32")),
        )
    )
    rng = np.random.default_rng(1)
    feeds = [rng.uniform(0, 1, (1 + i % 12, 1, 8, 8)).astype(np.float32) for i in range(40)]
    with runtime.load(out, backend="ort-cpu") as cpu, runtime.load(out, backend="trt", cuda_graphs=cuda_graphs) as gpu:
        expected = [cpu.infer({"x": x})["logits"] for x in feeds]
        got = [None] * len(feeds)

        def worker(t):
            for i in range(t, len(feeds), 4):
                got[i] = gpu.infer({"x": feeds[i]})["logits"]

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)
        device_out = gpu.infer({"x": torch.from_numpy(feeds[0]).cuda()})["logits"]
        assert device_out.is_cuda  # CUDA tensors in, CUDA tensors out
        assert gpu.backend == "trt" and gpu.stats()["errors"] == 0
