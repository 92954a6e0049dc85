"""Build targets, the bundle and its manifest, the shared runtime, and the CLI.

Importing ``engines`` imports nothing heavy: production code imports ``engines.runtime``,
which needs only NumPy and ONNX Runtime (plus TensorRT and a CUDA binding when present).
"""

__version__ = "0.1.0"
