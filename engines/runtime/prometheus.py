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
                fallbacks=prometheus_client.Counter(
                    "planforge_infer_fallbacks", "calls retried on another backend", labels
                ),
                latency=prometheus_client.Histogram(
                    "planforge_infer_latency_seconds",
                    "inference latency",
                    labels,
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                ),
            )
        return _FAMILIES


class RunnerMetrics:
    def __init__(self, bundle: str, backend: str):
        families = _families()
        self.calls, self.errors, self.fallbacks, self.latency = (
            families[k].labels(bundle=bundle, backend=backend) for k in ("calls", "errors", "fallbacks", "latency"))

    @classmethod
    def create(cls, runner) -> RunnerMetrics:
        return cls(runner.manifest.model.name if runner.manifest else "unknown", runner.backend)

    def observe(self, ms: float, error: bool) -> None:
        self.calls.inc()
        self.latency.observe(ms / 1000)
        if error:
            self.errors.inc()

    def fallback(self) -> None:
        self.fallbacks.inc()


_SERVER: dict = {}


def _server_families() -> dict:
    with _LOCK:
        if not _SERVER:
            labels = ("bundle",)
            _SERVER.update(
                depth=prometheus_client.Gauge("planforge_queue_depth", "requests waiting in the serving queue", labels),
                wait=prometheus_client.Histogram("planforge_queue_wait_seconds", "time requests waited in the queue",
                                                 labels, buckets=(.0001, .0005, .001, .002, .005, .01, .025, .05, .1,
                                                                  .25, .5, 1)),
                batch=prometheus_client.Histogram("planforge_batch_size", "requests' samples per executed batch",
                                                  labels, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
                hits=prometheus_client.Counter("planforge_cache_hits", "response cache hits", labels),
                misses=prometheus_client.Counter("planforge_cache_misses", "response cache misses", labels),
                rejected=prometheus_client.Counter("planforge_rejected", "requests refused: queue full", labels),
                degraded=prometheus_client.Counter("planforge_degraded", "requests served by the lighter bundle",
                                                   labels),
            )
        return _SERVER


class ServerMetrics:
    def __init__(self, bundle: str):
        families = _server_families()
        self._f = {k: f.labels(bundle=bundle) for k, f in families.items()}

    @classmethod
    def create(cls, server) -> ServerMetrics:
        return cls(server.manifest.model.name if server.manifest else "unknown")

    def depth(self, n: int) -> None:
        self._f["depth"].set(n)

    def waited(self, seconds: float) -> None:
        self._f["wait"].observe(seconds)

    def batch(self, size: int) -> None:
        self._f["batch"].observe(size)

    def cache(self, hit: bool) -> None:
        self._f["hits" if hit else "misses"].inc()

    def rejected(self) -> None:
        self._f["rejected"].inc()

    def degraded(self) -> None:
        self._f["degraded"].inc()
