"""The stages of ``planforge build``, each a small function: export (or load an .onnx MODEL), the
reference outputs (parity with PyTorch, or ONNX Runtime on the .onnx file), the passes and
precision per target, TensorRT, and the typed manifest. ``engines.build.pipeline`` runs them."""

from __future__ import annotations

import dataclasses
import datetime
import filecmp
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from engines import __version__
from engines.build.int4 import Int4Stage
from engines.build.int8 import Int8Stage
from engines.build.request import BuildRequest, target_precisions
from engines.build.shapes import output_specs
from engines.build.sparsity import SparsityStage
from engines.bundle import (
    Accuracy,
    Backends,
    Environment,
    ExportInfo,
    Manifest,
    ModelSource,
    OrtBackend,
    PruneReport,
    SparsityReport,
    TrtBackend,
    golden_feeds,
    golden_key,
    golden_points,
)
from engines.profiles import Profile
from engines.runtime.cpu import detect
from engines.trt_build.cache import build_or_reuse
from exporter.gguf_blocks import blocked_tensors
from exporter.resolved import ResolvedModel
from foundation.decoder import (
    DECODER_OPSET,
    LOGIT_POSITIONS,
    DecoderInfo,
    every_logit_position,
    static_cache_feeds,
)
from foundation.errors import BuildError, UsageError
from foundation.numerics import compare_arrays, graph_tolerance
from foundation.spec import InputSpec
from passes import PassManager, pipeline
from passes.calibration import graph_sha256
from passes.convert_fp16 import fp32_nodes as kept
from passes.quantize_weights_nbits import SourceBlocks
from passes.verify import run_graph, session

logger = logging.getLogger(__name__)

ROLES = {"model.onnx": "exported", "model.trt.onnx": "trt-graph", "model.ort.onnx": "ort-graph",
         "calibration.json": "calibration", "evaluation.npz": "evaluation", "golden.npz": "golden",
         "report.json": "report", "model.onnx.data": "external-data", "model.ort.onnx.data": "external-data",
         "model.plan": "trt-plan", "model.layers.json": "trt-layers"}


# A decoder's tokenizer, copied from the model directory: what `planforge generate` and a server read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def roles(root: Path) -> dict[str, str]:
    return {p.name: ROLES.get(p.name, "tokenizer" if p.name in TOKENIZER_FILES else "other") for p in root.iterdir()}


def tokenizer(root: Path, model: ResolvedModel) -> list[str]:
    """A decoder's tokenizer files copied into the bundle (none for other models)."""
    source = model.tokenizer_dir
    copied = []
    for name in TOKENIZER_FILES if source else ():
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, root / name)
            copied.append(name)
    return copied


def source_blocks(source: str) -> SourceBlocks | None:
    """A GGUF source's 32-value blocks, for the 4-bit stage to carry over where they fit (None for any other
    source; ``exporter/gguf_blocks.py``)."""
    if not source.endswith(".gguf"):
        return None
    start = time.perf_counter()
    blocks = SourceBlocks(blocked_tensors(Path(source)))
    logger.info("int4: %d rows of %s's Q8_0/Q5_0/Q4_0/Q4_K/Q4_1 blocks indexed in %.1f s", len(blocks),
                Path(source).name, time.perf_counter() - start)
    return blocks


def export(root: Path, request: BuildRequest, model: ResolvedModel, spec: InputSpec
           ) -> tuple[ExportInfo, onnx.ModelProto]:
    """``model.onnx`` in ``root``: exported from PyTorch, or the .onnx MODEL checked and copied. Returns the
    export record and the graph as loaded (weights not needed: for shape checks)."""
    exported = root / "model.onnx"
    if model.kind == "decoder":
        from exporter.decoder import export_decoder  # noqa: PLC0415 - imports torch's exporter

        start = time.perf_counter()
        opset = max(request.export.opset, DECODER_OPSET)
        if opset != request.export.opset:
            logger.info("decoder: exported at opset %d (Attention, RotaryEmbedding and RMSNormalization, what the "
                        "decoder fusions and TensorRT read), not %d", opset, request.export.opset)
        external = export_decoder(model.module, model.decoder, exported, opset)
        info = ExportInfo("dynamo", None, opset, round(time.perf_counter() - start, 3), external, "pytorch")
        return info, onnx.load(str(exported), load_external_data=False)
    if model.module is not None:
        from exporter.export import export_onnx  # noqa: PLC0415 - imports torch's exporter

        result = export_onnx(model.module, spec, model.output_names, exported, request.export.opset,
                             request.export.exporter)
        info = ExportInfo(result.exporter, result.fallback_reason, result.opset, round(result.seconds, 3),
                          result.external_data, "pytorch")
        return info, onnx.load(str(exported), load_external_data=False)
    from exporter.export import save_checked  # noqa: PLC0415 - imports torch
    from exporter.resolve import load_onnx  # noqa: PLC0415 - imports torch

    source = load_onnx(model.onnx_path)
    external = save_checked(source, exported)
    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), None)
    return ExportInfo(None, None, opset, 0.0, external, "onnxruntime"), source


def reference(root: Path, request: BuildRequest, model: ResolvedModel, spec: InputSpec) -> tuple[dict | None, dict]:
    """golden.npz (reference inputs and outputs per shape point) and the parity report: PyTorch against
    ONNX Runtime on the export, or, for an .onnx MODEL, ONNX Runtime on the file itself."""
    if model.module is not None:
        from exporter.parity import check_parity  # noqa: PLC0415 - imports torch

        given = None
        if model.kind == "decoder":  # a prefill and a decode step: dims that depend on each other
            from exporter.decoder import parity_feeds  # noqa: PLC0415 - imports torch

            given = parity_feeds(model.module, model.decoder)
        report = check_parity(model.module, root / "model.onnx", spec, request.export.parity_atol,
                              request.export.parity_rtol, points=("opt",) if request.shapes.static else None,
                              given=given, scaled=given is not None)
        for point, errs in report.points.items():
            logger.info("parity at %s: %s", point, ", ".join(f"{n} max_abs={e.max_abs:.2g}" for n, e in errs.items()))
        golden, parity = report.golden, report.to_json()
    else:
        golden, parity = _onnx_golden(model.onnx_path, spec, request.shapes.static), None
    np.savez(root / "golden.npz", **capped_golden(golden))
    return parity, golden


GOLDEN_CAP = 16 * 2**20  # bytes of golden.npz; the build itself checks every point in memory


def capped_golden(golden: dict[str, np.ndarray], cap: int | None = None) -> dict[str, np.ndarray]:
    """What golden.npz stores: the shape points, smallest first, while they fit in ``cap`` bytes; the
    smallest is always kept. A large model's max point (resnet18 at batch 32: 19 MiB of inputs) would
    otherwise make golden data bigger than the model; ``compare`` then checks the points that were kept."""
    cap = GOLDEN_CAP if cap is None else cap
    sizes = {p: sum(v.nbytes for k, v in golden.items() if k.startswith(f"{p}/")) for p in golden_points(golden)}
    kept, total = [], 0
    for point in sorted(sizes, key=sizes.get):
        if kept and total + sizes[point] > cap:
            logger.info("golden.npz: left out the %s point (%.1f MiB; golden data is capped at %d MiB)",
                        point, sizes[point] / 2**20, cap // 2**20)
            continue
        kept.append(point)
        total += sizes[point]
    return {k: v for k, v in golden.items() if k.split("/", 1)[0] in kept}


def _onnx_golden(path: Path, spec: InputSpec, static: bool) -> dict:
    from exporter.resolve import load_onnx  # noqa: PLC0415 - imports torch

    source, golden = load_onnx(path), {}
    for point in ("min", "max") if spec.is_dynamic and not static else ("opt",):
        feeds = spec.random_feeds(point, seed=0)
        try:
            outputs = run_graph(source, feeds)
        except Exception as exc:  # ONNX Runtime's own error types
            raise UsageError(
                f"{path} does not run under ONNX Runtime at the {point} shapes "
                f"{ {k: list(v.shape) for k, v in feeds.items()} }: {str(exc).splitlines()[0][:300]}. "
                "Pass --input with the model's real ranges"
            ) from exc
        golden.update({golden_key(point, "in", k): v for k, v in feeds.items()})
        golden.update({golden_key(point, "out", k): v for k, v in outputs.items()})
    return golden


INT8_MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (the ``axis`` attribute)


def int8_opset(graph: onnx.ModelProto, golden: dict) -> onnx.ModelProto:
    """``graph`` at an opset INT8's Q/DQ can use: unchanged from 13 on; below, upgraded with ONNX's
    version converter and checked on golden.npz's inputs against the original (FP32 tolerance), or
    refused before any INT8 work."""
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), INT8_MIN_OPSET)
    if opset >= INT8_MIN_OPSET:
        return graph
    from onnx import version_converter  # noqa: PLC0415 - only for old graphs

    advice = f"export with --opset {INT8_MIN_OPSET} or later, or build FP32/FP16"
    try:
        upgraded = version_converter.convert_version(graph, INT8_MIN_OPSET)
        upgraded.ir_version = min(upgraded.ir_version, graph.ir_version or upgraded.ir_version)
        for feeds, point in zip(golden_feeds(golden), golden_points(golden)):
            before, after = run_graph(graph, feeds), run_graph(upgraded, feeds)
            for name, value in before.items():
                err = compare_arrays(after[name], value, *graph_tolerance("fp32", value))
                if not err.ok:
                    raise ValueError(f"output {name!r} at the {point} shapes differs by {err.max_abs:.3g}")
    except Exception as exc:  # the converter and ONNX Runtime raise their own types
        raise UsageError(f"INT8 needs opset {INT8_MIN_OPSET} or later (per-channel Q/DQ); the graph is opset {opset} "
                         f"and ONNX's version converter could not upgrade it: {str(exc).splitlines()[0][:200]}; "
                         f"{advice}") from exc
    logger.info("INT8: upgraded the graph from opset %d to %d (ONNX's version converter; outputs checked)", opset,
                INT8_MIN_OPSET)
    return upgraded


@dataclasses.dataclass
class TargetGraph:
    """One target's graph after the passes and its precision, and what it recorded."""

    target: str
    precision: str
    records: list[dict]
    check: dict  # the graph against golden.npz
    fp16_fp32_nodes: list[dict]


def optimize(root: Path, request: BuildRequest, target: str, graph: onnx.ModelProto, frozen: list, golden: dict,
             int8: Int8Stage | None, on_stage, scaled: bool = False, int4: Int4Stage | None = None,
             pruned: bool = False, sparsity: SparsityStage | None = None) -> TargetGraph:
    """``model.<target>.onnx``: the target's passes (verified after each), then INT8 or 4-bit weights when
    asked. ``pruned``: the graph lost units (``engines/build/prune.py``): its outputs differ from the golden
    data by design, so they are recorded there, and the budget is what judged it. ``sparsity``: the trt graph's
    weights made 2:4 after its FP32 passes (``engines/build/sparsity.py``), then FP16 conversion if asked."""
    precision = target_precisions(request.precision)[target]
    on_stage(f"passes ({target})")
    floating = int8 or precision == "int4"
    steps = frozen + pipeline(target, "fp32" if floating else precision, skip=request.passes.skip_passes,
                              keep=request.passes.keep_fp32)
    verify = golden_feeds(golden) if request.passes.verify_passes else []  # each pass against its input graph
    sparse = sparsity is not None and target == "trt"
    if sparse:  # the FP32 passes, the 2:4 weights under the budget, then the precision's pipeline (FP16 keeps zeros)
        steps = frozen + pipeline(target, "fp32", skip=request.passes.skip_passes, keep=request.passes.keep_fp32)
        optimized, records = PassManager(steps, verify_feeds=verify, scaled=scaled).run(graph)
        on_stage("2:4 sparsity (trt)")
        optimized = sparsity.apply(optimized)
        if precision == "fp16":
            optimized, more = PassManager(pipeline(target, precision, skip=request.passes.skip_passes,
                                                   keep=request.passes.keep_fp32)).run(optimized)
            records += more
    else:
        optimized, records = PassManager(steps, verify_feeds=verify, scaled=scaled).run(graph)
    if int8 is not None:
        on_stage(f"int8 ({target})")
        optimized = int8.quantize(target, optimized)
        precision = int8.precision(target)
    if int4 is not None and precision == "int4":
        on_stage(f"int4 ({target})")
        optimized = int4.quantize(optimized, target)
    name = f"model.{target}.onnx"
    save_graph(optimized, root / name, external=scaled and target == "ort")  # scaled: a decoder (pipeline.build)
    fp32_nodes = []
    if precision == "fp16":
        measured = tuple(n for r in records if r.name == "ConvertToFp16" for n in r.stats.get("measured_fp32", ()))
        fp32_nodes = kept(optimized, request.passes.keep_fp32, measured)
    static = any(r.name == "FuseStaticKVCache" and r.changed for r in records)
    return TargetGraph(target, precision, [r.to_json() for r in records],
                       check_graph(root / name, golden, "pruned" if pruned or sparse else precision, target, scaled,
                                   static),
                       fp32_nodes)


def save_graph(model: onnx.ModelProto, path: Path, external: bool = False) -> None:
    """``path``, its weights inline, or with ``external`` in ``<name>.data`` beside it (a decoder's ``ort``
    graph: ONNX Runtime maps an external weights file instead of copying it out of the parsed graph, so a
    session's peak memory holds the weights about once rather than twice: Gemma 3 270M int4 peaks at 456 MB
    against 616 MB inline, at the same decode speed; docs/decisions/009). ``model`` keeps its weights in memory."""
    if not external:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
    data = path.parent / f"{path.name}.data"
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it 0600; readable as the graph is
    onnx.load_external_data_for_model(model, str(path.parent))  # saving moved them out of the in-memory graph


def check_graph(path: Path, golden: dict[str, np.ndarray], precision: str, target: str, scaled: bool = False,
                static_cache: bool = False) -> dict:
    """The optimized graph against the reference outputs in golden.npz: the ``ort`` graph with ORT's
    optimizations on (as it runs), the ``trt`` graph as written (float emulation, ``engines.build.int8``).
    ``scaled``: FP32 outputs judged relative to their magnitude (a decoder's logits). ``static_cache``: the
    graph keeps a decoder's cache in static buffers (``foundation.decoder.static_cache_feeds``)."""
    sess = session(path, optimize=target != "trt")
    names = [o.name for o in sess.get_outputs()]
    points = {}
    for feeds, point in zip(golden_feeds(golden), golden_points(golden)):
        feeds = static_cache_feeds(feeds) if static_cache else feeds
        feeds = every_logit_position(feeds) if LOGIT_POSITIONS in {i.name for i in sess.get_inputs()} else feeds
        actual = dict(zip(names, sess.run(names, feeds)))
        expected = {n: golden[golden_key(point, "out", n)] for n in names}
        points[point] = {
            n: compare_arrays(actual[n], expected[n], *graph_tolerance(precision, expected[n], scaled)).to_json()
            for n in names}
    worst = {n: max(p[n]["max_abs"] for p in points.values()) for n in names}
    ok = all(e["ok"] for p in points.values() for e in p.values())
    if not ok:
        raise BuildError(f"{path.name} ({precision}) differs from the reference beyond its budget: max abs "
                         f"errors {worst}; keep sensitive nodes in FP32 with --keep-fp32 NAME_OR_OP")
    return {"points": points, "worst": worst, "ok": ok, "precision": precision}


def share_graph(root: Path) -> str:
    """The ort backend's graph file: ``model.trt.onnx`` when both targets produced the same bytes (typical
    at FP32, where no pass differs between them), stored once and named in the manifest for both; else
    ``model.ort.onnx``."""
    ort, trt = root / "model.ort.onnx", root / "model.trt.onnx"
    if not filecmp.cmp(ort, trt, shallow=False):
        return ort.name
    ort.unlink()
    logger.info("model.ort.onnx and model.trt.onnx are identical: stored once as model.trt.onnx for both backends")
    return trt.name


def trt_check(root: Path, request: BuildRequest) -> dict:
    """The TensorRT compatibility check of ``model.trt.onnx`` (``engines.trt_build.compat``), before any TensorRT
    call: one INFO line; with ``--require-trt`` a refusal fails the build here."""
    from engines.trt_build.compat import check_model  # noqa: PLC0415

    report = check_model(onnx.load(str(root / "model.trt.onnx")), graph="model.trt.onnx")
    logger.info("%s", report.summary())
    for finding in report.findings:
        logger.debug("%s %s (%s) %s: %s", finding.status, finding.node, finding.op, finding.rule, finding.message)
    if request.require_trt and not report.ok:
        first = report.refused[0]
        raise BuildError(f"--require-trt: {report.summary()}; first: {first.node} ({first.op}): {first.message}. "
                         f"{first.hint}. planforge check-trt BUNDLE_OR_MODEL lists them all")
    return report.to_json()


def tensorrt(root: Path, request: BuildRequest, profiles: list[Profile], precision: str,
             on_stage) -> tuple[TrtBackend, dict]:
    """The TensorRT backend entry (a plan, or why not) and the TensorRT environment it built in."""

    graph = root / "model.trt.onnx"
    entry = build_or_reuse(graph, graph_sha256(onnx.load(str(graph))), profiles, request.trt,
                           request.build_root / ".cache", root, request.force, request.require_trt, on_stage)
    env = entry.pop("env", {})
    return TrtBackend("model.trt.onnx", precision, **entry), env


def environment(trt_env: dict, trt_skipped: str | None, hardware_compatibility: str) -> Environment:
    import torch  # noqa: PLC0415 - the build has torch; the runtime never reads this

    return Environment(
        python=platform.python_version(), platform=platform.platform(), machine=platform.machine(),
        cpu_model=detect().model, cpu_isa=detect().isa, cpus=detect().cores,
        torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
        ort_providers=tuple(onnxruntime.get_available_providers()), tensorrt=trt_env.get("tensorrt"),
        tensorrt_status=trt_skipped or f"TensorRT {trt_env.get('tensorrt')}",
        cuda=trt_env.get("cuda", torch.version.cuda), gpu=trt_env.get("gpu"),
        compute_capability=trt_env.get("compute_capability"),
        hardware_compatibility_level=hardware_compatibility if trt_env else None)


def manifest(request: BuildRequest, key: str, model: ResolvedModel, spec: InputSpec, graph: onnx.ModelProto,
             profiles: list[Profile], export_info: ExportInfo, parity: dict | None, graphs: dict[str, TargetGraph],
             int8: Int8Stage | None, trt_backend: TrtBackend, trt_env: dict, golden: dict | None = None,
             ort_graph: str = "model.ort.onnx", compat: dict | None = None, int4: Int4Stage | None = None,
             prune: PruneReport | None = None, sparsity: SparsityReport | None = None) -> Manifest:
    """The typed manifest of a finished build (artifacts are added when the bundle is committed)."""
    return Manifest(
        planforge_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        build_key=key,
        model=ModelSource(model.name, model.kind, model.source, model.source_sha256, model.task),
        inputs=spec, outputs=tuple(output_specs(graph, spec, golden)), profiles=tuple(profiles),
        precision=request.precision,
        int8_float_layers=tuple(k for t in graphs for k in (int8.results[t].kept_float if int8 else ())),
        fp16_fp32_nodes=tuple(n for g in graphs.values() for n in g.fp16_fp32_nodes),
        calibration=int8.calibration() if int8 else None, export=export_info,
        passes={t: g.records for t, g in graphs.items()},
        backends=Backends(OrtBackend(ort_graph, graphs["ort"].precision), trt_backend),
        environment=environment(trt_env, trt_backend.skipped, request.trt.hardware_compatibility),
        accuracy=Accuracy(parity["ok"] if parity else None, parity["worst"] if parity else None,
                          {f"model.{t}.onnx": g.check["worst"] for t, g in graphs.items()},
                          {t: r.report() for t, r in int8.results.items()} if int8 else None,
                          int4.reports if int4 is not None and int4.reports else None, prune, sparsity),
        trt_check=compat, decoder=decoder_cache(model.decoder, graphs["ort"], graphs.get("trt")))


def decoder_cache(decoder: DecoderInfo | None, ort_graph: TargetGraph, trt_graph: TargetGraph | None = None
                  ) -> DecoderInfo | None:
    """The decoder as each graph runs it: for ONNX Runtime a shared past/present buffer with right padding once
    GroupQueryAttention holds the cache (``passes/fuse_group_query_attention.py``), else a growing one; for
    TensorRT static buffers written by TensorScatter (``passes/fuse_static_kv_cache.py``), else growing."""
    if decoder is None or not ort_graph.records:
        return decoder
    fused = ort_graph.records[-1]["nodes_after"].get("GroupQueryAttention", 0)
    static = trt_graph is not None and any(r["name"] == "FuseStaticKVCache" and r["changed"] for r in trt_graph.records)
    return dataclasses.replace(decoder, cache="shared" if fused else "grow", trt_cache="static" if static else "grow")


def write_report(root: Path, parity: dict | None, graphs: dict[str, TargetGraph]) -> None:
    report = {"parity": parity, "graphs": {f"model.{t}.onnx": g.check for t, g in graphs.items()}}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
