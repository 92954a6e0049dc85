"""Text generation over a decoder graph: the loop (``loop``), the cache fed back step by step through
ONNX Runtime's I/O binding, and sampling (``sampling``). NumPy and ONNX Runtime only, as production
imports it."""

from engines.runtime.generate.loop import GenerationError, Generator
from engines.runtime.generate.sampling import Sampling

__all__ = ["GenerationError", "Generator", "Sampling"]
