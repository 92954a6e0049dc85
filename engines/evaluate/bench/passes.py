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

from engines.evaluate.bench.timing import ROUNDS, time_session
from foundation.errors import UsageError
from passes import PassManager, pipeline

logger = logging.getLogger(__name__)



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


def bench_model(name: str, targets: list[str], threads: int = 2, warmup: int = 2, runs: int = 30,
                cache_dir: Path = Path("build/.cache")) -> list[PassBench]:
    """Export ``name`` once, then time the exported graph against each target's optimized graph."""
    from exporter.export import export_onnx  # noqa: PLC0415 - imports torch
    from exporter.resolve import resolve  # noqa: PLC0415 - imports torch

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


DEFAULT_OUT = Path("build/bench-passes.json")


def bench_zoo(names, targets, threads: int, runs: int, out: Path | None = None) -> tuple[list[PassBench], Path]:
    """Every zoo model when ``names`` is empty; the results also go to ``out`` (default ``DEFAULT_OUT``)."""
    from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

    check_zoo_names(names)
    results = [r for name in (list(names) or list(BY_NAME))
               for r in bench_model(name, list(targets), threads=threads, runs=runs)]
    out = Path(out or DEFAULT_OUT)
    write_json(results, out)
    return results, out


def check_zoo_names(names) -> None:
    from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

    unknown = [m for m in names if m not in BY_NAME]
    if unknown:
        raise UsageError(f"not zoo models: {', '.join(unknown)}; see 'planforge zoo'")


def write_json(results: list[PassBench], path: Path) -> None:
    rows = [dict(dataclasses.asdict(r), speedup=round(r.speedup, 3)) for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "passes", "results": rows}, indent=2) + "\n")
