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

Budgets: ``top1=0.99`` (top-1 agreement with FP32 on the first output, the default for
classifiers), ``cosine=0.99`` (mean per-sample cosine similarity over all outputs, the default
for embeddings and generation), ``relerr=0.05`` (max |INT8 - FP32| / max |FP32| per output).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engines.runtime.cpu import detect
from engines.build.int8.forms import FormChoice, candidates as form_candidates, choose
from exporter.core.errors import BuildError, UsageError
from passes import InferShapes, PassManager
from passes.quantize_ort import QuantizeForOnnxRuntime, units as ort_units
from passes.quantize_trt import QuantizeForTensorRT, candidates
from passes.verify import session

logger = logging.getLogger(__name__)

QUANTIZERS = {"trt": QuantizeForTensorRT, "ort": QuantizeForOnnxRuntime}
UNITS = {"trt": candidates, "ort": ort_units}  # what each target's sensitivity analysis may keep in float
DEFAULT_BUDGETS = {"classification": "top1=0.99", "embedding": "cosine=0.99", "generation": "cosine=0.99"}


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str  # top1 | cosine | relerr
    threshold: float

    @classmethod
    def parse(cls, text: str | None, task: str | None) -> "Budget":
        text = text or DEFAULT_BUDGETS.get(task or "", "relerr=0.05")
        metric, _, value = text.partition("=")
        if metric not in ("top1", "cosine", "relerr") or not value:
            raise UsageError(f"budget {text!r}: expected top1=0.99, cosine=0.99 or relerr=0.05")
        try:
            return cls(metric, float(value))
        except ValueError as exc:
            raise UsageError(f"budget {text!r}: {value!r} is not a number") from exc

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.metric == "relerr" else value >= self.threshold

    def loss(self, value: float) -> float:
        """Larger is worse, for ordering sensitivities."""
        return value if self.metric == "relerr" else 1.0 - value

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.metric == 'relerr' else '>='} {self.threshold:g}"


def top1_agreement(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Share of samples, over batches of one output, whose argmax over the last axis agrees."""
    agree = [np.argmax(a, -1) == np.argmax(r, -1) for r, a in zip(reference, actual)]
    return float(np.concatenate([x.reshape(-1) for x in agree]).mean())


def metric(budget: Budget, reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    """The budget's metric over batches (each a list of outputs in graph order)."""
    if budget.metric == "top1":
        return top1_agreement([r[0] for r in reference], [a[0] for a in actual])
    if budget.metric == "cosine":
        cos = []
        for r, a in zip(reference, actual):
            floats = [(x, y) for x, y in zip(r, a) if x.dtype.kind == "f"]
            rr = np.concatenate([x.reshape(x.shape[0], -1) for x, _ in floats], axis=1).astype(np.float64)
            aa = np.concatenate([y.reshape(y.shape[0], -1) for _, y in floats], axis=1).astype(np.float64)
            denom = np.linalg.norm(rr, axis=1) * np.linalg.norm(aa, axis=1)
            cos.append(np.where(denom > 0, (rr * aa).sum(axis=1) / np.maximum(denom, 1e-30), 1.0))
        return float(np.concatenate(cos).mean())
    worst = 0.0
    for r, a in zip(reference, actual):
        for x, y in zip(r, a):
            scale = float(np.abs(x).max(initial=0.0)) or 1.0
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max(initial=0.0)) / scale)
    return worst


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

    def to_json(self) -> dict:
        return {"budget": str(self.budget), "met": self.budget.met(self.final), "full_int8": self.full_int8,
                "final": self.final, "candidates": self.candidates, "kept_float": self.kept_float,
                "sensitivity": self.sensitivity, "judged_by": self.judged_by, "cpu_isa": self.cpu_isa,
                "form": self.form.to_json() if self.form else None}


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
                        lambda outputs: metric(budget, reference, outputs), budget.loss, evaluation)
        model, full = choice.model, choice.measured[choice.form]["metric"]

    def evaluate(exclude: tuple[str, ...]) -> tuple[onnx.ModelProto, float]:
        model = quantize(exclude, choice.form if choice else None)
        return model, metric(budget, reference, run_target(model, evaluation, target))

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


def ranges_for(fp32: onnx.ModelProto, target: str, batches: list[dict], method: str, data_hash: str,
               cache: Path | None) -> tuple[dict, str, bool]:
    """(ranges, graph sha256, reused): from ``cache`` when graph, data and method match, else calibrated."""
    from passes.calibration import calibrate, graph_sha256, load_ranges  # noqa: PLC0415

    graph_hash = graph_sha256(fp32)
    if cache is not None and cache.is_file():
        cached = load_ranges(cache, target, graph_hash, data_hash, method)
        if cached is not None:
            logger.info("INT8 %s: reusing calibration ranges from %s (graph and data unchanged)", target, cache)
            return cached, graph_hash, True
        logger.info("INT8 %s: %s does not match this graph, data and method; calibrating again", target, cache)
    return calibrate(fp32, batches, method), graph_hash, False


class Int8Stage:
    """Calibration data, ranges (cached in calibration.json) and budgeted quantization per target."""

    def __init__(self, root: Path, request, model, spec, cache: Path | None):
        from engines.build.int8.data import load_calibration  # noqa: PLC0415
        from exporter.zoo import BY_NAME  # noqa: PLC0415
        from passes.calibration import data_sha256  # noqa: PLC0415

        entry = BY_NAME.get(model.name) if model.kind == "zoo" else None
        self.data = load_calibration(request.calib, spec, entry, model.module, request.allow_random_calibration)
        self.data_hash = data_sha256(self.data.calibration)
        self.budget = Budget.parse(request.budget, model.task)
        self.root, self.method, self.cache, self.ort_form = root, request.calib_method, cache, request.ort_int8_form
        self.ranges: dict[str, dict] = {}
        self.results: dict = {}
        self.reused: dict[str, bool] = {}

    def quantize(self, target: str, fp32: onnx.ModelProto) -> onnx.ModelProto:
        from passes.calibration import save_ranges  # noqa: PLC0415

        ranges, graph_hash, self.reused[target] = ranges_for(fp32, target, self.data.calibration, self.method,
                                                             self.data_hash, self.cache)
        self.ranges[target] = {"graph_sha256": graph_hash, "ranges": {k: list(v) for k, v in ranges.items()}}
        save_ranges(self.root / "calibration.json", self.ranges, self.method, self.data_hash, self.data.samples)
        self.results[target] = quantize_target(fp32, target, ranges, self.data.evaluation, self.budget,
                                               ort_form=self.ort_form)
        return self.results[target].model

    def manifest_entry(self) -> dict:
        return {"method": self.method, "source": self.data.source, "samples": self.data.samples,
                "evaluation_batches": len(self.data.evaluation), "data_sha256": self.data_hash,
                "file": "calibration.json", "reused": self.reused, "budget": str(self.budget),
                "cpu_isa": detect().isa}
