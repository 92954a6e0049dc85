"""One way to open an ONNX Runtime session, for the runtime, the passes, parity and the benchmarks.

``optimize``: ONNX Runtime's graph optimizations on (``ORT_ENABLE_ALL``, as a bundle runs) or off
(the graph runs as written: what pass verification and the float emulation of Q/DQ need).
``threads``: intra-op threads (0 or None: ONNX Runtime's default, every core). Warnings off.

On the CPU provider ONNX Runtime's own ``SkipLayerNormFusion`` is switched off: it turns
Add + LayerNormalization into ``com.microsoft.SkipLayerNormalization``, whose CPU kernel measured 4-8x
slower than the two ops it replaces at [8, 128, 384] (0.9-1.8 ms against 0.11-0.22 ms; ONNX Runtime
1.31, AVX-512 VNNI, 2 threads), about 10 % of a MiniLM encoder's time. Other providers keep it.
NumPy-free; imports only onnxruntime, which every user of this module already needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort

CPU_DISABLED = ("SkipLayerNormFusion",)


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: errors reach the caller as the exception's text, once, uncoloured
    return options


def create_session(source: bytes | str | Path, threads: int | None = None, optimize: bool = True,
                   providers=("CPUExecutionProvider",), tuned: bool = True) -> ort.InferenceSession:
    """A session on a serialized model or a path. ``tuned=False``: ONNX Runtime's own defaults (the
    benchmarks' baselines run so, as a user of plain ONNX Runtime would)."""
    model = source if isinstance(source, bytes) else str(source)
    cpu_only = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers)
    disabled = {"disabled_optimizers": list(CPU_DISABLED)} if optimize and cpu_only and tuned else {}
    return ort.InferenceSession(model, session_options(threads, optimize), providers=list(providers), **disabled)


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
