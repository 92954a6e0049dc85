"""``planforge build``: MODEL -> export -> parity -> passes per target -> bundle.

The bundle is staged and renamed into place with the manifest written last (see
``engines.bundle``). An existing bundle built from the same request is reused; one built from
another request is replaced only with ``force``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from engines import __version__
from engines.bundle import MANIFEST, SCHEMA_VERSION, StagedBundle, golden_feeds, golden_key, golden_points, read_manifest
from engines.build.int8 import Int8Stage
from engines.profiles import Profile, envelope, profiles_for
from engines.evaluate.compare.tolerances import graph_tolerance
from engines.trt.builder import TrtOptions
from exporter.core.errors import BuildError, BundleError, UsageError
from exporter.core.spec import InputSpec, OutputSpec
from passes import TARGETS, PassManager, pipeline
from passes.verify import run_graph

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8")


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    model: str
    out: Path | None = None
    inputs: tuple[str, ...] = ()
    precision: str = "fp32"
    force: bool = False
    opset: int = 18
    exporter: str = "auto"
    parity_atol: float = 1e-4
    parity_rtol: float = 1e-3
    verify_passes: bool = True
    build_root: Path = Path("build")
    keep_fp32: tuple[str, ...] = ()
    calib: str | None = None
    calib_method: str = "max"
    allow_random_calibration: bool = False
    budget: str | None = None
    ort_int8_form: str = "auto"  # auto: measured among this CPU class's non-saturating forms
    profiles: tuple[str, ...] = ()
    profiles_auto: str | None = None
    static: bool = False
    require_trt: bool = False
    trt: TrtOptions = TrtOptions()

    def key(self, source_sha256: str, spec: InputSpec) -> str:
        """What makes two builds the same: reuse a bundle only when this matches."""
        fields = {"model": self.model, "source_sha256": source_sha256, "inputs": str(spec), "precision": self.precision,
                  "opset": self.opset, "exporter": self.exporter, "atol": self.parity_atol, "rtol": self.parity_rtol,
                  "keep_fp32": sorted(self.keep_fp32), "calib": self.calib, "calib_method": self.calib_method,
                  "random_calibration": self.allow_random_calibration, "budget": self.budget,
                  "ort_int8_form": self.ort_int8_form,
                  "profiles": list(self.profiles), "profiles_auto": self.profiles_auto, "static": self.static,
                  "trt": self.trt.to_json(),
                  "planforge": __version__, "schema": SCHEMA_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class BuildResult:
    out: Path
    manifest: dict
    reused: bool
    seconds: float


def default_out(name: str, precision: str, root: Path = Path("build")) -> Path:
    return Path(root) / (name if precision == "fp32" else f"{name}-{precision}")


def build(request: BuildRequest, on_stage: Callable[[str], None] = lambda stage: None) -> BuildResult:
    """Run the whole pipeline for ``request``; raise a ``PlanforgeError`` subclass on bad input."""
    start = time.perf_counter()
    if request.precision not in PRECISIONS:
        raise UsageError(f"precision {request.precision!r} is not one of {', '.join(PRECISIONS)}")
    if request.precision not in SUPPORTED_PRECISIONS:
        raise UsageError(f"precision {request.precision} is not yet supported; build with --precision "
                         f"{' or '.join(SUPPORTED_PRECISIONS)} for now")
    from exporter.resolve import resolve  # noqa: PLC0415 - imports torch; keep `engines` import light

    on_stage("resolve")
    model = resolve(request.model, request.build_root / ".cache")
    spec = model.input_spec.override(request.inputs)
    profiles = [] if request.static else profiles_for(spec, request.profiles, request.profiles_auto)
    spec = envelope(spec, profiles)
    out = Path(request.out) if request.out else default_out(model.name, request.precision, request.build_root)
    key = request.key(model.source_sha256, spec)
    if (reused := _existing(out, key, request.force)) is not None:
        logger.info("%s is up to date (same model, inputs and options); reusing it. --force rebuilds", out)
        return BuildResult(out, reused, True, time.perf_counter() - start)
    old_cache = out / "calibration.json"
    clock = StageClock(on_stage)
    with StagedBundle(out, replace=out.exists()) as stage:
        manifest = _build_into(stage.path, request, model, spec, profiles, key, clock,
                               old_cache if old_cache.is_file() else None)
        manifest["build_seconds"] = clock.finish()
        on_stage("write")
        manifest = stage.commit(manifest, _roles(stage.path))
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


def _existing(out: Path, key: str, force: bool) -> dict | None:
    if not out.exists():
        return None
    if force:
        return None
    if not (out / MANIFEST).exists():
        raise BuildError(f"{out} exists but is not a bundle (no {MANIFEST}); remove it, choose -o, or pass --force")
    try:
        manifest = read_manifest(out)
    except BundleError as exc:
        raise BuildError(f"{out} holds an unreadable bundle ({exc}); pass --force to rebuild it") from exc
    if manifest.get("build_key") != key:
        raise BuildError(
            f"{out} already holds a bundle built from a different model, input spec or options; "
            "pass --force to replace it, or -o to build elsewhere"
        )
    return manifest


def _build_into(root: Path, request: BuildRequest, model, spec: InputSpec, profiles: list[Profile], key: str,
                on_stage, calib_cache: Path | None = None) -> dict:
    exported = root / "model.onnx"
    checked = {}

    def check_shapes(graph: onnx.ModelProto) -> None:  # before parity: shape tensors need real values
        checked["profiles"] = _with_shape_values(graph, spec, profiles)

    export_info, parity, golden = _export_stage(root, request, model, spec, exported, on_stage, check_shapes)
    graph = onnx.load(str(exported))
    profiles = checked["profiles"]
    _check_profiles(graph, profiles)
    frozen = []
    if request.static:
        from passes.freeze_shapes import FreezeInputShapes  # noqa: PLC0415

        frozen = [FreezeInputShapes(spec.shapes("opt"))]
        spec = InputSpec.parse([f"{t.name}:{t.dtype}:[{','.join(map(str, t.shape('opt')))}]"
                                + (f":{t.value_range[0]}..{t.value_range[1]}" if t.value_range else "") for t in spec])
    verify = golden_feeds(golden) if request.verify_passes else []
    passes, graphs, unquantized = {}, {}, []
    precisions = target_precisions(request.precision)
    int8 = Int8Stage(root, request, model, spec, calib_cache) if request.precision == "int8" else None
    for target in TARGETS:
        on_stage(f"passes ({target})")
        steps = frozen + pipeline(target, "fp32" if int8 else precisions[target], keep=request.keep_fp32)
        optimized, records = PassManager(steps, verify_feeds=verify).run(graph)
        if int8 is not None:
            on_stage(f"int8 ({target})")
            optimized = int8.quantize(target, optimized)
            unquantized += int8.results[target].kept_float
        name = f"model.{target}.onnx"
        onnx.save_model(optimized, str(root / name))
        passes[target] = [r.to_json() for r in records]
        graphs[name] = _compare_graph(root / name, golden, precisions[target], target)
        if precisions[target] == "fp16":
            from passes.convert_fp16 import fp32_nodes  # noqa: PLC0415

            unquantized = fp32_nodes(optimized, request.keep_fp32)
    from engines.trt.cache import build_or_reuse  # noqa: PLC0415
    from passes.calibration import graph_sha256  # noqa: PLC0415

    trt_entry = build_or_reuse(root / "model.trt.onnx", graph_sha256(onnx.load(str(root / "model.trt.onnx"))),
                               profiles, request.trt, request.build_root / ".cache", root, request.force,
                               request.require_trt, on_stage)
    trt_env = trt_entry.pop("env", {})
    report = {"parity": parity, "graphs": graphs}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {
        "schema_version": SCHEMA_VERSION,
        "planforge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_key": key,
        "model": {"name": model.name, "kind": model.kind, "source": model.source,
                  "source_sha256": model.source_sha256, "task": model.task},
        "inputs": spec.to_json(),
        "outputs": [o.to_json() for o in _output_specs(graph)],
        "profiles": [p.to_json() for p in profiles],
        "precision": request.precision,
        "unquantized_nodes": unquantized,
        "calibration": int8.manifest_entry() if int8 else None,
        "export": export_info,
        "passes": passes,
        "backends": {
            "ort": {"graph": "model.ort.onnx", "precision": precisions["ort"], "providers": ["CPUExecutionProvider"]},
            "trt": {"graph": "model.trt.onnx", "precision": precisions["trt"], **trt_entry},
        },
        "environment": _environment(trt_env, trt_entry.get("skipped"), request.trt.hardware_compatibility),
        "accuracy": {
            "parity_ok": parity["ok"] if parity else None,
            "parity_worst": parity["worst"] if parity else None,
            "graphs": {name: g["worst"] for name, g in graphs.items()},
            "int8": {t: r.to_json() for t, r in int8.results.items()} if int8 else None,
        },
    }


def _export_stage(root: Path, request: BuildRequest, model, spec: InputSpec, exported: Path, on_stage,
                  check: Callable[[onnx.ModelProto], None]):
    """model.onnx and golden.npz: exported and parity-checked, or copied from a .onnx MODEL."""
    if model.module is not None:
        from exporter.export import export_onnx  # noqa: PLC0415
        from exporter.parity import check_parity  # noqa: PLC0415

        on_stage("export")
        result = export_onnx(model.module, spec, model.output_names, exported, request.opset, request.exporter)
        check(onnx.load(str(exported), load_external_data=False))
        on_stage("parity")
        report = check_parity(model.module, exported, spec, request.parity_atol, request.parity_rtol,
                              points=("opt",) if request.static else None)
        np.savez(root / "golden.npz", **report.golden)
        info = {"exporter": result.exporter, "fallback_reason": result.fallback_reason, "opset": result.opset,
                "seconds": round(result.seconds, 3), "external_data": result.external_data, "reference": "pytorch"}
        for point, errs in report.points.items():
            logger.info("parity at %s: %s", point, ", ".join(f"{n} max_abs={e.max_abs:.2g}" for n, e in errs.items()))
        return info, report.to_json(), _load_golden(root / "golden.npz")
    from exporter.export import save_checked  # noqa: PLC0415
    from exporter.resolve import load_onnx  # noqa: PLC0415

    on_stage("load")
    source = load_onnx(model.onnx_path)
    external = save_checked(source, exported)
    check(source)
    golden = {}
    for point in ("min", "max") if spec.is_dynamic and not request.static else ("opt",):
        feeds = spec.random_feeds(point, seed=0)
        try:
            outputs = run_graph(source, feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's own types
            raise UsageError(
                f"{model.onnx_path} does not run under ONNX Runtime at the {point} shapes "
                f"{ {k: list(v.shape) for k, v in feeds.items()} }: {str(exc).splitlines()[0][:300]}. "
                "Pass --input with the model's real ranges"
            ) from exc
        golden.update({golden_key(point, "in", k): v for k, v in feeds.items()})
        golden.update({golden_key(point, "out", k): v for k, v in outputs.items()})
    np.savez(root / "golden.npz", **golden)
    info = {"exporter": None, "fallback_reason": None, "opset": _opset(source), "seconds": 0.0,
            "external_data": external, "reference": "onnxruntime"}
    return info, None, golden


def target_precisions(precision: str) -> dict[str, str]:
    """FP16 is for TensorRT; the ONNX Runtime CPU fallback keeps FP32 (no fast FP16 CPU kernels)."""
    return {"trt": precision, "ort": "fp32" if precision == "fp16" else precision}


def _load_golden(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _compare_graph(path: Path, golden: dict[str, np.ndarray], precision: str, target: str) -> dict:
    """The optimized graph against the reference outputs in golden.npz: the ``ort`` graph with ORT's
    optimizations on (as it runs), the ``trt`` graph as written (``engines.build.int8``: float emulation)."""
    from exporter.parity import compare  # noqa: PLC0415 - exporter's comparison, one definition

    from passes.verify import session  # noqa: PLC0415

    sess = session(path, optimize=target != "trt")
    names = [o.name for o in sess.get_outputs()]
    points = {}
    for feeds, point in zip(golden_feeds(golden), golden_points(golden)):
        actual = dict(zip(names, sess.run(names, feeds)))
        expected = {n: golden[golden_key(point, "out", n)] for n in names}
        points[point] = {n: compare(actual[n], expected[n], *graph_tolerance(precision, expected[n])).to_json()
                         for n in names}
    worst = {n: max(p[n]["max_abs"] for p in points.values()) for n in names}
    ok = all(e["ok"] for p in points.values() for e in p.values())
    if not ok:
        raise BuildError(f"{path.name} ({precision}) differs from the reference beyond its budget: max abs "
                         f"errors {worst}; keep sensitive nodes in FP32 with --keep-fp32 NAME_OR_OP")
    return {"points": points, "worst": worst, "ok": ok, "precision": precision}


def _output_specs(model: onnx.ModelProto) -> list[OutputSpec]:
    from exporter.resolve import ONNX_DTYPES  # noqa: PLC0415

    specs = []
    for out in model.graph.output:
        ttype = out.type.tensor_type
        shape = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in ttype.shape.dim)
        specs.append(OutputSpec(out.name, ONNX_DTYPES.get(ttype.elem_type, str(ttype.elem_type)), shape))
    return specs


SHAPE_OPERANDS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Resize": 3}


def shape_tensor_inputs(graph: onnx.ModelProto) -> list[str]:
    """Integer graph inputs read as a shape operand (TensorRT shape tensors: profiles need their values)."""
    inputs = {i.name for i in graph.graph.input if i.type.tensor_type.elem_type in (6, 7)}
    return sorted({n.input[SHAPE_OPERANDS[n.op_type]] for n in graph.graph.node
                   if n.op_type in SHAPE_OPERANDS and len(n.input) > SHAPE_OPERANDS[n.op_type]
                   and n.input[SHAPE_OPERANDS[n.op_type]] in inputs})


def _with_shape_values(graph: onnx.ModelProto, spec: InputSpec, profiles: list[Profile]) -> list[Profile]:
    """Shape-tensor inputs get profile values from the spec's value range lo..hi (min lo, opt and max hi-1)."""
    names = shape_tensor_inputs(graph)
    if not names or not profiles:
        return profiles
    values = {}
    for name in names:
        tensor = spec[name]
        if tensor.value_range is None or tensor.rank != 1 or tensor.dims[0].is_dynamic:
            raise UsageError(f"input {name!r} is a shape tensor (it feeds a shape operand); TensorRT profiles need "
                             f"its values: give it a fixed length and a value range, e.g. {name}:int64:[2]:1..65")
        n, (lo, hi) = tensor.dims[0].min, tensor.value_range
        values[name] = ((lo,) * n, (hi - 1,) * n, (hi - 1,) * n)
    return [dataclasses.replace(p, shape_values={**values, **p.shape_values}) for p in profiles]


def _check_profiles(graph: onnx.ModelProto, profiles: list[Profile]) -> None:
    """Each profile's fixed dims equal the graph's, and the graph runs at its min and max shapes."""
    from exporter.resolve import ONNX_DTYPES  # noqa: PLC0415

    inputs = {i.name: i for i in graph.graph.input}
    for profile in profiles:
        missing = [n for n in inputs if n not in profile.min]
        if missing:
            raise UsageError(f"profile {profile.name} does not cover inputs {', '.join(missing)}")
        for point in ("min", "max"):
            shapes = getattr(profile, point)
            for name, shape in shapes.items():
                dims = inputs[name].type.tensor_type.shape.dim
                fixed = [(i, d.dim_value) for i, d in enumerate(dims) if d.HasField("dim_value")]
                if len(dims) != len(shape) or any(shape[i] != v for i, v in fixed):
                    raise UsageError(f"profile {profile.name}: input {name!r} {point} shape {list(shape)} does not "
                                     f"fit the graph's dims {[d.dim_value or d.dim_param for d in dims]}")
            rng = np.random.default_rng(0)
            feeds = {n: (rng.standard_normal(s) if ONNX_DTYPES[inputs[n].type.tensor_type.elem_type].startswith("float")
                         else np.ones(s)).astype(ONNX_DTYPES[inputs[n].type.tensor_type.elem_type])
                     for n, s in shapes.items()}
            try:
                run_graph(graph, feeds)
            except Exception as exc:  # noqa: BLE001 - ORT's own error types
                raise UsageError(f"profile {profile.name}: the exported graph does not run at its {point} shapes "
                                 f"{ {k: list(v) for k, v in shapes.items()} }: {str(exc).splitlines()[0][:200]}; "
                                 "narrow the profile") from exc


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _roles(root: Path) -> dict[str, str]:
    roles = {"model.onnx": "exported", "model.trt.onnx": "trt-graph", "model.ort.onnx": "ort-graph",
             "calibration.json": "calibration",
             "golden.npz": "golden", "report.json": "report", "model.onnx.data": "external-data",
             "model.plan": "trt-plan", "model.layers.json": "trt-layers"}
    return {p.name: roles.get(p.name, "other") for p in root.iterdir()}


def _environment(trt_env: dict, trt_skipped: str | None, hardware_compatibility: str) -> dict:
    import onnxruntime  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from engines.runtime.cpu import detect  # noqa: PLC0415

    return {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        **detect().to_json(),
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "tensorrt": trt_env.get("tensorrt"), "tensorrt_status": trt_skipped or f"TensorRT {trt_env.get('tensorrt')}",
        "cuda": trt_env.get("cuda", torch.version.cuda), "gpu": trt_env.get("gpu"),
        "compute_capability": trt_env.get("compute_capability"),
        "hardware_compatibility_level": hardware_compatibility if trt_env else None,
    }
