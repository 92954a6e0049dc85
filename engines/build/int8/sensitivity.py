"""INT8 with an accuracy budget: quantize, measure, and keep the most sensitive layers in float.

1. Quantize every candidate layer (``passes.quantize_trt.candidates``: Conv, ConvTranspose, Gemm,
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
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.bundle import Int8Report
from engines.runtime.cpu import detect
from engines.build.int8.forms import FormChoice, candidates as form_candidates, choose
from exporter.core.errors import BuildError
from exporter.core.numerics import Budget, budget_metric
from passes import InferShapes, PassManager
from passes.quantize_ort import QuantizeForOnnxRuntime, units as ort_units
from passes.quantization import candidates
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

    def report(self) -> Int8Report:
        """The manifest's record of this result."""
        return Int8Report(self.budget, self.budget.met(self.final), self.full_int8, self.final, self.candidates,
                          tuple(self.kept_float), self.sensitivity, self.judged_by, self.cpu_isa,
                          self.form.to_json() if self.form else None)


def quantize_target(fp32: onnx.ModelProto, target: str, ranges: dict, evaluation: list[dict], budget: Budget,
                    on_step: Callable[[str], None] = lambda s: None, ort_form: str = "auto") -> Int8Result:
    """Quantize ``fp32`` for ``target`` and fall back to float per layer until ``budget`` holds.

    ``ort_form``: ``auto`` measures the candidate forms of this CPU's class, or one form, forced."""
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
    if budget.met(full):
        return done(model, final=full, kept_float=[], sensitivity={})
    on_step(f"sensitivity ({target})")
    model, value, excluded, sensitivity = _fall_back(ops, evaluate, budget, target, full)
    kept = [{"name": n, "op": ops[n], "target": target,
             "reason": f"sensitivity: quantized alone, {budget.metric} = {sensitivity[n]:.4f}"} for n in excluded]
    logger.info("INT8 %s: %d of %d layers kept in float; %s = %.4f", target, len(excluded), len(ops), budget.metric, value)
    return done(model, final=value, kept_float=kept, sensitivity=sensitivity)


def _fall_back(ops: dict[str, str], evaluate, budget: Budget, target: str, value: float):
    """(model, value, layers in float, sensitivities): each layer quantized alone, then the most
    sensitive left in float one by one until ``budget`` holds."""
    sensitivity = {}
    for name in ops:
        _, value = evaluate(tuple(n for n in ops if n != name))
        sensitivity[name] = value
        logger.debug("sensitivity %s: %s alone quantized -> %.4f", target, name, value)
    order = sorted(ops, key=lambda n: budget.loss(sensitivity[n]), reverse=True)
    excluded: list[str] = []
    for name in order:
        excluded.append(name)
        model, value = evaluate(tuple(excluded))
        if budget.met(value):
            return model, value, excluded, sensitivity
    raise BuildError(f"INT8 ({target}) cannot meet the budget {budget} even with every layer in float "
                     f"({budget.metric} = {value:.4f}); loosen --budget or build FP16/FP32")
