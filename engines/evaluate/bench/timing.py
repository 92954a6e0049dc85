"""Timing an ONNX Runtime graph the same way everywhere in the benchmarks: graph optimizations on,
``threads`` intra-op threads, warm-up runs, then timed runs in milliseconds. ``ROUNDS`` interleaved
rounds let drift in the machine's load hit every variant alike."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from exporter.core.ort_session import create_session

ROUNDS = 5  # alternating rounds of timed runs per graph


def time_session(path: Path, feeds: dict[str, np.ndarray], threads: int, warmup: int, runs: int) -> list[float]:
    sess = create_session(path, threads, optimize=True)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return times
