"""ONNX Runtime on the CPU, or CUDA when its provider is installed and asked for.

``InferenceSession.run`` is thread-safe, so one session serves every caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.runtime.base import Runner
from foundation.errors import BundleError
from foundation.ort_session import create_session
from foundation.spec import InputSpec, OutputSpec


class OrtRunner(Runner):
    """ONNX Runtime on the CPU, or CUDA when its provider is installed and asked for."""

    def __init__(self, graph: Path, input_spec: InputSpec, outputs: list[OutputSpec], manifest: dict | None = None,
                 providers: tuple = ("CPUExecutionProvider",), threads: int | None = None):
        super().__init__(input_spec, outputs, manifest)
        try:
            self.session = create_session(graph, threads, optimize=True, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load {graph.name}: {str(exc).splitlines()[0][:300]}") from exc
        self.backend = "ort-cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "ort-cpu"
        self._names = [o.name for o in self.session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.session.run(self._names, feeds)))

    def close(self) -> None:
        super().close()
        self.session = None
