"""Prometheus metrics for loaded engines, when ``prometheus-client`` is installed.

One set of metric families per process (Prometheus refuses duplicates), labelled by bundle and
backend: ``planforge_infer_calls_total``, ``planforge_infer_errors_total``,
``planforge_infer_fallbacks_total`` and the ``planforge_infer_latency_seconds`` histogram.
Expose them with ``prometheus_client.start_http_server`` as usual.
"""

from __future__ import annotations

import threading

import prometheus_client

_LOCK = threading.Lock()
_FAMILIES: dict = {}


def _families() -> dict:
    with _LOCK:
        if not _FAMILIES:
            labels = ("bundle", "backend")
            _FAMILIES.update(
                calls=prometheus_client.Counter("planforge_infer_calls", "inference calls", labels),
                errors=prometheus_client.Counter("planforge_infer_errors", "failed inference calls", labels),
                fallbacks=prometheus_client.Counter("planforge_infer_fallbacks", "calls retried on another backend", labels),
                latency=prometheus_client.Histogram("planforge_infer_latency_seconds", "inference latency", labels,
                                                    buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05,
                                                             .1, .25, .5, 1, 2.5)),
            )
        return _FAMILIES


class RunnerMetrics:
    def __init__(self, bundle: str, backend: str):
        families = _families()
        self.calls, self.errors, self.fallbacks, self.latency = (
            families[k].labels(bundle=bundle, backend=backend) for k in ("calls", "errors", "fallbacks", "latency"))

    @classmethod
    def create(cls, runner) -> "RunnerMetrics":
        return cls(runner.manifest.model.name if runner.manifest else "unknown", runner.backend)

    def observe(self, ms: float, error: bool) -> None:
        self.calls.inc()
        self.latency.observe(ms / 1000)
        if error:
            self.errors.inc()

    def fallback(self) -> None:
        self.fallbacks.inc()
