"""One interface for every backend: ``Runner`` checks feeds against the input spec and the
optimization profiles once, keeps thread-safe statistics (calls, errors, fallbacks, a latency
histogram) and Prometheus metrics when prometheus-client is installed; a backend implements only
``_run``. ``infer`` may be called from many threads; counters are updated under a lock.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Mapping

import numpy as np

from engines.bundle import Manifest
from engines.profiles import Profile, select
from foundation.errors import InferenceError, RuntimeInputError, UsageError, plain
from foundation.spec import InputSpec, OutputSpec

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class _Meta:
    """Shape and dtype of a torch tensor, for the input check without copying it."""

    def __init__(self, tensor):
        self.shape = tuple(tensor.shape)
        self.dtype = str(tensor.dtype).removeprefix("torch.")


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


class Stats:
    """Calls, errors, fallbacks and a latency histogram (milliseconds), thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = self.errors = self.fallbacks = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.total_ms = 0.0

    def record(self, ms: float, error: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.errors += error
            self.total_ms += ms
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def add_fallback(self) -> None:
        with self._lock:
            self.fallbacks += 1

    def snapshot(self) -> dict:
        with self._lock:
            edges = [*map(str, LATENCY_BUCKETS_MS), "inf"]
            return {"calls": self.calls, "errors": self.errors, "fallbacks": self.fallbacks,
                    "latency_ms": {"sum": self.total_ms, "buckets": dict(zip(edges, self.buckets))}}


class Runner:
    """One interface for every backend: ``infer``, ``input_specs``, ``output_specs``, context manager.

    Feeds are checked here, once, before a backend sees them; subclasses implement ``_run``.
    """

    backend = "base"
    takes_device_tensors = False  # TensorRT keeps CUDA tensors on the device

    def __init__(self, input_spec: InputSpec, outputs: list[OutputSpec], manifest: Manifest | None = None):
        self.input_spec = input_spec
        self.output_specs = outputs
        self.manifest = manifest
        self._profiles: list[Profile] = list(manifest.profiles) if manifest else []
        self._stats = Stats()
        self._fallback_factory = None
        self._fallback: Runner | None = None
        self._metrics_created = False
        self._metrics = None

    @property
    def input_specs(self) -> InputSpec:
        return self.input_spec

    @property
    def profiles(self) -> list[dict]:
        return [p.to_json() for p in self._profiles]

    def stats(self) -> dict:
        return dict(self._stats.snapshot(), backend=self.backend)

    bundle_path = None  # the bundle it was loaded from (set by engines.runtime.load)
    check_values = True  # integer inputs are checked against the spec's value range (runtime.load(check_values=))

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise UsageError(f"this {self.backend} runner is closed (close() was called or its with-block ended); "
                             "load the bundle again")
        if not isinstance(feeds, Mapping):
            if len(self.input_spec) == 1 and (isinstance(feeds, np.ndarray) or _is_torch(feeds)):
                feeds = {self.input_spec.names[0]: feeds}  # one input: an array alone is enough
            else:
                raise RuntimeInputError(f"infer() takes a dict of input name -> array (inputs: "
                                        f"{', '.join(self.input_spec.names)}), found {type(feeds).__name__}")
        arrays = {name: self._prepare(name, value) for name, value in feeds.items()}
        self.input_spec.check_feeds({k: _Meta(v) if _is_torch(v) else v for k, v in arrays.items()},
                                    values=self.check_values)
        if self._profiles:
            shapes = {k: tuple(v.shape) for k, v in arrays.items()}
            if select(self._profiles, shapes) is None:
                ranges = "; ".join(f"{p.name}: {dict((k, [list(p.min[k]), list(p.max[k])]) for k in p.min)}"
                                   for p in self._profiles)
                raise RuntimeInputError(
                    f"no optimization profile accepts shapes { {k: list(v) for k, v in shapes.items()} }; "
                    f"the bundle's profiles are {ranges}"
                )
        start = time.perf_counter()
        try:
            outputs = self._run(arrays)
        except Exception as exc:  # noqa: BLE001 - a backend can fail in its own ways
            self._observe(start, error=True)
            return self._on_failure(feeds, exc)
        self._observe(start)
        return outputs

    def _observe(self, start: float, error: bool = False) -> None:
        ms = (time.perf_counter() - start) * 1000
        self._stats.record(ms, error)
        if not self._metrics_created:  # created at first use: subclasses set their backend label first
            self._metrics, self._metrics_created = _prometheus(self), True
        if self._metrics is not None:
            self._metrics.observe(ms, error)

    def _on_failure(self, feeds, exc: Exception):
        reason = f"{type(exc).__name__}: {plain(str(exc)).splitlines()[0][:300] if str(exc) else ''}"
        if self._fallback_factory is None:
            raise InferenceError(f"{self.backend} failed to run: {reason}; load with fallback_on_error=True "
                                 "to retry such calls on the next backend") from exc
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        logger.warning("%s failed (%s); retrying on %s", self.backend, reason, self._fallback.backend)
        self._stats.add_fallback()
        if self._metrics is not None:
            self._metrics.fallback()
        return self._fallback.infer(feeds)

    def _prepare(self, name: str, value):
        if _is_torch(value):
            if self.takes_device_tensors:
                return value
            value = value.detach().cpu().numpy()  # torch itself is never imported here
        if not isinstance(value, np.ndarray):
            raise RuntimeInputError(
                f"input {name!r}: expected a NumPy array (or a torch tensor), found {type(value).__name__}"
            )
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)  # (that makes 0-d arrays 1-d)

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    _closed = False

    def close(self) -> None:
        """Release the backend's resources."""
        self._closed = True
        if self._fallback is not None:
            self._fallback.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} inputs={self.input_spec}>"


def _prometheus(runner: Runner):
    """Prometheus metrics when prometheus-client is installed (None otherwise)."""
    try:  # prometheus-client is optional: imported at first use, absent -> no metrics
        from engines.runtime.prometheus import RunnerMetrics  # noqa: PLC0415 - prometheus-client is optional
    except ImportError:
        return None
    return RunnerMetrics.create(runner)
