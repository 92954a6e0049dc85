"""ONNX Runtime on the CPU, or CUDA when its provider is installed and asked for.

``InferenceSession.run`` is thread-safe, so one session serves every caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.runtime.base import Runner
from engines.runtime.generate import Generator, Sampling
from foundation.decoder import LOGIT_POSITIONS, every_logit_position
from foundation.errors import BundleError, UsageError
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
        self._generator: Generator | None = None
        self._every_position = LOGIT_POSITIONS in {i.name for i in self.session.get_inputs()}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._every_position:  # a decoder graph that computes logits where asked: every position, as exported
            feeds = every_logit_position(feeds)
        return dict(zip(self._names, self.session.run(self._names, feeds)))

    def generator(self, max_length: int | None = None) -> Generator:
        """Text generation on this session, for a decoder bundle (``engines.runtime.generate``). The same
        generator, with its cache buffers, serves every later call (one generation at a time); ``max_length``
        (default: the bundle's) sizes the cache."""
        decoder = self.manifest.decoder if self.manifest is not None else None
        if decoder is None:
            raise UsageError(f"{self.bundle_path or 'this bundle'} is not a decoder bundle: generation needs one "
                             "built from a Hugging Face *ForCausalLM directory or a .gguf file")
        if self._generator is None or (max_length and max_length != self._generator.max_length):
            self._generator = Generator(self.session, decoder, max_length)
        return self._generator

    def generate(self, prompts, max_new_tokens: int = 64, sampling: Sampling | None = None,
                 stop=()) -> list[list[int]]:
        """The new token ids for each prompt (lists of token ids); see ``Generator.generate``."""
        return self.generator().generate(prompts, max_new_tokens, sampling, stop)

    def stream(self, prompts, max_new_tokens: int = 64, sampling: Sampling | None = None, stop=()):
        """Each step's tokens as they are chosen; see ``Generator.stream``."""
        return self.generator().stream(prompts, max_new_tokens, sampling, stop)

    def close(self) -> None:
        super().close()
        self.session = self._generator = None
