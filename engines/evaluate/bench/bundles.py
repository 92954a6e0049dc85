"""``planforge bench BUNDLE...``: one model's backends side by side, per batch size.

Backends, all on the same inputs and thread count: PyTorch eager (the model the bundles were
built from), ONNX Runtime on the exported graph with its own graph optimizations, each bundle on
each planforge runtime backend that can run here, and for INT8 bundles of zoo models the peer,
ONNX Runtime's ``quantize_static`` (QDQ, per-channel S8 weights, U8 activations: its fastest
CPU form) on the exported graph with the zoo's calibration batches.

Per backend and batch size: ``warmup`` untimed runs, then ``iterations`` timed runs; latency
p50/p90/p99 and mean (ms), throughput (samples/s from the mean), the speedup of p50 against
PyTorch eager (the headline: absolute times vary between machines), load time and peak memory
(the resident memory a backend adds while it loads and runs, from Linux's VmHWM, which is reset
before each backend; GPU memory is not counted), and each artifact's build time from its
manifest. Results: ``bench.json`` and ``bench.png`` (``engines.evaluate.bench.report``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engines.bundle import Manifest, read_manifest, verified_path
from engines.evaluate.bench.environment import LoadWatch
from engines.runtime import ORDER, Batching, BundleView, load as load_bundle, schedule, unavailable
from foundation.errors import UsageError
from foundation.ort_session import create_session
from foundation.spec import InputSpec, random_array

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    bundles: tuple[Path, ...]
    batches: tuple[int, ...] = ()  # default: the batch dim's min, opt and max
    warmup: int = 3
    iterations: int = 20
    threads: int = 0  # 0: every core
    peer: bool = True
    out: Path | None = None  # directory for bench.json and bench.png
    cache_dir: Path = Path("build/.cache")


@dataclasses.dataclass
class Backend:
    """One thing to time: how to load it, what it is, what building it cost."""

    name: str
    precision: str
    build_seconds: float | None
    load: Callable[[], Callable[[dict], object]]  # returns run(feeds)
    close: Callable[[], None] = lambda: None


@dataclasses.dataclass
class Point:
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # samples/s
    speedup: float | None = None  # PyTorch eager p50 / this p50


@dataclasses.dataclass
class BackendResult:
    name: str
    precision: str
    build_seconds: float | None
    load_seconds: float
    peak_memory_mib: float | None
    points: list[Point]


def bench(request: BenchRequest, on_step: Callable[[str], None] = lambda s: None,
          on_total: Callable[[int], None] = lambda n: None) -> dict:
    """Time every backend at every batch size; return the ``bench.json`` document."""
    bundles = [Path(b) for b in request.bundles]
    manifests = [read_manifest(b) for b in bundles]
    _check_same_model(bundles, manifests)
    spec = manifests[0].inputs
    batch_dim, batches = _batches(spec, request.batches)
    threads = request.threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    feeds = {b: {t.name: random_array(t, _shape(t, batch_dim, b), rng) for t in spec} for b in batches}
    with tempfile.TemporaryDirectory(prefix="planforge-bench-") as tmp, LoadWatch() as load:
        backends, skipped = _backends(bundles, manifests, threads, request, Path(tmp))
        on_total(len(backends) * len(batches))
        results = [time_backend(b, feeds, request.warmup, request.iterations, on_step) for b in backends]
    eager = next((r for r in results if r.name == "pytorch eager"), None)
    for result in results:
        for point, ref in zip(result.points, eager.points if eager else [None] * len(result.points)):
            point.speedup = ref.p50_ms / point.p50_ms if ref else None
    model = manifests[0].model
    return {"kind": "bench", "schema": 1, "model": model.name, "source": model.source,
            "bundles": [str(b) for b in bundles], "inputs": spec.to_json(), "batch_dim": batch_dim,
            "batches": batches, "threads": threads, "warmup": request.warmup, "iterations": request.iterations,
            "environment": load.environment(), "skipped": skipped,
            "backends": [dataclasses.asdict(r) for r in results]}


def _check_same_model(bundles: list[Path], manifests: list[Manifest]) -> None:
    first = manifests[0]
    for bundle, manifest in zip(bundles[1:], manifests[1:]):
        if (manifest.model.source_sha256, manifest.inputs) != (first.model.source_sha256, first.inputs):
            raise UsageError(f"{bundle} holds another model or input spec than {bundles[0]}; bench one model's "
                             "bundles (e.g. build/resnet18 build/resnet18-int8) per run")


def _batches(spec: InputSpec, asked: tuple[int, ...]) -> tuple[str | None, list[int]]:
    """The first input's leading dim, when symbolic, is the batch; without one there is one point."""
    first = spec.tensors[0].dims[0] if spec.tensors[0].rank else None
    if first is None or not first.is_dynamic:
        if asked:
            raise UsageError(f"--batch: the bundle's inputs have a fixed leading dim ({spec}); drop --batch")
        return None, [first.min if first else 1]
    sizes = sorted(set(asked or (first.min, first.opt, first.max)))
    bad = [b for b in sizes if not first.min <= b <= first.max]
    if bad:
        raise UsageError(f"--batch {', '.join(map(str, bad))}: the bundle's {first.name} dim takes "
                         f"{first.min}..{first.max}")
    return first.name, sizes


def _shape(tensor, batch_dim: str | None, batch: int) -> tuple[int, ...]:
    return tuple(batch if d.name is not None and d.name == batch_dim else d.opt for d in tensor.dims)


def _backends(bundles: list[Path], manifests: list[Manifest], threads: int, request: BenchRequest,
              tmp: Path) -> tuple[list[Backend], dict[str, str]]:

    backends, skipped = [], {}
    module = source_module(manifests[0], request.cache_dir, skipped, bundles[0])
    if module is not None:
        backends.append(torch_backend(module, manifests[0].inputs, threads))
    exported = verified_path(bundles[0], manifests[0], "model.onnx")
    backends.append(ort_backend("onnxruntime exported", "fp32", exported, threads,
                                 manifests[0].export.seconds))
    for bundle, manifest in zip(bundles, manifests):
        loaded = BundleView(bundle)
        for backend in ORDER:
            name = f"planforge {manifest.precision} {backend}"
            if (reason := unavailable(backend, loaded)) is not None:
                skipped[name] = reason
                continue
            target = "trt" if backend == "trt" else "ort"
            backends.append(runtime_backend(name, manifest.backends.for_target(target).precision, bundle, backend,
                                             threads, manifest.build_seconds.get("total")))
    if request.peer and "input_ids" in manifests[0].inputs.names:
        optimized = transformers_optimizer_backend(exported, threads, tmp, skipped)
        if optimized is not None:
            backends.append(optimized)
    int8 = next((m for m in manifests if m.precision == "int8"), None)
    if request.peer and int8 is not None:
        peer = _peer_backend(exported, manifests[0], module, threads, tmp, skipped)
        if peer is not None:
            backends.append(peer)
    return backends, skipped


def source_module(manifest: Manifest, cache_dir: Path, skipped: dict, bundle: Path):
    model = manifest.model
    if model.kind == "onnx":
        skipped["pytorch eager"] = "the bundles were built from an ONNX file"
        return None
    from exporter.resolve import resolve_bundle_model  # noqa: PLC0415 - imports torch

    resolved = resolve_bundle_model(model.source, model.source_sha256, cache_dir, "rebuild the bundles", bundle,
                                    model.relative)
    return resolved.module


def torch_backend(module, spec: InputSpec, threads: int) -> Backend:
    import torch  # noqa: PLC0415 - imports torch

    state = {}

    def load():
        state["old"] = torch.get_num_threads()
        torch.set_num_threads(threads)
        state["module"] = copy.deepcopy(module).eval()  # its weights count towards this backend's memory

        def run(feeds):
            with torch.inference_mode():
                return state["module"](*[torch.from_numpy(feeds[n]) for n in spec.names])
        return run

    def close():
        torch.set_num_threads(state.pop("old"))
        state.clear()

    return Backend("pytorch eager", "fp32", None, load, close)


def ort_backend(name: str, precision: str, graph: Path, threads: int, build_seconds: float | None) -> Backend:
    """A baseline: the graph under ONNX Runtime with its own default session options."""
    def load():
        sess = create_session(graph, threads, optimize=True, tuned=False)
        return lambda feeds: sess.run(None, feeds)

    return Backend(name, precision, build_seconds, load)


def runtime_backend(name: str, precision: str, bundle: Path, backend: str, threads: int,
                    build_seconds: float | None, batching: Batching | None = None) -> Backend:
    """The bundle as ``engines.runtime.load`` runs it, or ``schedule`` with ``batching``."""
    state = {}

    def load():
        state["engine"] = load_bundle(bundle, backend=backend, threads=threads) if batching is None else \
            schedule(bundle, batching, backend=backend, threads=threads)
        return state["engine"].infer

    def close():
        state.pop("engine").close()

    return Backend(name, precision, build_seconds, load, close)


def transformers_optimizer_backend(exported: Path, threads: int, tmp: Path, skipped: dict) -> Backend | None:
    """The anchor for transformers: ONNX Runtime's own ``onnxruntime.transformers.optimizer`` (model_type
    bert, heads and hidden size detected) on the exported graph, run with ORT's optimizations on."""
    name = "onnxruntime transformers optimizer (bert)"
    try:
        from onnxruntime.transformers.optimizer import optimize_model  # noqa: PLC0415 - slow to import

        start = time.perf_counter()
        optimized = optimize_model(str(exported), model_type="bert", num_heads=0, hidden_size=0)
        optimized.save_model_to_file(str(tmp / "ort-transformers.onnx"))
        seconds = round(time.perf_counter() - start, 3)
    except Exception as exc:  # noqa: BLE001 - the peer's own failures are reported, not fatal
        skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    logger.info("%s: fused %s", name, fused or "nothing")
    return ort_backend(name, "fp32", tmp / "ort-transformers.onnx", threads, seconds)


def _peer_backend(exported: Path, manifest: Manifest, module, threads: int, tmp: Path, skipped: dict) -> Backend | None:
    from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

    name = "onnxruntime quantize_static int8"
    entry = BY_NAME.get(manifest.model.name) if manifest.model.kind == "zoo" else None
    if entry is None or not entry.calibration or module is None:
        skipped[name] = "the peer needs the zoo's calibration batches; this model has none"
        return None
    from onnxruntime.quantization import QuantType  # noqa: PLC0415 - ONNX Runtime's quantization tools load slowly

    from engines.evaluate.bench.int8 import quantize_peer  # noqa: PLC0415 - imports onnxruntime.quantization

    calibration, _ = entry.calibration_data(module)
    start = time.perf_counter()
    quantize_peer(exported, tmp / "peer.onnx", calibration, QuantType.QUInt8)
    return ort_backend(name, "int8", tmp / "peer.onnx", threads, round(time.perf_counter() - start, 3))


def time_backend(backend: Backend, feeds: dict[int, dict], warmup: int, iterations: int,
                  on_step: Callable[[str], None]) -> BackendResult:
    baseline = _reset_peak_memory()
    start = time.perf_counter()
    run = backend.load()
    load_seconds = time.perf_counter() - start
    points = []
    try:
        for batch, batch_feeds in feeds.items():
            on_step(f"{backend.name} batch {batch}")
            for _ in range(warmup):
                run(batch_feeds)
            times = []
            for _ in range(iterations):
                t0 = time.perf_counter()
                run(batch_feeds)
                times.append((time.perf_counter() - t0) * 1000)
            p50, p90, p99 = (float(np.percentile(times, q)) for q in (50, 90, 99))
            mean = statistics.fmean(times)
            points.append(Point(batch, p50, p90, p99, mean, batch * 1000 / mean))
            logger.debug("%s batch %d: p50 %.3f ms", backend.name, batch, p50)
        peak = _peak_memory(baseline)
    finally:
        backend.close()
    return BackendResult(backend.name, backend.precision, backend.build_seconds, round(load_seconds, 4), peak, points)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_memory() -> int | None:
    """Current resident KiB after resetting the peak (Linux: writing 5 to clear_refs resets VmHWM).

    The previous backend's memory is collected and handed back to the OS first (glibc's
    ``malloc_trim``): pages freed but kept by the allocator would otherwise be reused by the next
    backend without raising the resident size, under-counting every backend but the first."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _peak_memory(baseline: int | None) -> float | None:
    peak = _status_kib("VmHWM")
    return None if baseline is None or peak is None else round(max(peak - baseline, 0) / 1024, 1)

