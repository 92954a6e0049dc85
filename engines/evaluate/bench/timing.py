"""Timing an ONNX Runtime graph the same way everywhere in the benchmarks: graph optimizations on,
``threads`` intra-op threads, warm-up runs, then timed runs in milliseconds. ``ROUNDS`` interleaved
rounds let drift in the machine's load hit every variant alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foundation.ort_session import create_session, time_runs

ROUNDS = 5  # alternating rounds of timed runs per graph


def time_session(path: Path, feeds: dict[str, np.ndarray], threads: int, warmup: int, runs: int) -> list[float]:
    return time_runs(create_session(path, threads, optimize=True), feeds, warmup, runs)
