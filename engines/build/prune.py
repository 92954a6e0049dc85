"""The pruning stage of a build (``planforge build --prune auto|RATIO``): MLP hidden units and convolution
channels removed from the exported graph before either target's passes (``passes/prune_units.py``), under the same accuracy budget,
metric and calibration data as INT8.

Pruning runs on the exported ONNX graph rather than the PyTorch module: a bring-your-own ONNX file benefits
as much as an exported model, the importance and refit read the activations the bundle really computes,
and the result goes through the same fusions, FP16 and INT8 as any graph (``--prune auto --precision int8``
prunes, then INT8's own budget search quantizes what is left).

``auto`` searches the largest ratio of a grid of ``STEP`` that keeps the budget (a bisection over the grid:
the metric falls as the ratio grows), the hidden-unit statistics measured once; ``RATIO`` prunes that much
and fails the build when the budget breaks. Judged on the held-out batches, against the unpruned graph,
as INT8 is (``foundation.numerics.budget_metric``). The report goes to the manifest (``Accuracy.prune``):
what was removed per group, parameters before and after, the budget's metric, every ratio tried, and the
ONNX Runtime CPU latency before and after (the ort pipeline's graph, one evaluation batch).
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
from engines.bundle import PruneReport
from engines.bundle.evaluation import EVALUATION_FILE, save_evaluation
from foundation.errors import BuildError, UsageError
from foundation.numerics import Budget, budget_metric
from foundation.ort_session import time_runs
from passes import PassManager, pipeline
from passes.base import to_model
from passes.prune_match import unit_groups
from passes.prune_units import PruneUnits, measure
from passes.verify import session

logger = logging.getLogger(__name__)

STEP = 0.05
MAX_RATIO = 0.9


def parse_prune(value: str | None) -> float | str | None:
    """``auto``, a ratio in (0, MAX_RATIO], or None; a ``UsageError`` naming what was expected."""
    if value is None:
        return None
    if value == "auto":
        return "auto"
    problem = UsageError(f"--prune {value}: expected auto or a ratio of units to remove, above 0 and at most "
                         f"{MAX_RATIO} (e.g. --prune 0.3)")
    try:
        ratio = float(value)
    except ValueError:
        raise problem from None
    if not 0 < ratio <= MAX_RATIO:
        raise problem
    return ratio


class PruneStage:
    """Calibration data, the budget, the search, and the report (module docstring)."""

    def __init__(self, root: Path, requested: float | str, options: Int8Options, model, spec):
        from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

        entry = BY_NAME.get(model.name) if model.kind == "zoo" else None
        self.requested = requested
        self.data = load_calibration(options.calib, spec, entry, model.module, options.allow_random_calibration)
        stored = save_evaluation(root / EVALUATION_FILE, self.data.evaluation)
        self.evaluation_file = EVALUATION_FILE if stored else None
        self.budget = Budget.parse(options.budget, model.task, options.metric_hook).for_inputs(spec.names)
        self.report: PruneReport | None = None

    def run(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        started = time.perf_counter()
        groups = unit_groups(gs.import_onnx(graph))
        if not groups:
            logger.warning("--prune: nothing to prune in this graph (no MLP: up-projection, elementwise activation, "
                           "down-projection; no pair of Convs with channel-wise ops between; or their units are read "
                           "elsewhere); the graph is unchanged")
            self.report = PruneReport(str(self.requested), 0.0, self.budget, None, True, 0, {}, 0, 0, (),
                                      None, None, round(time.perf_counter() - started, 1),
                                      evaluation_file=self.evaluation_file)
            return graph
        moments = measure(graph, groups, self.data.calibration)
        evaluation = self.data.evaluation
        names = [o.name for o in graph.graph.output]
        reference = self._outputs(graph, evaluation)
        tries: list[dict] = []

        def attempt(ratio: float):
            pruned = gs.import_onnx(graph)
            result = PruneUnits(ratio, self.data.calibration, moments=moments).run(pruned)
            model = to_model(pruned, graph)
            value = float(budget_metric(self.budget, reference, self._outputs(model, evaluation), names, evaluation))
            met = bool(self.budget.met(value))
            tries.append({"ratio": round(ratio, 3), "metric": round(value, 5), "met": met})
            logger.info("prune %.2f: %s %.5f (%s)", ratio, self.budget.metric, value, "met" if met else "broken")
            return model, result, value, met, ratio

        if self.requested == "auto":
            best = self._search(attempt)
            if best is None:
                logger.warning("--prune auto: no ratio of %.2f or more keeps the budget %s; the graph is unchanged",
                               STEP, self.budget)
                chosen, result, value, met, ratio = graph, None, None, True, 0.0
            else:
                chosen, result, value, met, ratio = best
        else:
            chosen, result, value, met, ratio = attempt(float(self.requested))
            if not met:
                raise BuildError(f"--prune {self.requested} breaks the budget {self.budget}: {self.budget.metric} "
                                 f"{value:.4f}; prune less, or use --prune auto to find the most the budget allows")
        stats = result.stats if result is not None else {}
        if not stats.get("units_removed"):  # a ratio too small to remove a multiple of 8 units: nothing changed
            chosen, ratio, stats = graph, 0.0, {}
        self.report = PruneReport(
            str(self.requested), ratio, self.budget, value, met, len(groups),
            {g.name: g.units for g in groups}, stats.get("mlp_params_before", 0), stats.get("mlp_params_after", 0),
            tuple(tries), _latency(graph, evaluation), _latency(chosen, evaluation) if chosen is not graph else None,
            round(time.perf_counter() - started, 1), units_removed=stats.get("units_removed", 0),
            params_before=_params(graph), params_after=_params(chosen), evaluation_file=self.evaluation_file)
        return chosen

    def _search(self, attempt):
        """The largest grid ratio that keeps the budget, by bisection over the grid (module docstring)."""
        low, high = 0, int(round(MAX_RATIO / STEP))  # indices: low meets (0 = unpruned), high is the top to try
        best = None
        while low < high:
            mid = (low + high + 1) // 2
            found = attempt(mid * STEP)
            if found[3]:
                low, best = mid, found
            else:
                high = mid - 1
        return best

    @staticmethod
    def _outputs(model: onnx.ModelProto, batches: list[dict]) -> list[list[np.ndarray]]:
        return run_target(model, batches, "trt")  # float graphs, run as written (INT8's one definition)


def _params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def _latency(model: onnx.ModelProto, batches: list[dict], runs: int = 20) -> float | None:
    """Median ms of the ``ort`` pipeline's graph on the first evaluation batch (ONNX Runtime CPU, optimized)."""
    if not batches:
        return None
    optimized, _ = PassManager(pipeline("ort", "fp32")).run(model)
    sess = session(optimized, optimize=True)
    wanted = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in batches[0].items() if k in wanted}
    return round(float(np.median(time_runs(sess, feed, warmup=3, runs=runs))), 3)
