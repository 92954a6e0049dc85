"""``/metrics`` for Prometheus: what each served model's runtime counts, read from its ``stats()`` at scrape
time by a custom collector (the runtime keeps its counters without prometheus-client), plus the process's
default registry (the runtime's own families, process and Python metrics).

Decoders (labelled ``model``): ``planforge_time_to_first_token_seconds`` and
``planforge_time_per_output_token_seconds`` histograms, ``planforge_generation_tokens_total``,
``planforge_prompt_tokens_total``, ``planforge_tokens_per_second`` (over the last 10 s),
``planforge_queue_length``, ``planforge_kv_slots`` and ``planforge_kv_slots_in_use``,
``planforge_prefix_cache_lookups_total``, ``planforge_prefix_cache_hits_total`` and
``planforge_prefix_cache_hit_tokens_total``, ``planforge_requests_total``, ``planforge_requests_rejected_total``,
``planforge_requests_deadline_exceeded_total``, ``planforge_requests_cancelled_total``. Other models: the
queue length, requests, rejected and deadline-exceeded counts and ``planforge_batches_total`` of their
dynamic batcher."""

from __future__ import annotations

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from engines.serve.models import Served


class _Collector:
    def __init__(self, models: dict[str, Served]):
        self.models = models

    def collect(self):
        families = {
            "queue": GaugeMetricFamily("planforge_queue_length", "requests waiting", labels=["model"]),
            "requests": CounterMetricFamily("planforge_requests", "requests received", labels=["model"]),
            "rejected": CounterMetricFamily("planforge_requests_rejected", "requests refused: queue full (429)",
                                            labels=["model"]),
            "deadline": CounterMetricFamily("planforge_requests_deadline_exceeded", "requests past their deadline "
                                            "(504)", labels=["model"]),
            "cancelled": CounterMetricFamily("planforge_requests_cancelled", "generations cancelled (a client "
                                             "went away)", labels=["model"]),
            "batches": CounterMetricFamily("planforge_batches", "batches run by the dynamic batcher",
                                           labels=["model"]),
            "generated": CounterMetricFamily("planforge_generation_tokens", "tokens generated", labels=["model"]),
            "prompt": CounterMetricFamily("planforge_prompt_tokens", "prompt tokens prefilled", labels=["model"]),
            "rate": GaugeMetricFamily("planforge_tokens_per_second", "tokens generated per second, last 10 s",
                                      labels=["model"]),
            "slots": GaugeMetricFamily("planforge_kv_slots", "KV cache slots", labels=["model"]),
            "used": GaugeMetricFamily("planforge_kv_slots_in_use", "KV cache slots in use", labels=["model"]),
            "lookups": CounterMetricFamily("planforge_prefix_cache_lookups", "prefix cache lookups",
                                           labels=["model"]),
            "hits": CounterMetricFamily("planforge_prefix_cache_hits", "prefix cache lookups that found blocks",
                                        labels=["model"]),
            "hit_tokens": CounterMetricFamily("planforge_prefix_cache_hit_tokens", "prompt tokens taken from the "
                                              "prefix cache", labels=["model"]),
            "ttft": HistogramMetricFamily("planforge_time_to_first_token_seconds", "time to first token",
                                          labels=["model"]),
            "tpot": HistogramMetricFamily("planforge_time_per_output_token_seconds", "time between output tokens",
                                          labels=["model"]),
        }
        for name, served in self.models.items():
            labels = [name]
            if served.decoder:
                s = served.generation.stats()
                for key, field in (("queue", "queue_depth"), ("requests", "requests"), ("rejected", "rejected"),
                                   ("deadline", "deadline_exceeded"), ("cancelled", "cancelled"),
                                   ("generated", "generated_tokens"), ("prompt", "prompt_tokens"),
                                   ("rate", "tokens_per_s"), ("slots", "slots"), ("used", "slots_in_use")):
                    families[key].add_metric(labels, s[field])
                prefix = s["prefix_cache"] or {"lookups": 0, "hits": 0, "hit_tokens": 0}
                for key in ("lookups", "hits", "hit_tokens"):
                    families[key].add_metric(labels, prefix[key])
                for key, field in (("ttft", "ttft_ms"), ("tpot", "tpot_ms")):
                    families[key].add_metric(labels, _buckets(s[field]["buckets"]), s[field]["sum"] / 1000)
            else:
                s = served.scheduler.stats()
                for key, field in (("queue", "queue_depth"), ("requests", "requests"), ("rejected", "rejected"),
                                   ("deadline", "deadline_exceeded"), ("batches", "batches")):
                    families[key].add_metric(labels, s[field])
        yield from families.values()


def _buckets(counts: dict[str, int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (upper bounds in seconds) from per-bucket counts keyed by ms edges."""
    out, total = [], 0
    for edge, count in counts.items():
        total += count
        out.append(("+Inf" if edge == "inf" else str(float(edge) / 1000), total))
    return out


def registry(models: dict[str, Served]) -> prometheus_client.CollectorRegistry:
    reg = prometheus_client.CollectorRegistry(auto_describe=False)
    reg.register(_Collector(models))
    return reg


def exposition(reg: prometheus_client.CollectorRegistry) -> bytes:
    return prometheus_client.generate_latest(reg) + prometheus_client.generate_latest(prometheus_client.REGISTRY)
