"""``planforge build --sparsity 2:4``: the TensorRT graph's eligible weights made 2:4 sparse
(``passes/sparsify_24.py``) under the build's accuracy budget, and TensorRT's ``SPARSE_WEIGHTS`` flag set.

Runs on the ``trt`` target's FP32 graph after its passes, before FP16 conversion or INT8 (which keep the
zeros). Judged as every trt graph is: float emulation on ONNX Runtime (graph optimizations off) against
the dense graph, on the held-out batches, with the INT8 budget and metric. When every eligible layer at
2:4 breaks the budget, each layer's metric alone is measured, and the layers are made sparse from the
least harmful on while the budget holds (a bisection over that order); the rest stay dense. Only TensorRT
has sparse kernels: the ``ort`` graph stays dense (ONNX Runtime runs zeros at dense speed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.build.int8 import run_target
from engines.build.int8.data import load_calibration
from engines.build.request import Int8Options
from engines.bundle import SparsityReport
from engines.bundle.evaluation import EVALUATION_FILE, save_evaluation
from foundation.errors import UsageError
from foundation.numerics import Budget, budget_metric
from passes.base import to_model
from passes.sparsify_24 import Sparsify24, eligible

logger = logging.getLogger(__name__)

PATTERNS = ("2:4",)


def parse_sparsity(value: str | None) -> str | None:
    if value is None or value in PATTERNS:
        return value
    raise UsageError(f"--sparsity {value}: expected 2:4 (TensorRT's structured sparsity: 2 of every 4 input-channel "
                     "weights zero)")


class SparsityStage:
    """Calibration data, the budget, the search and the report (module docstring)."""

    def __init__(self, root: Path, pattern: str, options: Int8Options, model, spec):
        from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

        entry = BY_NAME.get(model.name) if model.kind == "zoo" else None
        self.pattern = pattern
        self.data = load_calibration(options.calib, spec, entry, model.module, options.allow_random_calibration)
        self.evaluation_file = EVALUATION_FILE if save_evaluation(root / EVALUATION_FILE, self.data.evaluation) \
            else None
        self.budget = Budget.parse(options.budget, model.task, options.metric_hook).for_inputs(spec.names)
        self.report: SparsityReport | None = None

    def apply(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        started = time.perf_counter()
        layers = [node.name for node, _, _ in eligible(gs.import_onnx(graph))]
        evaluation = self.data.evaluation
        names = [o.name for o in graph.graph.output]
        reference = _outputs(graph, evaluation)
        tries: list[dict] = []

        def attempt(sparse: list[str]):
            candidate = gs.import_onnx(graph)
            Sparsify24(only=tuple(sparse)).run(candidate)
            model = to_model(candidate, graph)
            value = float(budget_metric(self.budget, reference, _outputs(model, evaluation), names, evaluation))
            met = bool(self.budget.met(value))
            tries.append({"sparse": len(sparse), "metric": round(value, 5), "met": met})
            return model, value, met

        chosen, value, met = attempt(layers) if layers else (graph, None, True)
        sparse = list(layers) if met else []
        if layers and not met:
            logger.info("2:4 on all %d layers breaks the budget (%s %.4f): measuring each alone", len(layers),
                        self.budget.metric, value)
            alone = {}
            for layer in layers:
                _, score, _ = attempt([layer])
                alone[layer] = score
            better = self.budget.metric != "relerr"  # higher is better but for relative error
            order = sorted(layers, key=lambda n: -alone[n] if better else alone[n])
            low, high, best = 0, len(order) - 1, (graph, None, True)
            while low < high:  # the most layers, least harmful first, that keep the budget
                mid = (low + high + 1) // 2
                found = attempt(order[:mid])
                if found[2]:
                    low, best = mid, found
                else:
                    high = mid - 1
            chosen, value, met = best
            sparse = order[:low]
        dense = [n for n in layers if n not in set(sparse)]
        self.report = SparsityReport(self.pattern, self.budget, value, met, len(layers), tuple(sparse), tuple(dense),
                                     tuple(tries), round(time.perf_counter() - started, 1), self.evaluation_file)
        logger.info("2:4 sparsity: %d of %d eligible layers (%s %s)", len(sparse), len(layers), self.budget.metric,
                    "n/a" if value is None else f"{value:.4f}")
        return chosen


def _outputs(model: onnx.ModelProto, batches: list[dict]) -> list[list[np.ndarray]]:
    return run_target(model, batches, "trt")  # the trt graph as written: float emulation (INT8's one definition)
