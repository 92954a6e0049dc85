"""ONNX Runtime CUDA (``pytest -m gpu``): skips with the reason where onnxruntime-gpu is missing."""

import numpy as np
import onnxruntime
import pytest

from engines.build import BuildRequest, build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="needs onnxruntime-gpu with the CUDA execution provider (CPU onnxruntime is installed)")]


def test_onnx_runtime_cuda_backend_matches_the_cpu(build_root):
    from engines import runtime

    out = build(BuildRequest("mlp", out=build_root / "mlp-cuda", build_root=build_root)).out
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    with runtime.load(out, backend="ort-cuda") as gpu, runtime.load(out, backend="ort-cpu") as cpu:
        assert gpu.backend == "ort-cuda"
        np.testing.assert_allclose(gpu.infer({"x": x})["logits"], cpu.infer({"x": x})["logits"], atol=1e-4)
