"""TensorRT on a GPU (``pytest -m trt``): build a zoo engine and compare it with ONNX Runtime.

These skip, with the reason, wherever TensorRT's native libraries or an NVIDIA GPU are missing
(every machine this project's CI runs on). They run the plan through Polygraphy's TrtRunner, a
dependency already, so they need no CUDA binding of planforge's own.
"""

import numpy as np
import pytest

from engines.build import BuildRequest, build
from engines.trt import tensorrt_status

AVAILABLE, REASON = tensorrt_status()
pytestmark = [pytest.mark.trt, pytest.mark.skipif(not AVAILABLE, reason=f"needs TensorRT and a GPU: {REASON}")]


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_zoo_engine_matches_onnx_runtime(build_root, precision, atol):
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from passes.verify import run_graph

    out = build_root / f"digits-trt-{precision}"
    result = build(BuildRequest("digits_cnn", out=out, precision=precision, require_trt=True,
                                profiles=("batch=1..8@4", "batch=9..64@32"), build_root=build_root))
    trt = result.manifest["backends"]["trt"]
    assert trt["plan"] == "model.plan" and result.manifest["environment"]["compute_capability"]
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    reference = run_graph(str(out / "model.ort.onnx"), {"x": x})["logits"]
    with TrtRunner(EngineFromBytes((out / "model.plan").read_bytes())) as runner:
        got = runner.infer({"x": x})["logits"]
    np.testing.assert_allclose(got, reference, atol=atol, rtol=atol)
    again = build(BuildRequest("digits_cnn", out=out, precision=precision, require_trt=True, force=True,
                               profiles=("batch=1..8@4", "batch=9..64@32"), build_root=build_root))
    assert again.manifest["backends"]["trt"]["reused"] is True  # the engine cache
