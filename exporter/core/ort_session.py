"""One way to open an ONNX Runtime session, for the runtime, the passes, parity and the benchmarks.

``optimize``: ONNX Runtime's graph optimizations on (``ORT_ENABLE_ALL``, as a bundle runs) or off
(the graph runs as written: what pass verification and the float emulation of Q/DQ need).
``threads``: intra-op threads (0 or None: ONNX Runtime's default, every core). Warnings off.
NumPy-free; imports only onnxruntime, which every user of this module already needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: errors reach the caller as the exception's text, once, uncoloured
    return options


def create_session(source: bytes | str | Path, threads: int | None = None, optimize: bool = True,
                   providers=("CPUExecutionProvider",)) -> ort.InferenceSession:
    """A session on a serialized model or a path."""
    model = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(model, session_options(threads, optimize), providers=list(providers))


def time_runs(sess: ort.InferenceSession, feeds: dict, warmup: int, runs: int) -> list[float]:
    """Milliseconds of ``runs`` timed ``sess.run`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return times
