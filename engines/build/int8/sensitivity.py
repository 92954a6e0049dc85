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

Budgets (``exporter.core.numerics.Budget``): ``top1=0.99`` for classifiers, ``cosine=0.99`` for
embeddings and generation, ``relerr=0.05`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.build.int8.forms import FormChoice, choose
from engines.build.int8.forms import candidates as form_candidates
from engines.bundle import Int8Report
from engines.runtime.cpu import detect
from exporter.core.numerics import Budget, budget_metric
from passes import InferShapes, PassManager
from passes.quantization import candidates
from passes.quantize_ort import QuantizeForOnnxRuntime
from passes.quantize_ort import units as ort_units
from passes.quantize_trt import QuantizeForTensorRT
from passes.verify import session

logger = logging.getLogger(__name__)

QUANTIZERS = {"trt": QuantizeForTensorRT, "ort": QuantizeForOnnxRuntime}
UNITS = {"trt": candidates, "ort": ort_units}  # what each target's sensitivity analysis may keep in float


EMULATED = "float emulation (ONNX Runtime, graph optimizations off)"


def judged_by(target: str) -> str:
    """How ``target``'s accuracy is measured (module docstring)."""
    return EMULATED if target == "trt" else f"ONNX Runtime CPU kernels on {detect().isa}"


def run_target(model: onnx.ModelProto, batches: list[dict], target: str) -> list[list[np.ndarray]]:
    """Outputs of ``model`` per batch, run the way ``target``'s accuracy is judged."""
    sess = session(model, optimize=target != "trt")
    names = [o.name for o in sess.get_outputs()]
    return [sess.run(names, b) for b in batches]


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

    def report(self) -> Int8Report:
        """The manifest's record of this result."""
        return Int8Report(self.budget, self.budget.met(self.final), self.full_int8, self.final, self.candidates,
                          tuple(self.kept_float), self.sensitivity, self.judged_by, self.cpu_isa,
                          self.form.to_json() if self.form else None, self.quantized, self.reason)


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def quantize_target(fp32: onnx.ModelProto, target: str, ranges: dict, evaluation: list[dict], budget: Budget,
                    on_step: Callable[[str], None] = lambda s: None, ort_form: str = "auto",
                    time_limit: float | None = None) -> Int8Result:
    """Quantize ``fp32`` for ``target`` and fall back to float per layer until ``budget`` holds.

    ``ort_form``: ``auto`` measures the candidate forms of this CPU's class, or one form, forced.
    ``time_limit``: seconds for the fallback search; when it runs out, the best graph found is kept.
    A target whose budget holds only with every layer in float, or not at all, stays float
    (``quantized=False``): a graph without Q/DQ is never called INT8."""
    reference = run_target(fp32, evaluation, target)
    ops = {n.name: n.op for n in UNITS[target](gs.import_onnx(fp32))}
    isa = detect().isa

    def quantize(exclude: tuple[str, ...], form: str | None) -> onnx.ModelProto:
        options = {"form": form} if form else {}
        quantizer = QUANTIZERS[target](ranges=ranges, exclude=exclude, **options)
        return PassManager([InferShapes(), quantizer], quiet=True).run(fp32)[0]

    choice = None
    if target == "ort":
        choice = choose(form_candidates(isa, ort_form), isa, lambda f: quantize((), f),
                        lambda outputs: budget_metric(budget, reference, outputs), budget.loss, evaluation)
        model, full = choice.model, choice.measured[choice.form]["metric"]

    def evaluate(exclude: tuple[str, ...]) -> tuple[onnx.ModelProto, float]:
        model = quantize(exclude, choice.form if choice else None)
        return model, budget_metric(budget, reference, run_target(model, evaluation, target))

    if choice is None:
        model, full = evaluate(())
    logger.info("INT8 %s: all %d layers quantized: %s = %.4f (budget %s; %s)", target, len(ops), budget.metric, full,
                budget, judged_by(target))
    done = functools.partial(Int8Result, budget=budget, full_int8=full, candidates=len(ops),
                             judged_by=judged_by(target), cpu_isa=isa, form=choice)
    if not has_qdq(model):
        return _stays_float(done, fp32, target, full, {}, "the graph has no layer this target quantizes")
    if budget.met(full):
        return done(model, final=full, kept_float=[], sensitivity={})
    on_step(f"sensitivity ({target})")
    search = FallbackSearch(ops, evaluate, budget, target, time_limit)
    found = search.run()
    if found is None:
        return _stays_float(done, fp32, target, search.last, search.sensitivity, f"the budget {budget} is not met "
                            f"even with every layer in float ({budget.metric} = {search.last:.4f})")
    if not has_qdq(found[0]):
        return _stays_float(done, fp32, target, found[1], search.sensitivity, f"the budget {budget} holds only "
                            f"with every layer in float ({budget.metric} = {found[1]:.4f})")
    model, value, excluded = found
    kept = [{"name": n, "op": ops[n], "target": target, "reason": search.why(n)} for n in excluded]
    logger.info("INT8 %s: %d of %d layers kept in float; %s = %.4f", target, len(excluded), len(ops), budget.metric, value)
    return done(model, final=value, kept_float=kept, sensitivity=search.sensitivity)


def _stays_float(done, fp32: onnx.ModelProto, target: str, value: float, sensitivity: dict, reason: str) -> Int8Result:
    logger.warning("INT8 %s: %s; model.%s.onnx stays float", target, reason, target)
    return done(fp32, final=value, kept_float=[], sensitivity=sensitivity, quantized=False, reason=reason)


class FallbackSearch:
    """Which layers stay in float: each layer's sensitivity (it alone quantized), then the most sensitive
    left in float one at a time until the budget holds, one INFO line per step (CLI logs show it on any
    output). After ``time_limit`` seconds the layers not yet measured count as the most sensitive, and
    once the search itself runs out of time every layer not yet tried stays in float too.

    Tried and measured on resnet18 (16 held-out images, top-1 >= 0.99): a bisection over the count
    (1 + log2 N evaluations) kept 22 of 26 (trt) and 33 of 48 (ort) layers in float where one at a time
    kept 8 and 3: top-1 agreement on so few samples is not monotone in the count, so a faster search
    needs a larger evaluation set first (issue 13)."""

    def __init__(self, ops: dict[str, str], evaluate, budget: Budget, target: str, time_limit: float | None):
        self.ops, self.evaluate, self.budget, self.target = ops, evaluate, budget, target
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.sensitivity: dict[str, float] = {}
        self.last = float("nan")

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def why(self, name: str) -> str:
        if name in self.sensitivity:
            return f"sensitivity: quantized alone, {self.budget.metric} = {self.sensitivity[name]:.4f}"
        return "not measured before the INT8 time limit: kept in float to be safe"

    def run(self):
        """(model, value, layers in float) for the fewest layers in float found to meet the budget, or None."""
        for i, name in enumerate(self.ops, start=1):
            if self.expired():
                logger.warning("INT8 %s: time limit reached after %d of %d sensitivities", self.target, i - 1,
                               len(self.ops))
                break
            _, self.sensitivity[name] = self.evaluate(tuple(n for n in self.ops if n != name))
            logger.debug("sensitivity %s: %s alone quantized -> %.4f", self.target, name, self.sensitivity[name])
        order = sorted(self.ops, key=lambda n: self.budget.loss(self.sensitivity.get(n, float("inf"))), reverse=True)
        for k in range(1, len(order) + 1):
            if self.expired() and k < len(order):
                logger.warning("INT8 %s: time limit reached; the %d layers not yet tried stay in float", self.target,
                               len(order) - k + 1)
                return self._step(order, len(order))
            found = self._step(order, k)
            if found is not None:
                return found
        return None

    def _step(self, order: list[str], k: int):
        model, value = self.evaluate(tuple(order[:k]))
        self.last = value
        met = self.budget.met(value)
        logger.info("INT8 %s: %d of %d layers in float: %s = %.4f (budget %s): %s", self.target, k, len(order),
                    self.budget.metric, value, self.budget, "met" if met else "not met")
        return (model, value, order[:k]) if met else None
