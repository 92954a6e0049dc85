"""INT8 with an accuracy budget: quantize, measure, and keep the most sensitive layers in float.

1. Quantize every candidate layer (``passes.quantization.candidates``: Conv, ConvTranspose, Gemm,
   MatMul, including attention's activation-activation MatMuls, Gather embeddings, residual
   Adds; for the ``ort`` target also the other Adds and Muls ONNX Runtime's quantizer quantizes,
   ``passes.quantize_ort.units``) and measure the budget's metric against the FP32 graph on
   held-out batches (see "How each target is judged"). For ``ort`` this is done once per
   candidate form of this CPU's class, and the form is chosen (``engines.build.int8.forms``).
2. If the budget fails: quantize each candidate alone to measure its sensitivity, then leave
   candidates in float, most sensitive first, until the budget holds. What stays in float is
   decided here by measurement for every model, embeddings and attention included.

How each target is judged:
- ``trt``: by float emulation. ONNX Runtime runs the graph with its graph optimizations off, so
  every QuantizeLinear -> DequantizeLinear pair executes as written (round, clip, rescale in
  float) before a float op: the graph's own semantics, the same on every CPU. TensorRT
  accumulates INT8 products in 32 bits; ONNX Runtime's CPU integer kernels (which the optimized
  session would use) do not everywhere, so they would judge artifacts TensorRT does not have.
- ``ort``: by ONNX Runtime's CPU kernels with graph optimizations on, as the bundle runs, on this
  CPU; the manifest records the CPU class (``engines.runtime.cpu``) the verdict holds for.

Budgets (``foundation.numerics.Budget``): ``top1=0.99`` for classifiers, ``cosine=0.99`` for
embeddings and generation, ``relerr=0.05`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.build.int8.forms import FormChoice, Speed, candidates as form_candidates, choose, speed
from engines.bundle import Int8Report
from engines.bundle.manifest import INT8_MIN_SPEEDUP
from engines.runtime.cpu import detect
from foundation.numerics import Budget, budget_metric, kept_positions, relative_squared_error
from foundation.sequence import StatePairs, judged_outputs, run_sequence, select
from passes import InferShapes, PassManager
from passes.quantization import Unit, trt_units
from passes.quantize_ort import FORMS, QuantizeForOnnxRuntime, units as ort_units
from passes.quantize_trt import QuantizeForTensorRT
from passes.verify import session

logger = logging.getLogger(__name__)

QUANTIZERS = {"trt": QuantizeForTensorRT, "ort": QuantizeForOnnxRuntime}


SMALL = 16  # up to this many units, each is measured alone (groups would cost more than they save)
EMULATED = "float emulation (ONNX Runtime, graph optimizations off)"


def judged_by(target: str) -> str:
    """How ``target``'s accuracy is measured (module docstring)."""
    return EMULATED if target == "trt" else f"ONNX Runtime CPU kernels on {detect().isa}"


def run_target(model: onnx.ModelProto, batches: list[dict], target: str,
               state: StatePairs = ()) -> list[list[np.ndarray]]:
    """Outputs of ``model`` per batch, run the way ``target``'s accuracy is judged; with ``state``, as a
    sequence feeding its own state outputs back (``foundation.sequence``)."""
    sess = session(model, optimize=target != "trt")
    names = [o.name for o in sess.get_outputs()]
    return run_sequence(lambda feed: sess.run(names, feed), names, batches, state)


@dataclasses.dataclass
class Int8Result:
    model: onnx.ModelProto
    budget: Budget
    full_int8: float
    final: float
    kept_float: list[dict]
    sensitivity: dict[str, float]
    candidates: int
    judged_by: str
    cpu_isa: str  # the CPU class the measurements ran on
    form: FormChoice | None = None  # ort: the Q/DQ form chosen for this CPU class
    quantized: bool = True  # False: the target stays float (``reason`` says why); its graph holds no Q/DQ
    reason: str | None = None
    evaluations: int = 1  # quantized graphs measured on the evaluation batches
    speed: Speed | None = None  # ort: the graph's latency against the FP32 graph's on this CPU

    def report(self) -> Int8Report:
        """The manifest's record of this result."""
        timed = self.speed
        return Int8Report(self.budget, self.budget.met(self.final), self.full_int8, self.final, self.candidates,
                          tuple(self.kept_float), self.sensitivity, self.judged_by, self.cpu_isa,
                          self.form.to_json() if self.form else None, self.quantized, self.reason,
                          self.evaluations, timed.int8_ms if timed else None, timed.fp32_ms if timed else None,
                          timed.speedup if timed else None)


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


@dataclasses.dataclass
class Trial:
    """One evaluated graph: the budget's metric and the relative squared output error."""

    model: onnx.ModelProto
    value: float
    error: float


def quantize_target(fp32: onnx.ModelProto, target: str, ranges: dict, evaluation: list[dict], budget: Budget,
                    on_step: Callable[[str], None] = lambda s: None, ort_form: str = "auto",
                    time_limit: float | None = None, state: StatePairs = (),
                    reference: onnx.ModelProto | None = None) -> Int8Result:
    """Quantize ``fp32`` for ``target`` and fall back to float per unit until ``budget`` holds.

    ``ort_form``: ``auto`` measures the candidate forms of this CPU's class, or one form, forced.
    ``time_limit``: seconds for the fallback search; when it runs out, the best graph found is kept.
    A target whose budget holds only with every unit in float, or not at all, stays float
    (``quantized=False``): a graph without Q/DQ is never called INT8. ``state``: the evaluation batches
    are a sequence and each graph feeds its own state back (drift through the state counts). ``reference``: the
    graph the budget compares with, when not ``fp32`` (a pruned build's unpruned export: judged end to end)."""
    trials = TargetTrials(fp32, target, ranges, evaluation, budget, state, reference=reference)
    isa = detect().isa
    choice = None
    if target == "ort":
        choice = choose(form_candidates(isa, ort_form), isa, lambda f: trials.quantize((), f),
                        trials.measure, budget.loss, evaluation, state, fp32)
        trials.form = choice.form
    # what can stay float: what this target's quantizer touches (for ort, in the op set of the chosen form)
    units = trials.units()
    evaluate = trials.evaluate

    full = evaluate(())
    logger.info("INT8 %s: all %d units quantized: %s = %.4f (budget %s; %s)", target, len(units), budget.metric,
                full.value, budget, judged_by(target))
    done = functools.partial(Int8Result, budget=budget, full_int8=full.value, candidates=len(units),
                             judged_by=judged_by(target), cpu_isa=isa, form=choice)
    if not has_qdq(full.model):
        return _stays_float(done, fp32, target, full.value, {}, "the graph has no layer this target quantizes")
    if budget.met(full.value):
        return _timed(done(full.model, final=full.value, kept_float=[], sensitivity={}, evaluations=1), fp32,
                      evaluation)
    on_step(f"sensitivity ({target})")
    search = FallbackSearch(units, evaluate, budget, target, time_limit, full.error)
    found = search.run()
    evaluations = search.evaluations + 1
    if found is None:
        left = search.last_model is not None and has_qdq(search.last_model)
        reason = (f"the budget {budget} is not met even with every unit in float ({budget.metric} = "
                  f"{search.last:.4f})" if not left else
                  f"the budget {budget} is not met with every unit planforge can exclude in float "
                  f"({budget.metric} = {search.last:.4f}); Q/DQ remains on "
                  f"{_qdq_ops(search.last_model)}")
        return _stays_float(done, fp32, target, search.last, search.sensitivity, reason, evaluations)
    trial, kept_units = found
    if not has_qdq(trial.model):
        return _stays_float(done, fp32, target, trial.value, search.sensitivity, f"the budget {budget} holds only "
                            f"with every unit in float ({budget.metric} = {trial.value:.4f})", evaluations)
    kept = [{"name": u.name, "op": u.op, "target": target, "reason": search.why(u.name),
             **({"with": list(u.nodes[1:])} if len(u.nodes) > 1 else {})} for u in kept_units]
    logger.info("INT8 %s: %d of %d units kept in float; %s = %.4f (%d evaluations)", target, len(kept_units),
                len(units), budget.metric, trial.value, evaluations)
    return _timed(done(trial.model, final=trial.value, kept_float=kept, sensitivity=search.sensitivity,
                       evaluations=evaluations), fp32, evaluation)


def _timed(result: Int8Result, fp32: onnx.ModelProto, evaluation: list[dict]) -> Int8Result:
    """An ort result with its graph timed against ``fp32`` (``forms.speed``), logged with a WARNING when INT8 is
    not faster on this CPU; a trt graph runs on TensorRT, so its CPU time says nothing."""
    if result.form is None:
        return result
    timed = result.speed = speed(result.model, fp32, evaluation[0])
    if timed.speedup < INT8_MIN_SPEEDUP:
        logger.warning("INT8 ort is not faster than FP32 on this CPU (%s): %.2fx (FP32 %.4g ms, INT8 %.4g ms per "
                       "held-out batch, medians of %d interleaved runs); the FP32 graph serves at least as fast "
                       "without the INT8 error (--precision fp32)", result.cpu_isa, timed.speedup, timed.fp32_ms,
                       timed.int8_ms, timed.rounds)
    else:
        logger.info("INT8 ort: %.2fx FP32's speed on %s (FP32 %.4g ms, INT8 %.4g ms per held-out batch)",
                    timed.speedup, result.cpu_isa, timed.fp32_ms, timed.int8_ms)
    return result


class TargetTrials:
    """Quantize ``fp32`` for ``target`` with some units left in float, and judge the result against the FP32
    graph the way ``target`` is judged: the one definition of a trial, for the build's fallback search and
    ``planforge debug --bisect``."""

    def __init__(self, fp32: onnx.ModelProto, target: str, ranges: dict, evaluation: list[dict], budget: Budget,
                 state: StatePairs = (), form: str | None = None, reference: onnx.ModelProto | None = None):
        self.fp32, self.target, self.ranges, self.evaluation, self.budget = fp32, target, ranges, evaluation, budget
        self.state, self.form = state, form
        # ``reference``: the graph the budget is measured against when it is not ``fp32`` itself (a pruned build:
        # the unpruned export, so the final graph is judged end to end)
        self.reference = run_target(reference if reference is not None else fp32, evaluation, target, state)
        names = [o.name for o in fp32.graph.output]
        budget.check_outputs(names)
        self.names = names
        self.judged = judged_outputs(names, state) if budget.output is None and budget.metric != "user" else \
            list(range(len(names)))
        self.keeps = kept_positions(budget, self.reference, evaluation)  # padding counts for nothing (a mask)

    def measure(self, outputs: list[list[np.ndarray]]):
        return budget_metric(self.budget, select(self.reference, self.judged), select(outputs, self.judged),
                             names=[self.names[i] for i in self.judged], feeds=self.evaluation)

    def quantize(self, exclude: tuple[str, ...], form: str | None = None) -> onnx.ModelProto:
        form = form or self.form
        options = {"form": form} if form else {}
        quantizer = QUANTIZERS[self.target](ranges=self.ranges, exclude=exclude, **options)
        return PassManager([InferShapes(), quantizer], quiet=True).run(self.fp32)[0]

    def units(self) -> list[Unit]:
        graph = gs.import_onnx(self.fp32)
        return ort_units(graph, FORMS[self.form].op_types) if self.target == "ort" else trt_units(graph)

    def evaluate(self, exclude: tuple[str, ...]) -> Trial:
        model = self.quantize(exclude)
        outputs = run_target(model, self.evaluation, self.target, self.state)
        return Trial(model, self.measure(outputs), relative_squared_error(self.reference, outputs, self.keeps))


def _qdq_ops(model: onnx.ModelProto) -> str:
    """The ops reading a DequantizeLinear output, for a message."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    ops = sorted({n.op_type for n in model.graph.node if n.op_type != "QuantizeLinear" and dq & set(n.input)})
    return ", ".join(ops) or "graph outputs"


def _stays_float(done, fp32: onnx.ModelProto, target: str, value: float, sensitivity: dict, reason: str,
                 evaluations: int = 1) -> Int8Result:
    logger.warning("INT8 %s: %s; model.%s.onnx stays float", target, reason, target)
    return done(fp32, final=value, kept_float=[], sensitivity=sensitivity, quantized=False, reason=reason,
                evaluations=evaluations)


class FallbackSearch:
    """Which units stay in float: a best-first search that measures units only where it must, one INFO
    line per step (CLI logs show it on any output).

    The units in graph order are cut into about sqrt(N) contiguous groups (single units up to ``SMALL``
    of them), and each group is quantized
    alone (everything else float). Then, repeatedly, the item with the largest error is taken: a group is
    split, each of its units measured alone; a unit goes to float, and the budget is checked. Items are
    ordered by the budget's own metric measured alone, then by the relative squared output error
    (``relative_squared_error``), continuous where a budget such as top-1 on a few samples ties; squared
    errors roughly add, so a group's error bounds its units' and a unit is reverted only once no
    unmeasured group could hold a worse one. Evaluations: about sqrt(N)
    + the units of the groups split + the units reverted, instead of N + reverted one at a time.

    After ``time_limit`` seconds every unit not yet reverted stays in float (unmeasured units count as
    the most sensitive), so the search still returns a graph that meets the budget. Why this search and
    not another: docs/decisions/001-int8-fallback-search.md."""

    def __init__(self, units: list[Unit], evaluate: Callable[[tuple[str, ...]], Trial], budget: Budget,
                 target: str, time_limit: float | None, full_error: float = float("inf")):
        self.units, self.evaluate, self.budget, self.target = units, evaluate, budget, target
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.sensitivity: dict[str, float] = {}
        self.shared: set[str] = set()  # units ranked by their group's error, never measured alone
        self.last, self.last_model, self.last_error, self.evaluations = float("nan"), None, full_error, 0
        self.met_errors: list[float] = []
        self.failed_errors: list[float] = []

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def why(self, name: str) -> str:
        if name not in self.sensitivity:
            return "not measured before the INT8 time limit: kept in float to be safe"
        how = "its group's share" if name in self.shared else "quantized alone"
        return f"sensitivity: {how}, relative squared output error {self.sensitivity[name]:.3g}"

    def _alone(self, chosen: list[Unit]) -> Trial:
        """Only ``chosen`` quantized."""
        keep = {u.name for u in chosen}
        self.evaluations += 1
        return self.evaluate(tuple(n for u in self.units if u.name not in keep for n in u.nodes))

    def _groups(self) -> list[list[Unit]]:
        size = max(1, round(math.sqrt(len(self.units)))) if len(self.units) > SMALL else 1
        return [self.units[i:i + size] for i in range(0, len(self.units), size)]

    def run(self) -> tuple[Trial, list[Unit]] | None:
        """(graph, units in float) for the fewest units in float found to meet the budget, or None."""
        queue: list[tuple[float, float, int, list[Unit]]] = []  # (-budget loss, -error, order, units)
        groups = self._groups()
        for i, group in enumerate(groups):
            if self.expired():
                break
            trial = self._record(self._alone(group))
            heapq.heappush(queue, (-self.budget.loss(trial.value), -trial.error, i, group))
            if len(group) == 1:
                self.sensitivity[group[0].name] = trial.error
            logger.info("INT8 %s: group %d/%d (%d units from %s) alone: error %.3g, %s = %.4f", self.target, i + 1,
                        len(groups), len(group), group[0].name, trial.error, self.budget.metric, trial.value)
        reverted: list[Unit] = []
        failing = 0  # the longest prefix of ``reverted`` known to fail the budget
        order = len(groups)
        while queue:
            if self.expired():
                rest = [u for u in self.units if u not in reverted]
                logger.warning("INT8 %s: time limit reached; the %d units not yet reverted stay in float",
                               self.target, len(rest))
                self._share(queue)
                return self._step(reverted + rest)
            *_, item = heapq.heappop(queue)
            if len(item) > 1:  # a group: measure its units alone
                for unit in item:
                    trial = self._record(self._alone([unit]))
                    self.sensitivity[unit.name] = trial.error
                    order += 1
                    heapq.heappush(queue, (-self.budget.loss(trial.value), -trial.error, order, [unit]))
                logger.info("INT8 %s: split the group from %s: errors %s", self.target, item[0].name,
                            ", ".join(f"{self.sensitivity[u.name]:.3g}" for u in item))
                continue
            reverted.append(item[0])
            # squared errors roughly add: the last measured graph's error less what was reverted since
            predicted = self.last_error - sum(self.sensitivity.get(u.name, 0.0) for u in reverted[failing:])
            if queue and predicted > max(self.tolerable(), self.last_error / 2):
                continue  # predicted to fail: revert more before measuring (at least every halving)
            found = self._step(reverted)
            if found is None:
                failing = len(reverted)
                continue
            self._share(queue)
            return self._narrow(reverted, failing, found)
        if len(reverted) < len(self.units):  # the time limit cut the ranking short: the rest were never measured
            return self._step(reverted + [u for u in self.units if u not in reverted])
        return None

    def _record(self, trial: Trial) -> Trial:
        """Learn the error the budget tolerates from every measured graph."""
        (self.met_errors if self.budget.met(trial.value) else self.failed_errors).append(trial.error)
        return trial

    def tolerable(self) -> float:
        """The largest relative squared error seen to meet the budget, below any seen to fail it."""
        met = [e for e in self.met_errors if e < min(self.failed_errors, default=float("inf"))]
        return max(met, default=0.0)

    def _narrow(self, reverted: list[Unit], failing: int, found: tuple[Trial, list[Unit]]):
        """After a jump (several units reverted between two measurements), bisect for the shortest prefix
        of ``reverted`` that meets the budget: the jump may have gone past it."""
        good = len(found[1])
        while good - failing > 1 and not self.expired():
            middle = (good + failing) // 2
            trial = self._step(reverted[:middle], f"narrowing {failing + 1}..{good}")
            if trial is None:
                failing = middle
            else:
                good, found = middle, trial
        return found

    def _share(self, queue) -> None:
        """Units of groups never split get their group's error, shared, for the manifest."""
        for _, error, _, item in queue:
            for unit in item:
                if unit.name not in self.sensitivity and len(item) > 1:
                    self.sensitivity[unit.name] = -error / len(item)
                    self.shared.add(unit.name)

    def _step(self, in_float: list[Unit], what: str = "") -> tuple[Trial, list[Unit]] | None:
        self.evaluations += 1
        trial = self._record(self.evaluate(tuple(n for u in in_float for n in u.nodes)))
        self.last, self.last_model, self.last_error = trial.value, trial.model, trial.error
        met = self.budget.met(trial.value)
        logger.info("INT8 %s: %d of %d units in float (%s): error %.3g, %s = %.4f (budget %s): %s", self.target,
                    len(in_float), len(self.units), what or f"latest {in_float[-1].name}", trial.error,
                    self.budget.metric, trial.value, self.budget, "met" if met else "not met")
        return (trial, list(in_float)) if met else None
