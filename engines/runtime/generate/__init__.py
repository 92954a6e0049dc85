"""Text generation over a decoder graph: the loop (``loop``), the cache fed back step by step through
ONNX Runtime's I/O binding, sampling (``sampling``), and continuous batching for many callers
(``continuous``, with its prefix cache ``prefix``). NumPy and ONNX Runtime only, as production imports it."""

from engines.runtime.generate.continuous import ContinuousBatching, GenerationServer, GenerationStream
from engines.runtime.generate.loop import GenerationError, Generator
from engines.runtime.generate.prefix import PrefixCache
from engines.runtime.generate.sampling import Sampling

__all__ = ["ContinuousBatching", "GenerationError", "GenerationServer", "GenerationStream", "Generator",
           "PrefixCache", "Sampling"]
