"""``planforge bench-serve BUNDLE``: the serving layer under load, after ``perf_analyzer``.

Clients send batch-1 requests drawn from the bundle's evaluation batches (else golden data; topped
up to ``POOL`` distinct inputs with random ones from the input spec at its opt shape), Zipf-distributed
over the pool so that a realistic share repeats. Closed loop: ``concurrency`` clients each send the
next request when the last returns, for ``duration`` seconds; open loop (``rate``): Poisson arrivals
at that many requests per second, latency counted from the scheduled arrival. Rows:

- ``unbatched``: every client calls the plain runner (ONNX Runtime sessions run concurrently);
- ``batched``: the ``Scheduler`` (``engines.runtime.scheduler``) with its dynamic batcher;
- ``batched+cache``: the same with a response cache;
- ``batched`` over ``http``: the same batcher behind ``planforge serve`` in a subprocess, called over the Open
  Inference Protocol with binary tensors (one keep-alive connection per client, as ``perf_analyzer``);
- ``ceiling``: one caller running the same request mix in the largest batches the bundle takes, grouped
  and padded as the batcher would, directly (no queue, no threads): what batching can reach. It is
  measured beside every concurrency level (its ``concurrency`` says which), since a shared machine's
  speed drifts over a run; the targets compare rows of the same level.

Per row: throughput, p50/p90/p99 latency, the mean batch the server ran, requests refused. The
machine (CPU model, ISA class, threads, load average) is recorded with the results (JSON and a plot).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np

from engines.bundle import read_manifest
from engines.evaluate.bench.environment import LoadWatch
from engines.evaluate.bench.remote import KserveClient, start_planforge, stop
from engines.evaluate.bench.report import write_results
from engines.evaluate.compare.data import load_data
from engines.runtime import Batching, load, schedule
from foundation.errors import Overloaded, UsageError

logger = logging.getLogger(__name__)

POOL = 256
MODES = ("unbatched", "batched", "batched+cache")


@dataclasses.dataclass(frozen=True)
class ServeBenchRequest:
    bundle: Path
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    duration: float = 5.0
    rate: float | None = None  # open loop: requests per second
    zipf: float = 1.2
    threads: int | None = None
    max_delay_ms: float = 2.0
    cache_mib: int = 64
    out: Path | None = None
    http: bool = True  # also the batcher over HTTP (planforge serve, /v2)


def pool(bundle: Path, size: int = POOL) -> list[dict]:
    """Distinct batch-1 requests: the bundle's evaluation or golden inputs, topped up with random ones."""
    manifest = read_manifest(bundle)
    source = "eval" if "evaluation.npz" in manifest.artifacts else "golden"
    feeds = load_data(source, bundle, manifest, manifest.inputs).feeds
    samples = [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(next(iter(f.values())).shape[0])]
    seed = 0
    while len(samples) < size:
        samples.append({k: v[:1] for k, v in manifest.inputs.random_feeds("opt", seed=seed).items()})
        seed += 1
    np.random.default_rng(0).shuffle(samples)  # Zipf's popular head is not the golden data's first shape point
    return samples


def zipf_indices(n: int, count: int, a: float, seed: int) -> np.ndarray:
    """``count`` draws over ``n`` items, item k with probability proportional to 1 / (k+1)^a."""
    weights = 1.0 / np.arange(1, n + 1) ** a
    return np.random.default_rng(seed).choice(n, size=count, p=weights / weights.sum())


def bench_serve(request: ServeBenchRequest, on_step=lambda s: None) -> dict:
    bundle = Path(request.bundle)
    requests = pool(bundle)
    rows = []
    with LoadWatch() as watch:
        plain = load(bundle, threads=request.threads)
        options = Batching(max_delay_ms=request.max_delay_ms)
        targets_ = {"unbatched": plain}
        server = None
        try:
            targets_["batched"] = schedule(bundle, threads=request.threads, batching=options)
            if request.http:
                threads = ["--threads", str(request.threads)] if request.threads else []
                server, port = start_planforge([f"bench={bundle}"], "--max-delay-ms", str(request.max_delay_ms),
                                               *threads)
                remote = KserveClient(port, "bench")
            for c in request.concurrency:  # modes interleaved per level: drift in the machine hits them alike
                for mode in MODES:
                    on_step(f"{mode} x{c}")
                    if mode == "batched+cache":  # a cold cache per level: hits are earned in the row itself
                        with schedule(bundle, threads=request.threads, batching=options,
                                  cache_bytes=request.cache_mib * 2 ** 20) as cached:
                            rows.append(_run(mode, cached, requests, c, request))
                    else:
                        rows.append(_run(mode, targets_[mode], requests, c, request))
                if server is not None:
                    on_step(f"batched over http x{c}")
                    rows.append(_run("batched", remote, requests, c, request, transport="http"))
                on_step(f"ceiling beside x{c}")  # measured per level too: this machine's speed drifts
                rows.append(dict(_ceiling(plain, requests, request), concurrency=c))
        finally:
            for target in targets_.values():
                target.close()
            if server is not None:
                stop(server)
        rows.sort(key=lambda r: ((MODES + ("ceiling",)).index(r["mode"]), r["transport"] == "http"))
    manifest = read_manifest(bundle)
    doc = {"model": manifest.model.name, "bundle": str(bundle), "precision": manifest.precision,
           "backend": plain.backend, "threads": request.threads or watch.cpu.cores, "duration_s": request.duration,
           "open_loop_rate": request.rate, "zipf": request.zipf, "max_delay_ms": request.max_delay_ms,
           "pool": len(requests), "rows": rows, "environment": watch.environment(), "targets": targets(rows)}
    if request.out is not None:
        write(doc, Path(request.out))
    return doc


def _run(mode: str, target, requests: list[dict], concurrency: int, request: ServeBenchRequest,
         transport: str = "in-process") -> dict:
    latencies, rejected, lock = [], [0], threading.Lock()
    before = target.stats() if mode != "unbatched" and transport == "in-process" else None
    stop = time.perf_counter() + request.duration
    if request.rate:
        done = _open_loop(target, requests, concurrency, request, latencies, rejected, lock, stop)
    else:
        def client(k: int):
            order = zipf_indices(len(requests), 100_000, request.zipf, seed=k)
            i = 0
            while time.perf_counter() < stop:
                _send(target, requests[order[i % len(order)]], time.perf_counter(), latencies, rejected, lock)
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
        began = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        done = time.perf_counter() - began
    row = {"mode": mode, "transport": transport, "concurrency": concurrency, **_summary(latencies, done),
           "rejected": rejected[0], "mean_batch": 1.0 if transport == "in-process" else None}
    if before is not None:
        after = target.stats()
        sizes = {k: after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k, 0) for k in after["batch_sizes"]}
        runs = sum(sizes.values())
        row["mean_batch"] = round(sum(k * v for k, v in sizes.items()) / runs, 2) if runs else 0.0
        if after.get("cache"):
            row["cache_hit_ratio"] = round(after["cache"]["hit_ratio"], 3)
    logger.debug("%s (%s) x%d: %.1f/s p50 %s p99 %s ms", mode, transport, concurrency, row["throughput_per_s"],
                 row["p50_ms"], row["p99_ms"])
    return row


def _send(target, feeds, since: float, latencies: list, rejected: list, lock) -> None:
    """One request: its latency from ``since`` (the send, or the scheduled arrival), or one more refusal."""
    try:
        target.infer(feeds)
    except Overloaded:
        with lock:
            rejected[0] += 1
        return
    with lock:
        latencies.append((time.perf_counter() - since) * 1000)


def _open_loop(target, requests, concurrency, request, latencies, rejected, lock, stop) -> float:
    rng = np.random.default_rng(0)
    order = zipf_indices(len(requests), 1_000_000, request.zipf, seed=0)

    def send(i: int, due: float):
        _send(target, requests[order[i % len(order)]], due, latencies, rejected, lock)

    began = time.perf_counter()
    due, i = began, 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(concurrency, 4)) as pool_:
        while due < stop:
            time.sleep(max(0.0, due - time.perf_counter()))
            pool_.submit(send, i, due)
            due += rng.exponential(1.0 / request.rate)
            i += 1
    return time.perf_counter() - began


def _ceiling(runner, requests: list[dict], request: ServeBenchRequest) -> dict:
    """One caller running the same request mix directly in the largest batches the bundle takes: the
    requests of the clients' Zipf stream grouped as the batcher groups them (same key, padded), no queue."""
    from engines.runtime.batching import layout  # noqa: PLC0415
    from engines.runtime.scheduler import profile_batch  # noqa: PLC0415

    plan = layout(runner.input_spec, runner.output_specs, Batching(), profile_batch(runner.manifest.profiles))
    order = zipf_indices(len(requests), 100_000, request.zipf, seed=0)
    groups: dict[tuple, list[dict]] = {}
    batches = []
    for i in order:
        r = requests[i]
        group = groups.setdefault(plan.key(r), [])
        group.append(r)
        if sum(next(iter(x.values())).shape[0] for x in group) >= plan.max_batch:
            batches.append((plan.merge(group), len(group)))
            groups[plan.key(r)] = []
        if len(batches) >= 64:
            break
    batches += [(plan.merge(g), len(g)) for g in groups.values() if g]  # groups the draws never filled
    latencies, samples, stop, k = [], 0, time.perf_counter() + request.duration, 0
    began = time.perf_counter()
    while time.perf_counter() < stop:
        feeds, n = batches[k % len(batches)]
        start = time.perf_counter()
        runner.infer(feeds)
        latencies.append((time.perf_counter() - start) * 1000)
        samples, k = samples + n, k + 1
    done = time.perf_counter() - began
    summary = _summary(latencies, done)
    summary["throughput_per_s"] = round(samples / done, 1)
    return {"mode": "ceiling", "transport": "in-process", "concurrency": 1, **summary, "rejected": 0,
            "mean_batch": float(plan.max_batch)}


def _summary(latencies: list[float], seconds: float) -> dict:
    if not latencies:
        return {"requests": 0, "throughput_per_s": 0.0, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return {"requests": len(latencies), "throughput_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(p50), 3), "p90_ms": round(float(p90), 3), "p99_ms": round(float(p99), 3)}


def targets(rows: list[dict]) -> dict:
    """The issue's targets, computed on this run: batched throughput at concurrency 16 against the ceiling
    and unbatched; p99 at concurrency 1 batched against unbatched; batched over HTTP against in-process."""
    def row(mode, c, transport="in-process"):
        return next((r for r in rows if r["mode"] == mode and r["concurrency"] == c
                     and r.get("transport", "in-process") == transport), None)

    out = {}
    ceiling, b16, u16 = row("ceiling", 16), row("batched", 16), row("unbatched", 16)
    if ceiling and b16 and u16:
        out["batched_x16_of_ceiling"] = round(b16["throughput_per_s"] / ceiling["throughput_per_s"], 3)
        out["batched_x16_over_unbatched"] = round(b16["throughput_per_s"] / u16["throughput_per_s"], 3)
    h16 = row("batched", 16, "http")
    if h16 and b16 and b16["throughput_per_s"]:
        out["http_x16_of_in_process_batched"] = round(h16["throughput_per_s"] / b16["throughput_per_s"], 3)
    b1, u1 = row("batched", 1), row("unbatched", 1)
    if b1 and u1 and b1["p99_ms"] and u1["p99_ms"]:
        out["batched_x1_p99_vs_unbatched"] = round(b1["p99_ms"] / u1["p99_ms"], 3)
    return out


def write(doc: dict, out: Path) -> tuple[Path, Path]:
    return write_results(doc, out, "bench-serve", _plot)


def _plot(doc: dict, target) -> None:
    import matplotlib  # noqa: PLC0415 - heavy; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, transport in [(m, "in-process") for m in MODES] + [("batched", "http")]:
        rows = [r for r in doc["rows"] if r["mode"] == mode and r.get("transport", "in-process") == transport]
        label = mode if transport == "in-process" else f"{mode} over {transport}"
        if rows:
            thr.plot([r["concurrency"] for r in rows], [r["throughput_per_s"] for r in rows], marker="o", label=label)
            lat.plot([r["concurrency"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=label)
    ceiling = [r for r in doc["rows"] if r["mode"] == "ceiling"]
    if ceiling:
        thr.plot([r["concurrency"] for r in ceiling], [r["throughput_per_s"] for r in ceiling], linestyle="--",
                 color="gray", label="ceiling (largest batches, one caller)")
    env = doc["environment"]
    thr.set(title=f"{doc['model']} ({doc['precision']}, {doc['backend']}): {env.get('cpu_model')} "
                  f"({env.get('cpu_isa')}), {doc['threads']} thread(s)", xlabel="concurrency", ylabel="requests/s",
            xscale="log")
    lat.set(title="p99 latency", xlabel="concurrency", ylabel="ms", xscale="log", yscale="log")
    for ax in (thr, lat):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=100)
    plt.close(fig)


def check_request(request: ServeBenchRequest) -> None:
    if not request.concurrency or min(request.concurrency) < 1:
        raise UsageError(f"--concurrency {request.concurrency}: expected positive integers, e.g. 1,4,16,64")
    if request.duration <= 0 or (request.rate is not None and request.rate <= 0):
        raise UsageError("--duration and --rate must be positive")
