"""``planforge bench-prune``: planforge's structured pruning against Torch-Pruning and NNCF on the same model,
the same units, the same held-out data and the same timing.

For each bundle built with ``--prune`` (its ``Accuracy.prune`` names the budget, the calibration source, the
held-out batches and the units each group kept), at the bundle's own allocation and at every ``--ratio`` asked
(every group at that ratio), each configuration a count of units kept per group:

- ``planforge``: the exported graph pruned by ``passes.prune_units`` (importance and least-squares refit
  from the calibration data, measured once), as the build does;
- ``torch-pruning`` and ``nncf``: each in its own process (``prune_worker.py``, with the peers' packages
  on its ``PYTHONPATH``), pruning the PyTorch module the bundle was built from to the same counts of the
  same units, exported with planforge's exporter;
- ``dense``: the unpruned export, the speed-up's denominator.

Every ONNX file is then treated alike: the budget's metric on the bundle's held-out batches against the
unpruned export (the float graph run as written, as the build judges), ``passed`` by the bundle's budget,
initializer parameters (and how many are zero), and ONNX Runtime CPU latency of its ``ort`` FP32 graph
(planforge's fusions applied to every method's graph) on the first held-out batch, in ``ROUNDS``
alternating rounds so drift falls on every method alike (median of all runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.build.int8 import run_target
from engines.build.int8.data import load_calibration
from engines.build.prune import ort_graph, params, prune_graph
from engines.bundle.evaluation import load_evaluation
from engines.bundle.store import read_manifest
from engines.evaluate.bench.environment import LoadWatch, worker_failure
from engines.evaluate.bench.timing import ROUNDS
from foundation.errors import UsageError
from foundation.numerics import budget_metric
from foundation.ort_session import time_runs
from passes.prune_match import unit_groups
from passes.prune_units import kept_count, measure
from passes.verify import session

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("prune_worker.py")
PEERS = ("torch-pruning", "nncf")
METHODS = ("planforge", *PEERS)


@dataclasses.dataclass(frozen=True)
class PruneBenchRequest:
    bundles: tuple[Path, ...]
    ratios: tuple[float, ...] = ()  # besides each bundle's own
    methods: tuple[str, ...] = METHODS
    peers_path: Path | None = None  # where the peers' packages are (PYTHONPATH of the worker)
    threads: int = 2
    runs: int = 10  # timed runs per round
    cache_dir: Path = Path("build/.cache")
    timeout_s: float = 1800.0


def bench_prune(request: PruneBenchRequest, on_row=lambda row: None) -> dict:
    unknown = sorted(set(request.methods) - set(METHODS))
    if unknown:
        raise UsageError(f"--method {', '.join(unknown)}: expected one of {', '.join(METHODS)}")
    rows = []
    with LoadWatch() as watch:
        for bundle in request.bundles:
            rows += _bench_bundle(Path(bundle), request, on_row)
        environment = watch.environment()
    return {"request": {"bundles": [str(b) for b in request.bundles], "ratios": list(request.ratios),
                        "methods": list(request.methods), "threads": request.threads, "rounds": ROUNDS,
                        "runs": request.runs},
            "rows": rows, "environment": environment}


def _bench_bundle(bundle: Path, request: PruneBenchRequest, on_row) -> list[dict]:
    manifest = read_manifest(bundle)
    report = manifest.accuracy.prune if manifest.accuracy else None
    if report is None:
        raise UsageError(f"{bundle}: expected a bundle built with --prune (its manifest records the budget and "
                         "the calibration data); found none: rebuild it with --prune auto")
    if not report.evaluation_file or not (bundle / report.evaluation_file).exists():
        raise UsageError(f"{bundle}: its held-out batches ({report.evaluation_file or 'not kept'}) are missing; "
                         "rebuild it with --prune")
    evaluation = load_evaluation(bundle / report.evaluation_file)
    base = onnx.load(str(bundle / "model.onnx"))
    names = [o.name for o in base.graph.output]
    reference = run_target(base, evaluation, "trt")
    groups = unit_groups(gs.import_onnx(base))
    configs = [{"ratio": round(report.ratio, 4), "allocation": report.allocation,
                "kept": report.kept or {g.name: kept_count(g.count, report.ratio, 1 if g.block > 1 else 8)
                                        for g in groups}}] if report.ratio > 0 else []
    configs += [{"ratio": r, "allocation": "uniform",
                 "kept": {g.name: kept_count(g.count, r, 1 if g.block > 1 else 8) for g in groups}}
                for r in sorted(set(request.ratios))]
    name = manifest.model.name if manifest.model.kind == "zoo" else Path(manifest.model.source).name
    if name == "model":  # a Hugging Face directory shipped inside a package: name it by its package
        name = Path(manifest.model.source).parent.name
    candidates: list[tuple[dict, onnx.ModelProto]] = [({"method": "dense", "ratio": 0.0}, base)]
    with tempfile.TemporaryDirectory(prefix="planforge-bench-prune-") as tmp:
        if "planforge" in request.methods and configs:
            calibration = _calibration(bundle, manifest, report, request)
            moments = measure(base, groups, calibration)
            for config in configs:
                pruned, result = prune_graph(base, 0.0, calibration, moments, config["kept"])
                candidates.append(({"method": "planforge", "ratio": config["ratio"],
                                    "allocation": config["allocation"],
                                    "units_removed": result.stats.get("units_removed", 0)}, pruned))
        for method in (m for m in PEERS if m in request.methods):
            for row in _peer(method, bundle, configs, Path(tmp), request):
                file = row.pop("file", None)
                candidates.append((row, onnx.load(file) if file else None))
        rows = []
        for row, model in candidates:
            row = {"model": name, "bundle": str(bundle), **row}
            if model is not None:
                value = float(budget_metric(report.budget, reference, run_target(model, evaluation, "trt"),
                                            names, evaluation))
                row.update(params=params(model), zero_params=_zeros(model), metric=round(value, 5),
                           budget=str(report.budget), passed=bool(report.budget.met(value)))
            rows.append(row)
        _time(rows, [m for _, m in candidates], evaluation[0], request)
    for row in rows:
        on_row(row)
    return rows


def _calibration(bundle: Path, manifest, report, request: PruneBenchRequest) -> list[dict]:
    """The calibration batches the build measured its statistics on (its ``--calib``, or the zoo's data)."""
    from exporter.resolve import resolve_bundle_model  # noqa: PLC0415 - imports torch
    from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

    model = manifest.model
    module = None
    if report.calibration is None:  # the zoo's own data, which some entries make with the module
        resolved = resolve_bundle_model(model.source, model.source_sha256, request.cache_dir, bundle=bundle,
                                        relative=model.relative, weights=model.weights_sha256)
        module = resolved.module
    entry = BY_NAME.get(model.name) if model.kind == "zoo" else None
    return load_calibration(report.calibration, manifest.inputs, entry, module, allow_random=True).calibration


def _peer(method: str, bundle: Path, configs: list[dict], out: Path, request: PruneBenchRequest) -> list[dict]:
    if not configs:
        return []
    request_path = out / f"{method}.json"
    request_path.write_text(json.dumps({"bundle": str(bundle.resolve()), "cache_dir": str(request.cache_dir),
                                        "out": str(out), "configs": configs, "threads": request.threads}))
    path = [str(request.peers_path)] if request.peers_path else []
    env = dict(os.environ, OMP_NUM_THREADS=str(request.threads), PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(path + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    logger.info("bench-prune: %s on %s", method, bundle)
    try:
        done = subprocess.run([sys.executable, str(WORKER), method, str(request_path)], capture_output=True,
                              text=True, timeout=request.timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return [{"method": method, "ratio": c["ratio"], "allocation": c["allocation"],
                 "skipped": f"timed out after {request.timeout_s:.0f} s"} for c in configs]
    if done.returncode != 0:
        last = worker_failure(done)
        if "No module named" in last:
            last += " (make bench-prune installs the peers into build/peers/prune; --peers-path DIR)"
        logger.warning("bench-prune: %s failed: %s", method, last)
        return [{"method": method, "ratio": c["ratio"], "allocation": c["allocation"], "skipped": last}
                for c in configs]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _zeros(model: onnx.ModelProto) -> int:
    from onnx import numpy_helper  # noqa: PLC0415

    return int(sum(np.count_nonzero(numpy_helper.to_array(t) == 0) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT))


def _time(rows: list[dict], models: list, feed: dict, request: PruneBenchRequest) -> None:
    """Latency and speed-up of every row with a graph, timed in alternating rounds (module docstring)."""
    sessions = {i: session(ort_graph(m), optimize=True, threads=request.threads)
                for i, m in enumerate(models) if m is not None}
    feeds = {i: {k: v for k, v in feed.items() if k in {x.name for x in s.get_inputs()}}
             for i, s in sessions.items()}
    times: dict[int, list[float]] = {i: [] for i in sessions}
    for _ in range(ROUNDS):
        for i, sess in sessions.items():
            times[i] += time_runs(sess, feeds[i], warmup=2, runs=request.runs)
    dense = statistics.median(times[0])
    for i, row in enumerate(rows):
        if i in times:
            median = statistics.median(times[i])
            row["latency_ms"], row["speedup"] = round(median, 3), round(dense / median, 3)


def plot(doc: dict, target) -> None:
    """Metric against speed-up per method and model, as PNG into ``target``."""
    import matplotlib  # noqa: PLC0415 - matplotlib is heavy; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = sorted({r["model"] for r in doc["rows"]})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in ("dense", *METHODS):
            points = sorted((r["speedup"], r["metric"]) for r in doc["rows"]
                            if r["model"] == model and r["method"] == method and "speedup" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        budget = next((r["budget"] for r in doc["rows"] if r["model"] == model and "budget" in r), "")
        ax.set(title=f"{model}\n{budget}", xlabel="speed-up over dense (ONNX Runtime CPU)", ylabel="budget metric")
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=110)
    plt.close(fig)
