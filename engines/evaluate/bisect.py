"""``planforge debug --bisect``: the smallest set of the suspected nodes whose higher precision brings a
side's outputs within budget.

It reuses the build's machinery rather than a second implementation: the side's FP32 graph is rebuilt
from the bundle's export with the passes the build ran (and must hash to what ``calibration.json``
recorded for INT8), the suspected nodes become units (for INT8, the quantizer units holding them or the
nearest ones upstream), and the build's ``FallbackSearch`` with ``TargetTrials`` (INT8) or the FP16
pass's ``keep`` list (FP16) finds which to keep in float, the units the build already kept staying there.
The budget: the bundle's INT8 budget, or ``relerr=0.02`` for FP16 (its graph tolerance), or ``--budget``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.build.int8.sensitivity import FallbackSearch, TargetTrials, Trial, run_target
from engines.build.stages import int8_opset
from engines.bundle import Manifest, verified_path
from foundation.numerics import Budget, budget_metric, relative_squared_error
from passes import PassManager, pipeline
from passes.base import flatten
from passes.calibration import graph_sha256, load_ranges
from passes.freeze_shapes import FreezeInputShapes
from passes.quantization import Unit

logger = logging.getLogger(__name__)

FP16_BUDGET = "relerr=0.02"  # the FP16 graph tolerance, 2e-2 * max|ref| (+1e-3), as a budget
TIME_LIMIT = 300.0


def bisect(manifest: Manifest, bundle, side: str, exported: onnx.ModelProto, candidate: onnx.ModelProto,
           feeds: list[dict], suspected: list[str], budget_text: str | None = None,
           time_limit: float = TIME_LIMIT) -> dict:
    precision = manifest.backends.for_target(side).precision
    if precision == "fp32":
        return {"passed": False, "reason": "the graph is FP32: no node can be kept in a higher precision; the "
                "difference comes from the weights or the passes"}
    if precision == "int8":
        trials, units, base, budget = _int8(manifest, bundle, side, exported, feeds, budget_text)
        if isinstance(trials, str):
            return {"passed": False, "reason": trials}
        evaluate = trials.evaluate
    else:
        budget = Budget.parse(budget_text or FP16_BUDGET, None)
        fp32 = _fp32(manifest, side, exported)
        units = [Unit(n.name, n.op_type, (n.name,)) for n in fp32.graph.node if n.name]
        base = tuple(n["name"] for n in manifest.fp16_fp32_nodes)
        evaluate = _fp16_trials(manifest, side, exported, fp32, feeds, budget)
    suspects = _suspected_units(units, candidate, suspected)
    if not suspects:
        return {"passed": False, "reason": f"none of {', '.join(suspected)} (or what feeds them) is a unit the "
                f"{precision} conversion can keep in float"}
    current = evaluate(base)
    if budget.met(current.value):
        return {"passed": True, "kept": [], "metric": f"{budget.metric} {current.value:.4g} ({budget})",
                "evaluations": 1, "reason": "the outputs are within the budget already"}
    search = FallbackSearch(suspects, lambda exclude: evaluate(tuple(exclude) + base), budget, side, time_limit,
                            current.error)
    found = search.run()
    evaluations = search.evaluations + 1
    if found is None:
        return {"passed": False, "evaluations": evaluations, "suspected": [u.name for u in suspects],
                "reason": f"keeping every suspected unit ({len(suspects)}) in float does not meet {budget} "
                          f"({budget.metric} = {search.last:.4g}): the error comes from elsewhere too"}
    trial, kept = found
    logger.info("bisect: %d of %d suspected units in float meet %s (%s = %.4g, %d evaluations)", len(kept),
                len(suspects), budget, budget.metric, trial.value, evaluations)
    return {"passed": True, "kept": [u.name for u in kept], "suspected": [u.name for u in suspects],
            "metric": f"{budget.metric} {trial.value:.4g} ({budget})", "evaluations": evaluations}


def _fp32(manifest: Manifest, side: str, exported: onnx.ModelProto, precision: str = "fp32",
          keep: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The side's graph rebuilt from the export with the passes the build ran (their names are recorded)."""
    ran = {r["name"] for r in manifest.passes.get(side, ())}
    names = {s.name for s in flatten(pipeline(side, precision, keep=keep))}
    steps = pipeline(side, precision, skip=tuple(sorted(names - ran - {"FreezeInputShapes"})), keep=keep)
    if "FreezeInputShapes" in ran:
        steps = [FreezeInputShapes(manifest.inputs.shapes("opt")), *steps]
    return PassManager(steps, quiet=True).run(exported)[0]


def _int8(manifest: Manifest, bundle, side: str, exported: onnx.ModelProto, feeds: list[dict], budget_text):
    report, calibration = manifest.int8_report(side), manifest.calibration
    if report is None or calibration is None:
        return "the bundle records no INT8 calibration for this side", None, None, None
    fp32 = _fp32(manifest, side, int8_opset(exported, {}))
    ranges = load_ranges(verified_path(bundle, manifest, calibration.file), side, graph_sha256(fp32),
                         calibration.data_sha256, calibration.method)
    if ranges is None:
        return ("the side's FP32 graph rebuilt from model.onnx does not hash to the one calibration.json was "
                "measured on (another planforge version?); rebuild the bundle"), None, None, None
    budget = Budget.parse(budget_text, None).for_inputs(manifest.inputs.names) if budget_text else report.budget
    form = (report.form or {}).get("form") if side == "ort" else None
    if side == "ort" and form is None:
        return "the bundle records no ONNX Runtime INT8 form for this side; rebuild it", None, None, None
    trials = TargetTrials(fp32, side, ranges, feeds, budget, calibration.state, form)
    units = trials.units()
    kept = {n for k in report.kept_float for n in (k["name"], *k.get("with", ()))}
    base = tuple(n for u in units if u.name in kept for n in u.nodes)
    return trials, units, base, budget


def _fp16_trials(manifest, side, exported, fp32, feeds, budget):
    reference = run_target(fp32, feeds, "trt")
    names = [o.name for o in fp32.graph.output]

    def evaluate(exclude: tuple[str, ...]) -> Trial:
        model = _fp32(manifest, side, exported, "fp16", keep=tuple(exclude))
        outputs = run_target(model, feeds, "trt")
        as_float = [[np.asarray(o, np.float32) for o in batch] for batch in outputs]
        return Trial(
            model, budget_metric(budget, reference, as_float, names), relative_squared_error(reference, as_float)
        )

    return evaluate


def _suspected_units(units: list[Unit], candidate: onnx.ModelProto, suspected: list[str]) -> list[Unit]:
    """The units holding the suspected nodes, else the nearest units upstream of them in ``candidate``."""
    by_node = {n: u for u in units for n in u.nodes}
    graph = gs.import_onnx(candidate)
    nodes = {n.name: n for n in graph.nodes}
    found: dict[str, Unit] = {}
    for name in suspected:
        todo, seen = [nodes.get(name)], set()
        while todo:
            node = todo.pop(0)
            if node is None or node.name in seen or len(seen) > 64:
                continue
            seen.add(node.name)
            if node.name in by_node:
                found.setdefault(by_node[node.name].name, by_node[node.name])
                continue
            todo += [t.inputs[0] for t in node.inputs if t.inputs]
    return [u for u in units if u.name in found]
