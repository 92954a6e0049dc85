"""Where a benchmark ran: the CPU (model, ISA class, cores), versions, and how loaded the machine was.

Timings mean little without it: INT8 speed depends on the CPU's integer dot-product class
(``engines.runtime.cpu``), and a machine busy with other work slows every backend unevenly
(docs/decisions/006-bench-interleaving.md). The 1-minute load average is
read at the start and the end; more runnable threads than cores means the timings competed with
something, and a WARNING says so.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess

import onnxruntime

from engines.runtime.cpu import detect

logger = logging.getLogger(__name__)


def load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class LoadWatch:
    """``with LoadWatch() as watch: ...`` then ``watch.environment()`` for the results file."""

    def __init__(self):
        self.cpu = detect()
        self.start: float | None = None
        self.end: float | None = None

    def __enter__(self) -> LoadWatch:
        self.start = load_1min()
        self._warn("before the benchmark", self.start)
        return self

    def __exit__(self, *exc) -> None:
        self.end = load_1min()
        if exc[0] is None:
            self._warn("at the end of the benchmark", self.end)

    @property
    def loaded(self) -> bool:
        return any(v is not None and v > self.cpu.cores for v in (self.start, self.end))

    def _warn(self, when: str, value: float | None) -> None:
        if value is not None and value > self.cpu.cores:
            logger.warning("the 1-minute load average is %.2f %s, more than the %d CPU(s): other work competes with "
                           "the timings; rerun on an idle machine", value, when, self.cpu.cores)

    def environment(self) -> dict:
        return {"machine": platform.machine(), "processor": platform.processor() or None, **self.cpu.to_json(),
                "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                "load_1min": {"start": self.start, "end": self.end}, "loaded": self.loaded}


def worker_failure(done: subprocess.CompletedProcess) -> str:
    """Why a benchmark's worker subprocess failed, in one line: its last line of stderr, or the signal that killed
    it (a peer built for another CPU dies of SIGILL before it prints anything)."""
    lines = (done.stderr or "").strip().splitlines()
    if lines:
        return lines[-1][:300]
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name if -done.returncode in signal.valid_signals() else \
            f"signal {-done.returncode}"
        hint = (f": an instruction this CPU ({detect().isa}) lacks -- rebuild the peer on this machine"
                if name == "SIGILL" else "")
        return f"killed by {name}{hint}"
    return f"exited {done.returncode} with no output"
