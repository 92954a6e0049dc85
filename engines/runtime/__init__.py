"""The production runtime: ``load(bundle)`` returns a ``Runner``; ``schedule(bundle, batching=...)``
returns a ``Scheduler`` (dynamic batching, response cache, deadlines, degradation) for many callers
in one process; ``load(decoder_bundle, batching=ContinuousBatching(...))`` a ``GenerationServer``
(continuous batching and a prefix cache, ``engines.runtime.generate.continuous``). None is a network
server (that is ``engines.serve``).

    with engines.runtime.load("build/resnet18") as engine:
        outputs = engine.infer({"x": images})

Lean: NumPy, ONNX Runtime and planforge's standard-library modules at import; TensorRT, its
CUDA binding and prometheus-client only when used.
"""

from engines.runtime.base import Runner, Stats
from engines.runtime.batching import Batching
from engines.runtime.generate import ContinuousBatching, GenerationServer, GenerationStream
from engines.runtime.ort_runner import OrtRunner
from engines.runtime.scheduler import Scheduler
from engines.runtime.select import BACKENDS, ORDER, BundleView, load, schedule, unavailable

__all__ = ["BACKENDS", "ORDER", "Batching", "BundleView", "ContinuousBatching", "GenerationServer", "GenerationStream",
           "OrtRunner", "Runner", "Scheduler", "Stats", "load", "schedule", "unavailable"]
