"""The INT8 stage of a build: calibration data, activation ranges (cached in calibration.json) and
the budgeted quantization of each target graph."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from engines.build.int8.data import load_calibration
from engines.build.int8.sensitivity import Int8Result, quantize_target
from engines.build.request import Int8Options
from engines.bundle import Calibration
from engines.bundle.evaluation import EVALUATION_FILE, save_evaluation
from engines.runtime.cpu import detect
from foundation.errors import BuildError
from foundation.numerics import Budget
from foundation.sequence import detect_state, parse_state
from passes.calibration import calibrate, data_sha256, graph_sha256, load_ranges, save_ranges

logger = logging.getLogger(__name__)

MIN_EVALUATION_SAMPLES = 32  # below this, a loud warning: the budget's verdict is coarse


def ranges_for(fp32: onnx.ModelProto, target: str, batches: list[dict], method: str, data_hash: str,
               cache: Path | None) -> tuple[dict, str, bool]:
    """(ranges, graph sha256, reused): from ``cache`` when graph, data and method match, else calibrated."""
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

    def __init__(self, root: Path, options: Int8Options, model, spec, cache: Path | None):
        from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

        entry = BY_NAME.get(model.name) if model.kind == "zoo" else None
        self.data = load_calibration(options.calib, spec, entry, model.module, options.allow_random_calibration)
        self.data_hash = data_sha256(self.data.calibration)
        self.budget = Budget.parse(options.budget, model.task, options.metric_hook).for_inputs(spec.names)
        if self.budget.mask:
            logger.info("INT8: the budget %s: outputs led by [batch, seq] are judged where %s is 1 (every user "
                        "discards the outputs at padding positions)", self.budget, self.budget.mask)
        self.root, self.method, self.cache, self.ort_form = root, options.calib_method, cache, options.ort_form
        self.time_limit = options.time_limit
        self.requested_state, self.state = tuple(options.state), ()
        self.required = {"trt", "ort"} if "all" in options.require else set(options.require)
        self.ranges: dict[str, dict] = {}
        self.results: dict[str, Int8Result] = {}
        self.reference: onnx.ModelProto | None = None  # set by a pruned build: the unpruned export (end to end)
        self.reused: dict[str, bool] = {}
        self.evaluation_stored = save_evaluation(root / EVALUATION_FILE, self.data.evaluation)
        _warn_if_small(self.data.evaluation)

    def quantize(self, target: str, fp32: onnx.ModelProto) -> onnx.ModelProto:
        self.state = parse_state(self.requested_state, [i.name for i in fp32.graph.input],
                                 [o.name for o in fp32.graph.output]) if self.requested_state else _detected(fp32)
        ranges, graph_hash, self.reused[target] = ranges_for(fp32, target, self.data.calibration, self.method,
                                                             self.data_hash, self.cache)
        self.ranges[target] = {"graph_sha256": graph_hash, "ranges": {k: list(v) for k, v in sorted(ranges.items())}}
        save_ranges(self.root / "calibration.json", self.ranges, self.method, self.data_hash, self.data.samples)
        result = quantize_target(fp32, target, ranges, self.data.evaluation, self.budget, ort_form=self.ort_form,
                                 time_limit=self.time_limit, state=self.state, reference=self.reference)
        self.results[target] = result
        if not result.quantized and target in self.required:
            raise BuildError(f"--require-int8 {target}: model.{target}.onnx cannot be INT8: {result.reason}; "
                             "loosen --budget, give more representative --calib data, or drop --require-int8")
        return result.model

    def precision(self, target: str) -> str:
        """``int8``, or ``fp32`` for a target whose graph stayed float."""
        return "int8" if self.results[target].quantized else "fp32"

    def calibration(self) -> Calibration:
        """The manifest's calibration section."""
        return Calibration(self.method, self.data.source, self.data.samples, len(self.data.evaluation),
                           self.data_hash, "calibration.json", dict(self.reused), self.budget, detect().isa,
                           EVALUATION_FILE if self.evaluation_stored else None, _samples(self.data.evaluation),
                           tuple(self.state))


def _detected(fp32: onnx.ModelProto) -> tuple[tuple[str, str], ...]:
    """State pairs read off the graph's names (``foundation.sequence.detect_state``), logged."""
    def described(values):
        return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values]

    pairs = detect_state(described(fp32.graph.input), described(fp32.graph.output))
    if pairs:
        logger.info("INT8: %s look like state fed back; the budget runs the held-out batches as a sequence "
                    "(--state OUT:IN names them yourself)", ", ".join(f"{o} -> {i}" for o, i in pairs))
    return pairs


def _samples(batches: list[dict]) -> int:
    return sum(next(iter(b.values())).shape[0] if b else 0 for b in batches)


def _warn_if_small(evaluation: list[dict]) -> None:
    samples = _samples(evaluation)
    if samples < MIN_EVALUATION_SAMPLES:
        logger.warning("INT8: the budget is measured on only %d held-out samples (fewer than %d): one sample moves "
                       "top-1 agreement by %.3f, so the verdict is coarse; give more calibration batches (every "
                       "fifth is held out)", samples, MIN_EVALUATION_SAMPLES, 1 / max(samples, 1))
