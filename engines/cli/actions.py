"""Library functions behind ``planforge export``, ``inspect`` and ``run`` (the CLI stays thin)."""

from __future__ import annotations

import collections
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from engines.build.request import ExportOptions, PassOptions
from engines.bundle import read_manifest
from engines.cli.present import inspect_bundle, inspect_onnx
from engines.runtime import load
from foundation.dtypes import ONNX_DTYPES
from foundation.errors import PassError, RuntimeInputError, UsageError
from foundation.files import write_atomic
from foundation.numerics import compare_arrays, graph_tolerance
from passes import PassManager, pipeline
from passes.verify import run_graph

logger = logging.getLogger(__name__)


def export_model(model: str, out: Path, inputs: tuple[str, ...], options: ExportOptions) -> str:
    """Export and parity-check; the .onnx is written to a temporary name and renamed into place."""

    from exporter.export import export_onnx  # noqa: PLC0415 - imports torch
    from exporter.parity import check_parity  # noqa: PLC0415 - imports torch
    from exporter.resolve import resolve  # noqa: PLC0415 - imports torch

    resolved = resolve(model, Path("build") / ".cache")
    if resolved.module is None:
        raise UsageError(f"{model} is already an ONNX file; 'planforge export' takes a PyTorch model")
    spec = resolved.input_spec.override(inputs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.partial-") as tmp:
        staged = Path(tmp) / out.name
        result = export_onnx(resolved.module, spec, resolved.output_names, staged, options.opset, options.exporter)
        report = check_parity(resolved.module, staged, spec, options.parity_atol, options.parity_rtol)
        if result.external_data:
            os.replace(Path(tmp) / f"{out.name}.data", out.parent / f"{out.name}.data")
        os.replace(staged, out)
    worst = max((w["max_abs"] for w in report.worst().values()), default=0.0)
    return f"{result.exporter} exporter, opset {result.opset}, parity max abs error {worst:.2g}"


def optimize_model(source: Path, out: Path, target: str, precision: str, inputs: tuple[str, ...],
                   passes: PassOptions, feed: tuple[str, ...] = ()) -> tuple[list[dict], dict[str, float]]:
    """Run one target's pipeline on an .onnx file; the result is compared with the input graph, on seeded random
    data at the input spec or on the user's ``feed`` files (``read_feeds``)."""
    from exporter.resolve import load_onnx, spec_from_onnx  # noqa: PLC0415 - imports torch

    model = load_onnx(source)
    spec = spec_from_onnx(model).override(inputs)
    feeds, references = _verification_data(model, spec, source, feed, passes.verify_passes)
    steps = pipeline(target, precision, skip=passes.skip_passes, keep=passes.keep_fp32)
    optimized, records = PassManager(steps, verify_feeds=feeds if passes.verify_passes else None).run(model)
    worst: dict[str, float] = {}
    for f, expected in zip(feeds, references):
        try:
            actual = run_graph(optimized, f)
        except Exception as exc:  # ONNX Runtime raises its own types
            raise PassError(f"the optimized graph no longer runs under ONNX Runtime where {source} does: "
                            f"{str(exc).splitlines()[0][:300]}; find the pass with --skip-pass") from exc
        for name, exp in expected.items():
            err = compare_arrays(actual[name], exp, *graph_tolerance(precision, exp))
            if not err.ok:
                raise PassError(f"the optimized graph differs from {source} on output {name!r} by {err.max_abs:.3g}")
            worst[name] = max(worst.get(name, 0.0), err.max_abs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        onnx.save_model(optimized, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return [r.to_json() for r in records], worst


def _verification_data(model: onnx.ModelProto, spec, source: Path, feed: tuple[str, ...],
                       verify: bool) -> tuple[list[dict], list[dict]]:
    """The feeds ``optimize`` compares on (the user's ``--feed`` files, else seeded random data at the spec's
    shape points) and the original graph's outputs on them. Feeds the original cannot run on are refused in
    one line (``UsageError``), or, with ``verify`` off, dropped with a warning: nothing is compared then."""
    from exporter.resolve import check_assumed  # noqa: PLC0415 - imports torch

    if feed:
        given = read_feeds(feed, spec.names)
        if missing := [n for n in spec.names if n not in given]:
            raise UsageError(f"--feed gives no array for input {', '.join(missing)}; add NAME=FILE.npy, or an .npz "
                             f"holding every input by name ({', '.join(spec.names)})")
        points, feeds, data = ("--feed",), [given], "the --feed data"
    else:
        check_assumed(spec, str(source))
        points = ("min", "max") if spec.is_dynamic else ("opt",)
        feeds = [spec.random_feeds(p, seed=i) for i, p in enumerate(points)]
        data = f"random data at the input spec {spec}"
    references = []
    for point, f in zip(points, feeds):
        try:
            references.append(run_graph(model, f))
        except Exception as exc:  # ONNX Runtime raises its own types
            reason = (f"{source} cannot be verified on {data}: ONNX Runtime fails on the original graph at the "
                      f"{point} shapes {({k: list(v.shape) for k, v in f.items()})}: {str(exc).splitlines()[0][:300]}")
            if verify:
                raise UsageError(f"{reason}. Pass --feed NAME=FILE.npy (or FILE.npz) with inputs it runs on, --input "
                                 "NAME:DTYPE:[DIMS]:LO..HI with shapes and value ranges it runs on, or "
                                 "--no-verify-passes") from exc
            logger.warning("%s; the optimized graph is not compared with it (--no-verify-passes)", reason)
            return [], []
    return feeds, references


def trt_graph(source: str, inputs: tuple[str, ...] = (), as_is: bool = False) -> tuple[onnx.ModelProto, str]:
    """The graph TensorRT would get from ``source``: a bundle's trt graph (verified), or the ``trt`` pipeline's
    output for an .onnx file or a MODEL (exported first); ``as_is``: an .onnx file unchanged."""
    from engines.bundle import verified_path  # noqa: PLC0415

    path = Path(source)
    if path.is_dir() and (path / "manifest.json").exists():
        manifest = read_manifest(path)
        graph = verified_path(path, manifest, manifest.backends.trt.graph)
        return onnx.load(str(graph)), str(graph)
    from exporter.resolve import check_assumed, load_onnx, resolve, spec_from_onnx  # noqa: PLC0415 - imports torch

    if source.endswith(".onnx"):
        model = load_onnx(path)
        if as_is:
            return model, str(path)
        spec = spec_from_onnx(model).override(inputs)
        check_assumed(spec, source)
        described = f"the trt pipeline's output for {source}"
    else:
        if as_is:
            raise UsageError(f"--as-is takes an .onnx file; {source} is a MODEL, which is exported first")
        from exporter.export import export_onnx  # noqa: PLC0415 - imports torch's exporter

        resolved = resolve(source, Path("build") / ".cache")
        spec = resolved.input_spec.override(inputs)
        with tempfile.TemporaryDirectory(prefix="planforge-check-trt-") as tmp:
            export_onnx(resolved.module, spec, resolved.output_names, Path(tmp) / "model.onnx")
            model = onnx.load(str(Path(tmp) / "model.onnx"))
        described = f"the trt pipeline's output for {source} (exported)"
    optimized, _ = PassManager(pipeline("trt", "fp32")).run(model)
    return optimized, described


def inspect_path(console, path: Path) -> None:
    if path.is_dir():

        inspect_bundle(console, path, read_manifest(path))
        return
    from exporter.resolve import load_onnx  # noqa: PLC0415 - imports torch

    model = load_onnx(path)
    initializers = {i.name for i in model.graph.initializer}

    def describe(values):
        return [(v.name, ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?"),
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    ops = collections.Counter(n.op_type for n in model.graph.node)
    inspect_onnx(console, path, describe(i for i in model.graph.input if i.name not in initializers),
                 describe(model.graph.output), dict(ops))


def run_bundle(bundle: Path, inputs: tuple[str, ...], random_point: str | None, backend: str,
               save_outputs: Path | None = None):
    """(backend used, outputs): inputs read and checked before the engine loads."""
    spec = read_manifest(bundle).inputs
    if random_point:
        feeds = spec.random_feeds(random_point, seed=0)
    else:
        feeds = read_feeds(inputs, spec.names)
        if not feeds:
            raise UsageError(f"give --feed [NAME=]FILE for {', '.join(spec.names)} or --random opt")
        spec.check_feeds(feeds)
    if save_outputs is not None and Path(save_outputs).suffix != ".npz":
        raise UsageError(f"--save-outputs {save_outputs}: expected a .npz file name")
    with load(bundle, backend=backend) as engine:
        outputs = engine.infer(feeds)
        used = engine.backend
    if save_outputs is not None:
        write_atomic(Path(save_outputs), _npz_bytes(outputs))
    return used, outputs


def read_feeds(items: tuple[str, ...], names: list[str]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy``, ``FILE.npz`` (arrays named after inputs) or ``FILE.npy`` for a single input."""
    feeds: dict[str, np.ndarray] = {}
    for item in items:
        name, sep, file = item.partition("=") if "=" in item else ("", "", item)
        path = Path(file)
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                if sep:
                    if name not in arrays:
                        raise UsageError(f"--feed {item}: {path} has no array {name!r} (it has {', '.join(arrays)})")
                    arrays = {name: arrays[name]}
                feeds.update(arrays)
            else:
                if not sep:
                    if len(names) != 1:
                        raise UsageError(f"--feed {item}: the model has inputs {', '.join(names)}; write NAME=FILE.npy "
                                         "or give an .npz holding them by name")
                    name = names[0]
                feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RuntimeInputError(f"--feed {item}: cannot read {path} as a NumPy array ({exc})") from exc
    return feeds


def summarize_outputs(outputs: dict[str, np.ndarray]) -> dict[str, dict]:
    summary = {}
    for name, value in outputs.items():
        v = value.astype(np.float64) if value.size else np.zeros(1)
        summary[name] = {"dtype": str(value.dtype), "shape": list(value.shape), "min": float(v.min()),
                         "max": float(v.max()), "mean": float(v.mean())}
    return summary


def describe_path(path: Path) -> dict:
    """``inspect --json``: a bundle's manifest, or an .onnx file's inputs, outputs and op counts."""
    if path.is_dir():
        return read_manifest(path).to_json()
    from exporter.resolve import load_onnx  # noqa: PLC0415 - imports torch

    model = load_onnx(path)
    initializers = {i.name for i in model.graph.initializer}

    def describe(values):
        return [{"name": v.name, "dtype": ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?"),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"path": str(path), "inputs": describe(i for i in model.graph.input if i.name not in initializers),
            "outputs": describe(model.graph.output),
            "ops": dict(collections.Counter(n.op_type for n in model.graph.node))}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
