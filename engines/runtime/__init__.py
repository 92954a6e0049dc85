"""The production runtime: ``load(bundle)`` and the runners it returns.

    with engines.runtime.load("build/resnet18") as engine:
        outputs = engine.infer({"x": images})

Lean: NumPy, ONNX Runtime and planforge's standard-library modules at import; TensorRT, its
CUDA binding and prometheus-client only when used.
"""

from engines.runtime.base import Runner, Stats
from engines.runtime.batching import Batching
from engines.runtime.ort import OrtRunner
from engines.runtime.select import BACKENDS, ORDER, BundleView, load, unavailable

__all__ = ["BACKENDS", "ORDER", "Batching", "BundleView", "OrtRunner", "Runner", "Stats", "load", "unavailable"]
