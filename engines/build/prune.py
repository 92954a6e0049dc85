"""The pruning stage of a build (``planforge build --prune auto|RATIO``): MLP hidden units, convolution
channels and attention heads removed from the exported graph before either target's passes
(``passes/prune_units.py``), under the same accuracy budget, metric and calibration data as INT8.

Pruning runs on the exported ONNX graph rather than the PyTorch module: a bring-your-own ONNX file benefits
as much as an exported model, the importance and refit read the activations the bundle really computes,
and the result goes through the same fusions, FP16 and INT8 as any graph (``--prune auto --precision int8``
prunes, then INT8's own budget search quantizes what is left).

``auto`` tries two searches and keeps the one that removes more parameters within the budget, the statistics
measured once: **uniform**, the largest ratio of a grid of ``STEP`` for every group (a bisection over the
grid: the metric falls as the ratio grows), and **by sensitivity**, each group its own ratio: every group
is measured alone at ``PROBE``, its loss at other ratios predicted along its importance curve, the groups'
losses added (``allocation_plans``), and a bisection over the greedy sequence of steps that save the most
parameters per unit of predicted loss (all-MiniLM-L6-v2: 10 % of the groups' parameters at cosine 0.990,
where uniform keeps 5 %). ``auto`` stops at ``MARGIN`` (70 %) of the budget's loss rather than at its
edge: a search that picks, among many tries, the last one inside the budget on the held-out batches lands
past it on other inputs (all-MiniLM-L6-v2 pruned to cosine 0.9902 on the held-out token states: pooled
sentence embeddings of 128 other sentences at 0.985 to PyTorch's, 87.5 % of nearest neighbours kept; with the
margin, 0.9933 held out: 0.988 and 89.8 %), and it leaves INT8 part of the budget when both are asked.
``RATIO`` prunes that much of every group and fails the build when the budget itself breaks. Judged on the
held-out batches, against the unpruned graph,
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
from engines.build.int8.forms import interleaved
from engines.build.request import Int8Options
from engines.bundle import PruneReport
from engines.bundle.evaluation import EVALUATION_FILE, save_evaluation
from foundation.errors import BuildError, UsageError
from foundation.numerics import Budget, budget_metric
from passes import PassManager, pipeline
from passes.base import to_model
from passes.prune_match import unit_groups
from passes.prune_units import PruneUnits, group_params, kept_count, measure, unit_scores
from passes.verify import session

logger = logging.getLogger(__name__)

STEP = 0.05
MAX_RATIO = 0.9
PROBE = 0.5  # the ratio each group is measured at alone (the allocation's sensitivity)
CAP = 4.0  # allocations predicted past this many times the budget's loss are not tried
MARGIN = 0.7  # auto keeps its loss within this share of the budget's (module docstring)


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
        self.calibration = options.calib
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
                                      evaluation_file=self.evaluation_file, calibration=self.calibration)
            return graph
        moments = measure(graph, groups, self.data.calibration)
        evaluation = self.data.evaluation
        names = [o.name for o in graph.graph.output]
        reference = self._outputs(graph, evaluation)
        tries: list[dict] = []

        def attempt(ratio: float, kept: dict[str, int] | None = None, how: str = "uniform"):
            model, result = prune_graph(graph, ratio, self.data.calibration, moments, kept)
            if kept is not None:  # an allocation's ratio: the share of the groups' parameters it removes
                ratio = 1 - result.stats["mlp_params_after"] / result.stats["mlp_params_before"]
            value = float(budget_metric(self.budget, reference, self._outputs(model, evaluation), names, evaluation))
            met = bool(self.budget.met(value)) and (self.requested != "auto" or self._within_margin(value))
            tries.append({"ratio": round(ratio, 3), "metric": round(value, 5), "met": met, "allocation": how})
            logger.info("prune %.2f (%s): %s %.5f (%s)", ratio, how, self.budget.metric, value,
                        "met" if met else "broken")
            return model, result, value, met, ratio

        if self.requested == "auto":
            best = self._search(attempt)
            allocated = self._allocate(attempt, graph, groups, moments, reference, names)
            if allocated is not None and (best is None or params(allocated[0]) < params(best[0])):
                best = allocated
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
            {g.name: g.count for g in groups}, stats.get("mlp_params_before", 0), stats.get("mlp_params_after", 0),
            tuple(tries), *_latencies(graph, None if chosen is graph else chosen, evaluation),
            round(time.perf_counter() - started, 1), units_removed=stats.get("units_removed", 0),
            params_before=params(graph), params_after=params(chosen), evaluation_file=self.evaluation_file,
            calibration=self.calibration, kept=dict(stats.get("kept", {})),
            allocation=next((t["allocation"] for t in reversed(tries) if t["met"] and t["ratio"] == round(ratio, 3)),
                            "uniform"), kinds={g.name: g.kind for g in groups})
        return chosen

    def _within_margin(self, value: float) -> bool:
        """``auto`` stops at ``MARGIN`` of the budget's loss, not at its edge (module docstring)."""
        if self.budget.metric == "user":
            return True
        return self.budget.loss(value) <= MARGIN * self.budget.loss(self.budget.threshold)

    def _allocate(self, attempt, graph, groups, moments, reference, names):
        """The most parameters a per-group allocation removes within the budget (module docstring): each
        group's loss measured alone at ``PROBE``, scaled along its importance curve to predict every ratio;
        greedy steps by parameters saved per predicted loss; a bisection over those steps, end to end."""
        allowed = MARGIN * self.budget.loss(self.budget.threshold)
        if self.budget.metric == "user" or allowed <= 0 or len(groups) < 2:
            return None
        probes = {}
        for group in groups:
            model, _ = prune_graph(graph, 0.0, self.data.calibration, moments, ratios={group.name: PROBE})
            value = budget_metric(self.budget, reference, self._outputs(model, self.data.evaluation), names,
                                  self.data.evaluation)
            probes[group.name] = max(self.budget.loss(float(value)), 1e-9)
        plans = [kept for kept, predicted in allocation_plans(groups, moments, probes) if predicted <= CAP * allowed]
        low, high, best = -1, len(plans) - 1, None  # indices: low meets (-1 = unpruned)
        while low < high:
            mid = (low + high + 1) // 2
            found = attempt(0.0, plans[mid], "by sensitivity")
            if found[3]:
                low, best = mid, found
            else:
                high = mid - 1
        return best

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


def prune_graph(graph: onnx.ModelProto, ratio: float, calibration: list[dict], moments,
                kept: dict[str, int] | None = None, ratios: dict[str, float] | None = None):
    """(``graph`` with ``ratio`` of its units removed and refit, the pass's result); ``moments`` from
    ``passes.prune_units.measure`` (measured once for every ratio); ``kept``/``ratios`` per group override it."""
    pruned = gs.import_onnx(graph)
    result = PruneUnits(ratio, calibration, moments=moments, kept=kept, ratios=ratios).run(pruned)
    return to_model(pruned, graph), result


def allocation_plans(groups, moments, probes: dict[str, float]) -> list[tuple[dict[str, int], float]]:
    """Per-group allocations, each removing more than the one before: (units kept per group, predicted loss).
    A group's loss at a kept count is predicted from its measured loss at ``PROBE`` (``probes``), scaled by
    the share of its importance removed (``unit_scores``, least important first); the losses of groups add
    (measured on all-MiniLM-L6-v2: the sum of the twelve groups' losses alone at 30 % is 0.059, the loss of
    all twelve together 0.057). Each step takes the next grid count of the group that saves the most
    parameters per unit of predicted loss."""
    options = {}
    for group in groups:
        scores = np.sort(unit_scores(group, moments[group.name]))
        total = float(scores.sum()) or 1.0
        multiple = 1 if group.block > 1 else 8
        counts = sorted({kept_count(group.count, r, multiple) for r in np.arange(STEP, MAX_RATIO + 1e-9, STEP)}
                        - {group.count}, reverse=True)
        per_unit = group_params(group) // group.count
        probe = float(scores[:group.count - kept_count(group.count, PROBE, multiple)].sum()) / total
        scale = probes[group.name] / max(probe, 1e-12)
        options[group.name] = [(k, scale * float(scores[:group.count - k].sum()) / total,
                                (group.count - k) * per_unit) for k in counts]
    step = {name: 0 for name in options}
    current = {group.name: (group.count, 0.0, 0) for group in groups}
    plans = []
    while True:
        best, efficiency = None, -1.0
        for name, choices in options.items():
            if step[name] < len(choices):
                kept, loss, saved = choices[step[name]]
                gain = (saved - current[name][2]) / max(loss - current[name][1], 1e-12)
                if gain > efficiency:
                    best, efficiency = name, gain
        if best is None:
            return plans
        current[best] = options[best][step[best]]
        step[best] += 1
        plans.append(({name: c[0] for name, c in current.items()}, sum(c[1] for c in current.values())))


def ort_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph the ``ort`` target runs for ``model`` in FP32 (its fusions): what latency is measured on."""
    return PassManager(pipeline("ort", "fp32")).run(model)[0]


def params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def _latencies(model: onnx.ModelProto, pruned: onnx.ModelProto | None, batches: list[dict],
               rounds: int = 30) -> tuple[float | None, float | None]:
    """Median ms of the ``ort`` pipeline's graph of ``model`` and of ``pruned`` (None: not timed) on the first
    evaluation batch (ONNX Runtime CPU, optimized), interleaved (INT8's ``interleaved``) so that drift falls on
    both alike."""
    if not batches:
        return None, None
    sessions = {k: session(ort_graph(m), optimize=True) for k, m in (("before", model), ("after", pruned))
                if m is not None}
    wanted = {i.name for i in sessions["before"].get_inputs()}
    latency, _ = interleaved(sessions, {k: v for k, v in batches[0].items() if k in wanted}, rounds)
    return latency["before"], latency.get("after")
