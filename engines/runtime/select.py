"""Choosing the backend that runs a bundle here, and why the others cannot.

``backend="auto"`` tries TensorRT (plan present and matching its sha256, tensorrt importable, a GPU,
the manifest's TensorRT version and compute capability equal to this machine's), then ONNX Runtime
CUDA, then ONNX Runtime CPU, logging one WARNING per skipped backend with the reason; an explicit
backend that cannot load is a ``BundleError`` with that reason. The CPU fallback never runs an FP16
graph. ``fallback_on_error=True`` retries a failed call on the next backend that loads.

Public for the rooms below (compare, bench): ``ORDER``, ``BundleView`` (what every backend needs
to know about a bundle, read once) and ``unavailable(backend, bundle)`` (the reason, or None).

Lean by design: NumPy, ONNX Runtime and planforge's standard-library modules only at import
(never torch, onnx, onnx-graphsurgeon or polygraphy); TensorRT and its CUDA binding are imported
by ``engines.runtime.trt_runner`` only when that backend is chosen. Every artifact's sha256 is checked
against the manifest before anything deserializes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from engines.bundle import read_manifest, verified_path
from engines.runtime.base import Runner
from engines.runtime.batching import Batching
from engines.runtime.cache import ResponseCache
from engines.runtime.cpu import detect
from engines.runtime.generate.continuous import ContinuousBatching, GenerationServer
from engines.runtime.ort_runner import OrtRunner
from engines.runtime.scheduler import Scheduler
from engines.runtime.trt_runner import TrtRunner, unavailable as trt_unavailable
from foundation.errors import BundleError, InferenceError, IntegrityError, UsageError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort-cuda", "ort-cpu")
ORDER = ("trt", "ort-cuda", "ort-cpu")


class BundleView:
    """What every backend needs to know about the bundle, read once (the manifest, typed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.spec = self.manifest.inputs
        self.outputs = list(self.manifest.outputs)
        self.backends = self.manifest.backends

    def ort_graph(self) -> Path:
        return verified_path(self.path, self.manifest, self.backends.ort.graph)


def unavailable(backend: str, bundle: BundleView) -> str | None:
    """Why ``backend`` cannot run this bundle here (None when it can)."""
    if backend == "trt":
        return trt_unavailable(bundle.path, bundle.manifest)
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
    if backend == "ort-cpu" and bundle.backends.ort.precision == "fp16":
        return "the bundle's ONNX Runtime graph is FP16, which CPU kernels run slowly or not at all"
    return None


def _construct(backend: str, bundle: BundleView, device: int, threads: int | None, cuda_graphs: bool = False) -> Runner:
    if backend == "trt":
        return TrtRunner(bundle.path, bundle.manifest, bundle.spec, bundle.outputs, device, cuda_graphs)
    providers = (("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider") if backend == "ort-cuda" \
        else ("CPUExecutionProvider",)
    if backend == "ort-cpu":
        _warn_if_validated_elsewhere(bundle)
    return OrtRunner(bundle.ort_graph(), bundle.spec, bundle.outputs, bundle.manifest, providers, threads)


def _warn_if_validated_elsewhere(bundle: BundleView) -> None:
    """ONNX Runtime's integer kernels differ between CPU classes (``engines.runtime.cpu``): an INT8 graph's
    accuracy holds for the class it was measured on."""
    report = bundle.manifest.int8_report("ort")
    if bundle.backends.ort.precision != "int8" or report is None:
        return
    built, here = report.cpu_isa, detect().isa
    if built and built != here:
        form = (report.form or {}).get("form", "?")
        logger.warning("%s: its INT8 ONNX Runtime graph (form %s) was validated on a %s CPU, this CPU is %s: "
                       "its integer kernels may round or saturate differently; run 'planforge compare %s' to "
                       "re-validate it here, or rebuild the bundle on this CPU class", bundle.path, form, built,
                       here, bundle.path)


def load(bundle: str | Path, backend: str = "auto", device: int = 0, threads: int | None = None,
         fallback_on_error: bool = False, cuda_graphs: bool = False, check_values: bool = True,
         batching: Batching | ContinuousBatching | None = None):
    """Load ``bundle`` on the first backend that fits (``auto``) or the one named, as one ``Runner``.

    ``batching``: for many callers. A ``ContinuousBatching`` on a decoder bundle gives a
    ``GenerationServer`` (``engines.runtime.generate.continuous``: continuous batching, a prefix cache); a
    ``Batching`` gives a ``Scheduler`` with its defaults (as ``schedule``).

    ``threads``: ONNX Runtime intra-op threads. ``cuda_graphs``: TensorRT replays CUDA graphs for
    repeated static shapes. ``check_values``: integer inputs are checked against the spec's value range
    on every call (one min and max per integer input; False skips it). For many callers in one
    process (dynamic batching, a response cache, degradation), ``schedule``.
    """
    if isinstance(batching, Batching):
        return schedule(bundle, batching, backend=backend, device=device, threads=threads, check_values=check_values)
    runner = _load(bundle, backend, device, threads, fallback_on_error, cuda_graphs, check_values)
    if batching is None:
        return runner
    try:
        decoder = runner.manifest.decoder if runner.manifest is not None else None
        if decoder is None:
            raise UsageError(f"{bundle}: continuous batching is for decoder bundles; for this model pass "
                             "batching=Batching(...) (the dynamic batcher)")
        if not isinstance(runner, OrtRunner):
            raise UsageError(f"{bundle}: continuous batching runs the ONNX Runtime graph; {runner.backend} was "
                             "chosen: pass backend='ort-cpu' (or 'ort-cuda')")
        return GenerationServer(runner.session, decoder, batching, owned=(runner,), name=Path(bundle).name)
    except BaseException:
        runner.close()
        raise


def schedule(bundle: str | Path, batching: Batching | None = None, cache_bytes: int = 0,
             degrade_to: str | Path | None = None, backend: str = "auto", device: int = 0,
             threads: int | None = None, check_values: bool = True) -> Scheduler:
    """Load ``bundle`` (as ``load`` does) behind an in-process ``Scheduler`` for many callers.

    ``batching`` (a ``Batching``; its defaults when None), ``cache_bytes`` (a response cache of that
    many bytes; off at 0), ``degrade_to`` (a lighter bundle of the same model, e.g. its INT8 build,
    for what the queue or a deadline refuses). The scheduler is thread-safe: ``infer``,
    ``infer_async``, ``stats()``, ``close(drain)``.
    """
    runner = _load(bundle, backend, device, threads, False, False, check_values)
    owned = [runner]
    try:  # whatever fails below, the runners loaded so far are closed
        view = BundleView(runner.bundle_path)
        graph = view.backends.trt.plan if runner.backend == "trt" else view.backends.ort.graph
        cache = ResponseCache(cache_bytes, view.manifest.artifacts[graph].sha256) if cache_bytes else None
        degrade = _load(degrade_to, "auto", device, threads, False, False, check_values) if degrade_to else None
        owned.append(degrade)
        rest = ORDER[ORDER.index(runner.backend) + 1:] if runner.backend in ORDER else ()
        try:
            fallback = _first_available(rest, view, device, threads)
        except InferenceError:  # no other backend loads here: the breaker falls back to the lighter bundle
            fallback = None
        owned.append(fallback)
        return Scheduler(runner, batching or Batching(), cache, degrade, fallback,
                         tuple(r for r in owned if r is not None))
    except BaseException:
        for r in owned:
            if r is not None:
                r.close()
        raise


def _load(bundle: str | Path, backend: str, device: int, threads: int | None, fallback_on_error: bool,
          cuda_graphs: bool, check_values: bool) -> Runner:
    if backend not in BACKENDS:
        raise BundleError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    loaded = BundleView(Path(bundle))
    order = ORDER if backend == "auto" else (backend,)
    reasons = []
    for name in order:
        reason = unavailable(name, loaded)  # what this machine lacks (no GPU, no TensorRT): expected
        runner = None
        if reason is None:
            try:
                runner = _construct(name, loaded, device, threads, cuda_graphs)
            except IntegrityError:
                raise  # a tampered artifact is refused, not skipped for the next backend
            except BundleError as exc:
                reason = str(exc)
                logger.warning("skipping %s: %s", _label(name), reason)  # the bundle's problem: say it loudly
        if runner is None:
            if backend != "auto":
                raise BundleError(f"{bundle}: cannot run on {_label(name)}: {reason}")
            reasons.append(f"{name}: {reason}")
            continue
        if reasons:
            logger.info("running on %s (%s)", _label(name), "; ".join(reasons))
        runner.check_values = check_values
        runner.bundle_path = loaded.path
        if fallback_on_error:
            rest = ORDER[ORDER.index(name) + 1:]
            runner._fallback_factory = lambda rest=rest: _first_available(rest, loaded, device, threads)
        return runner
    raise BundleError(f"{bundle}: no backend can run it here: " + "; ".join(reasons))


def _first_available(order: tuple[str, ...], bundle: BundleView, device: int, threads: int | None) -> Runner:
    for name in order:
        if unavailable(name, bundle) is None:
            try:
                return _construct(name, bundle, device, threads)
            except IntegrityError:
                raise  # a tampered artifact is refused, not skipped for the next backend (as in load)
            except BundleError as exc:
                logger.warning("fallback %s unavailable: %s", name, exc)
    raise InferenceError(f"no backend left to retry on after {order}")


def _label(backend: str) -> str:
    return {"trt": "TensorRT", "ort-cuda": "ONNX Runtime CUDA", "ort-cpu": "ONNX Runtime CPU"}[backend]
