"""``planforge build``: MODEL -> export -> parity -> passes per target -> bundle.

The bundle is staged and renamed into place with the manifest written last (see
``engines.bundle``). An existing bundle built from the same request is reused; one built from
another request is replaced only with ``force``. The stages are ``engines.build.stages``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from engines.build import stages
from engines.build.int4 import Int4Stage
from engines.build.int8 import Int8Stage
from engines.build.prune import PruneStage, parse_prune
from engines.build.request import PRECISIONS, BuildRequest, BuildResult, default_out
from engines.build.shapes import check_profiles, with_shape_values
from engines.build.sparsity import SparsityStage, parse_sparsity
from engines.bundle import MANIFEST, Manifest, StagedBundle, read_manifest
from engines.profiles import Profile, envelope, profiles_for
from foundation.decoder import DecoderBudget
from foundation.errors import BuildError, BundleError, UsageError
from foundation.spec import InputSpec
from passes import TARGETS
from passes.freeze_shapes import FreezeInputShapes

logger = logging.getLogger(__name__)


def build(request: BuildRequest, on_stage: Callable[[str], None] = lambda stage: None) -> BuildResult:
    """Run the whole pipeline for ``request``; raise a ``PlanforgeError`` subclass on bad input."""
    start = time.perf_counter()
    if request.precision not in PRECISIONS:
        raise UsageError(f"precision {request.precision!r} is not one of {', '.join(PRECISIONS)}")
    from exporter.resolve import check_assumed, relative_source, resolve, weights_sha256  # noqa: PLC0415 - imports torch

    on_stage("resolve")
    model = resolve(request.model, request.build_root / ".cache", request.export.max_length)
    if model.kind == "decoder" and request.precision == "int8":
        raise UsageError("--precision int8 is not available for decoders: build int4 (4-bit weights, 8 where the "
                         "budget needs them), fp32, or fp16 for TensorRT")
    pruning = parse_prune(request.prune)
    if parse_sparsity(request.sparsity) is not None:  # TensorRT uses its sparse kernels only when told
        request = dataclasses.replace(request, trt=dataclasses.replace(request.trt, sparse_weights=True))
    if pruning is not None and model.kind == "decoder":
        raise UsageError("--prune is not available for decoders: without retraining, removing 5 % of Gemma 3 270M's "
                         "MLP units raised its perplexity 13 % against a 1.5 % budget (docs/decisions/011); build "
                         "without --prune")
    if model.kind != "decoder" and request.precision == "int4":
        raise UsageError(f"--precision int4 (4-bit weights) is for language-model decoders; {request.model} is a "
                         f"{model.kind} model: build int8, fp16 or fp32")
    if request.precision == "int4":  # a misspelled budget fails now, not after the export
        DecoderBudget.parse(request.int8.budget)
    spec = model.input_spec.override(request.inputs)
    check_assumed(spec, request.model)
    profiles = [] if request.shapes.static else profiles_for(spec, request.shapes.profiles,
                                                             request.shapes.profiles_auto)
    spec = envelope(spec, profiles)
    out = Path(request.out) if request.out else default_out(model.name, request.precision, request.build_root)
    key = request.key(model.source_sha256, spec)
    if (reused := _existing(out, key, request.force)) is not None:
        logger.info("%s is up to date (same model, inputs and options); reusing it. --force rebuilds", out)
        return BuildResult(out, reused, True, time.perf_counter() - start)
    # A user's factory may return other weights on every call (no seed, no checkpoint): compare checks this hash.
    # Zoo models are seeded and Hugging Face directories load a checkpoint; recorded for factories only, before
    # export runs the module.
    weights = weights_sha256(model.module) if model.kind == "python" else None
    old_cache = out / "calibration.json"
    clock = StageClock(on_stage)
    with StagedBundle(out, replace=out.exists()) as stage:
        manifest = _build_into(stage.path, request, model, spec, profiles, key, clock,
                               old_cache if old_cache.is_file() else None)
        manifest = dataclasses.replace(manifest, model=dataclasses.replace(
            manifest.model, relative=relative_source(model.source, out), weights_sha256=weights))
        seconds = clock.finish()
        on_stage("write")
        manifest = stage.commit(dataclasses.replace(manifest, build_seconds=seconds), stages.roles(stage.path))
    return BuildResult(out, manifest, False, time.perf_counter() - start)


class StageClock:
    """Passes stage names on to ``on_stage`` and times each stage until the next one starts."""

    def __init__(self, on_stage: Callable[[str], None]):
        self.on_stage = on_stage
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()
        self._stage: str | None = None

    def __call__(self, stage: str) -> None:
        self._close()
        self._stage = stage
        self.on_stage(stage)

    def _close(self) -> None:
        now = time.perf_counter()
        if self._stage is not None:
            self.seconds[self._stage] = round(self.seconds.get(self._stage, 0.0) + now - self._last, 3)
        self._last = now

    def finish(self) -> dict[str, float]:
        """Seconds per stage and in all (resolving the model and writing the bundle not included)."""
        self._close()
        self._stage = None
        return {**self.seconds, "total": round(sum(self.seconds.values()), 3)}


def _existing(out: Path, key: str, force: bool) -> Manifest | None:
    if not out.exists() or force:
        return None
    if not (out / MANIFEST).exists():
        raise BuildError(f"{out} exists but is not a bundle (no {MANIFEST}); remove it, choose -o, or pass --force")
    try:
        manifest = read_manifest(out)
    except BundleError as exc:
        raise BuildError(f"{out} holds an unreadable bundle ({exc}); pass --force to rebuild it") from exc
    if manifest.build_key != key:
        raise BuildError(
            f"{out} already holds a bundle built from a different model, input spec or options; "
            "pass --force to replace it, or -o to build elsewhere"
        )
    return manifest


def _build_into(root: Path, request: BuildRequest, model, spec: InputSpec, profiles: list[Profile], key: str,
                on_stage, calib_cache: Path | None = None) -> Manifest:
    on_stage("export" if model.module is not None else "load")
    export_info, exported = stages.export(root, request, model, spec)
    profiles = with_shape_values(exported, spec, profiles)  # before parity: shape tensors need real values
    if model.module is not None:
        on_stage("parity")
    parity, golden = stages.reference(root, request, model, spec)
    stages.tokenizer(root, model)
    graph = onnx.load(str(root / "model.onnx"))
    if model.kind != "decoder":  # a decoder's max shapes (a whole max-length prompt over its vocabulary) are not
        check_profiles(graph, profiles, spec)  # run here: its parity covers a prefill and a decode step instead
    prune, unpruned = None, graph
    if request.prune is not None:  # before either target: both start from the same pruned graph
        on_stage("prune")
        prune = PruneStage(root, parse_prune(request.prune), request.int8, model, spec)
        graph = prune.run(graph)
    sparsity = SparsityStage(root, request.sparsity, request.int8, model, spec) if request.sparsity else None
    frozen = []
    if request.shapes.static:

        frozen, spec = [FreezeInputShapes(spec.shapes("opt"))], spec.frozen("opt")
    int8 = int4 = None
    pruned = prune is not None and graph is not unpruned
    if request.precision == "int8":
        graph = stages.int8_opset(graph, golden)
        int8 = Int8Stage(root, request.int8, model, spec, calib_cache)
        if pruned:  # INT8 of a pruned graph is judged against the unpruned export: the final graph, end to end
            int8.reference = stages.int8_opset(unpruned, golden)
    if request.precision == "int4":
        int4 = Int4Stage(root, model.decoder, root, DecoderBudget.parse(request.int8.budget),
                         source=stages.source_blocks(model.source))
    targets = ("ort", "trt") if int4 else TARGETS  # TensorRT's 4-bit graph takes the ort graph's budget outcome
    graphs = {t: stages.optimize(root, request, t, graph, frozen, golden, int8, on_stage, model.kind == "decoder",
                                 int4, pruned=prune is not None, sparsity=sparsity) for t in targets}
    ort_graph = stages.share_graph(root)
    compat = stages.trt_check(root, request)
    trt_backend, trt_env = stages.tensorrt(root, request, profiles, graphs["trt"].precision, on_stage)
    stages.write_report(root, parity, graphs)
    return stages.manifest(request, key, model, spec, graph, profiles, export_info, parity, graphs, int8, trt_backend,
                           trt_env, golden, ort_graph, compat, int4, prune.report if prune else None,
                           sparsity.report if sparsity else None)
