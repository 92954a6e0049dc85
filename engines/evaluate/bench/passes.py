"""``planforge bench-passes``: what the passes buy on ONNX Runtime CPU, per zoo model.

For each model: export (dynamo, opset 18), run the pipeline for the target, then time the
exported and the optimized graph with the same session options (ONNX Runtime's own graph
optimizations on in both, the same thread count) at the input spec's opt shapes: warm-up runs,
then the median and p90 of timed runs. Speed targets live here, never in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

ROUNDS = 5  # alternating rounds of timed runs per graph


@dataclasses.dataclass
class PassBench:
    model: str
    target: str
    nodes_before: int
    nodes_after: int
    pass_seconds: float
    exported_ms: float
    optimized_ms: float
    exported_p90_ms: float
    optimized_p90_ms: float
    shapes: dict

    @property
    def speedup(self) -> float:
        return self.exported_ms / self.optimized_ms if self.optimized_ms else float("nan")


def session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime with its own graph optimizations on and ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def time_session(path: Path, feeds: dict[str, np.ndarray], threads: int, warmup: int, runs: int) -> list[float]:
    sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench_model(name: str, targets: list[str], threads: int = 2, warmup: int = 2, runs: int = 30,
                cache_dir: Path = Path("build/.cache")) -> list[PassBench]:
    """Export ``name`` once, then time the exported graph against each target's optimized graph."""
    from exporter.export import export_onnx  # noqa: PLC0415
    from exporter.resolve import resolve  # noqa: PLC0415
    from passes import PassManager, pipeline  # noqa: PLC0415

    model = resolve(name, cache_dir)
    feeds = model.input_spec.random_feeds("opt", seed=0)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    results = []
    with tempfile.TemporaryDirectory(prefix="planforge-bench-") as tmp:
        exported = Path(tmp) / "model.onnx"
        export_onnx(model.module, model.input_spec, model.output_names, exported)
        graph = onnx.load(str(exported))
        for target in targets:
            start = time.perf_counter()
            optimized, _ = PassManager(pipeline(target, "fp32")).run(graph)
            pass_seconds = time.perf_counter() - start
            optimized_path = Path(tmp) / f"model.{target}.onnx"
            onnx.save_model(optimized, str(optimized_path))
            base, opt = [], []
            for _ in range(ROUNDS):  # interleave, so drift in machine load hits both alike
                base += time_session(exported, feeds, threads, warmup, max(1, runs // ROUNDS))
                opt += time_session(optimized_path, feeds, threads, warmup, max(1, runs // ROUNDS))
            results.append(PassBench(name, target, len(graph.graph.node), len(optimized.graph.node), pass_seconds,
                                     statistics.median(base), statistics.median(opt), _p90(base), _p90(opt), shapes))
            logger.info("%s/%s: %d -> %d nodes, %.2f -> %.2f ms", name, target, results[-1].nodes_before,
                        results[-1].nodes_after, results[-1].exported_ms, results[-1].optimized_ms)
    return results


def _p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def bench_zoo(names: list[str], targets: list[str], threads: int, runs: int) -> list[PassBench]:
    return [r for name in names for r in bench_model(name, targets, threads=threads, runs=runs)]


def write_json(results: list[PassBench], path: Path) -> None:
    rows = [dict(dataclasses.asdict(r), speedup=round(r.speedup, 3)) for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "passes", "results": rows}, indent=2) + "\n")


def bench_int8(names: list[str], threads: int, runs: int, out: Path) -> tuple[list, dict]:
    """INT8 rows per model (``engines.evaluate.bench.int8``) and where they ran, also written to ``out``."""
    from engines.evaluate.bench.int8 import bench_int8_model  # noqa: PLC0415

    from engines.evaluate.bench.environment import LoadWatch  # noqa: PLC0415

    with LoadWatch() as load:
        rows = [row for name in names for row in bench_int8_model(name, threads=threads, runs=runs)]
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "int8", "threads": threads, "environment": load.environment(),
           "results": [dataclasses.asdict(r) for r in rows]}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return rows, doc["environment"]
