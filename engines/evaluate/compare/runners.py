"""Polygraphy runners for ``planforge compare``: what each side of a comparison runs on.

Polygraphy brings runners for ONNX Runtime and TensorRT; two are planforge's own, written to
Polygraphy's ``BaseRunner`` interface (``activate_impl``, ``get_input_metadata_impl``,
``infer_impl`` setting ``inference_time``, ``deactivate_impl``):

- ``TorchRunner``: the PyTorch module the bundle was exported from, eager on the CPU. Polygraphy
  has no PyTorch runner for a live ``nn.Module`` with planforge's input spec and output names.
- ``PlanforgeRunner``: planforge's own runtime (``engines.runtime.load``) on one backend, so the
  comparison covers what production runs, feed checks, profiles and all.

Every artifact handed to a runner has had its sha256 checked against the manifest first.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from engines.runtime import load
from foundation.decoder import every_logit_position, static_cache_feeds
from foundation.errors import InferenceError
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)


def input_metadata(spec: InputSpec, point: str | None = None) -> TensorMetadata:
    """Polygraphy's view of an input spec: dynamic dims are ``None`` (or the ``point``'s sizes)."""
    meta = TensorMetadata()
    for tensor in spec:
        shape = list(tensor.shape(point)) if point else [None if d.is_dynamic else d.min for d in tensor.dims]
        meta.add(tensor.name, np.dtype(tensor.dtype), shape, min_shape=list(tensor.shape("min")),
                 max_shape=list(tensor.shape("max")))
    return meta


class TorchRunner(BaseRunner):
    """Runs a PyTorch module eagerly on the CPU, inputs in spec order, outputs by the graph's names."""

    def __init__(self, module, spec: InputSpec, output_names: list[str], name: str = "pytorch",
                 threads: int | None = None):
        super().__init__(name=name)
        self.module, self.spec, self.output_names, self.threads = module, spec, list(output_names), threads
        self._old_threads = None

    def activate_impl(self):
        import torch  # noqa: PLC0415 - only when a PyTorch reference is asked for

        self.module.eval()
        if self.threads:
            self._old_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def get_input_metadata_impl(self):
        return input_metadata(self.spec)

    def infer_impl(self, feed_dict):
        from exporter.parity import torch_outputs  # noqa: PLC0415 - the parity check's own way to run the module

        start = time.perf_counter()
        flat = torch_outputs(self.module, {name: feed_dict[name] for name in self.spec.names})
        self.inference_time = time.perf_counter() - start
        if len(flat) != len(self.output_names):

            raise InferenceError(f"the PyTorch model returns {len(flat)} tensors, the bundle has "
                                 f"{len(self.output_names)} outputs ({', '.join(self.output_names)})")
        return dict(zip(self.output_names, flat))

    def deactivate_impl(self):
        if self._old_threads is not None:
            import torch  # noqa: PLC0415 - imports torch

            torch.set_num_threads(self._old_threads)
            self._old_threads = None


class PlanforgeRunner(BaseRunner):
    """planforge's runtime on one backend (``trt``, ``ort-cuda`` or ``ort-cpu``)."""

    def __init__(self, bundle: Path, backend: str, spec: InputSpec, name: str | None = None,
                 threads: int | None = None):
        super().__init__(name=name or f"planforge {backend}")
        self.bundle, self.backend, self.spec, self.threads = Path(bundle), backend, spec, threads
        self.engine = None

    def activate_impl(self):
        self.engine = load(self.bundle, backend=self.backend, threads=self.threads)

    def get_input_metadata_impl(self):
        return input_metadata(self.spec)

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = self.engine.infer(dict(feed_dict))
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate_impl(self):
        self.engine.close()
        self.engine = None


class DecoderGraphRunner(BaseRunner):
    """A runner of a decoder graph whose interface the passes changed, fed the data every other side gets:
    logits asked at every position (``passes/select_logit_positions.py``) and, for a graph that keeps its
    cache in static buffers (``passes/fuse_static_kv_cache.py``), each past padded to the buffer that means
    the same (``foundation.decoder``)."""

    def __init__(self, inner, spec: InputSpec, static: bool):
        super().__init__(name=inner.name)
        self.inner, self.spec, self.static = inner, spec, static

    def activate_impl(self):
        self.inner.activate()

    def get_input_metadata_impl(self):
        return input_metadata(self.spec)  # the data every side gets: the growing cache's

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        feeds = static_cache_feeds(dict(feed_dict)) if self.static else dict(feed_dict)
        outputs = self.inner.infer_impl(every_logit_position(feeds))
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate_impl(self):
        self.inner.deactivate()


def onnxrt_runner(path: Path, name: str, providers=("cpu",), optimize: bool = True):
    """Polygraphy's ONNX Runtime runner on a verified graph: its graph optimizations on, or off so the
    graph runs as written (the ``trt`` graph: Q/DQ emulated in float, see ``engines.build.int8``)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: PLC0415 - polygraphy is heavy

    level = None if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=list(providers), graph_optimization_level=level),
                        name=name)


def tensorrt_runner(plan: Path, name: str = "tensorrt"):
    """Polygraphy's TensorRT runner on the bundle's verified plan (a GPU and TensorRT required)."""
    from polygraphy.backend.common import BytesFromPath  # noqa: PLC0415 - polygraphy is heavy
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner  # noqa: PLC0415 - polygraphy is heavy

    return TrtRunner(EngineFromBytes(BytesFromPath(str(plan))), name=name)


@contextlib.contextmanager
def polygraphy_quiet():
    """Polygraphy logs every comparison to stdout; planforge prints its own table (``-v`` shows both).
    Polygraphy's logger is process-wide: its severity and colors are restored on the way out."""
    from polygraphy.logger import G_LOGGER  # noqa: PLC0415 - polygraphy is heavy; only compare needs it

    old, colors = G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.colors = False  # else its first message warns that the optional `colored` is missing
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.module_severity, G_LOGGER.colors = old, colors
