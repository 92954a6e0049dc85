"""``planforge bench-passes --int8``: INT8 on ONNX Runtime CPU, planforge against ONNX Runtime's own
``quantize_static`` (the peer), with the accuracy metric of each model.

For each model: the exported FP32 graph; planforge's INT8 ``ort`` graph (its passes, the zoo's
calibration data, the default budget); planforge's INT8 ``trt`` graph run on the CPU (for
reference: symmetric activations are slow there); and the peer run on the same exported graph
with the same calibration batches (QDQ, per-channel S8 weights, MinMax), once with U8
activations (its fastest form on this CPU) and once with symmetric S8 (the TensorRT form).
Metric: digits_cnn top-1 accuracy on its test split; classifiers top-1 agreement with FP32;
others cosine similarity with FP32, on the zoo's held-out evaluation batches. The TensorRT-form
graphs (planforge's ``trt`` form and the symmetric S8/S8 peer) are judged by float emulation, as
the build judges them (``engines.build.int8``); the ONNX Runtime forms by this CPU's integer kernels,
whose accuracy depends on the CPU class (``engines.runtime.cpu``): the rows say which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
from pathlib import Path

import onnx

from engines.build.int8 import judged_by, quantize_target, run_target
from engines.evaluate.bench.environment import LoadWatch
from engines.evaluate.bench.passes import check_zoo_names
from engines.evaluate.bench.timing import ROUNDS, time_session
from foundation.numerics import Budget, budget_metric
from passes import PassManager, pipeline
from passes.calibration import calibrate
from passes.quantize_ort import quiet_quantizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Int8Row:
    model: str
    variant: str
    latency_ms: float
    metric: str
    value: float
    kept_float: int | None = None
    judged_by: str = ""


def quantize_peer(exported: Path, out: Path, batches: list[dict], activation) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: PLC0415 - ONNX Runtime's quantization tools load slowly

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with quiet_quantizer():
        quantize_static(str(exported), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activation, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": activation == QuantType.QInt8})


TRT_FORMS = ("planforge int8 (trt form)", "peer quantize_static S8/S8 symmetric")  # judged by float emulation


def _metric(name: str, task: str, reference: list, graph: Path, evaluation: list[dict],
            target: str) -> tuple[str, float]:
    """The model's metric for ``graph`` judged as ``target`` is; ``reference``: FP32 outputs on ``evaluation``."""

    if name == "digits_cnn":
        from exporter.zoo.digits import digits_split, logits_accuracy  # noqa: PLC0415 - imports torch

        logits = run_target(onnx.load(str(graph)), [{"x": digits_split("test")[0]}], target)[0][0]
        return "test accuracy", logits_accuracy(logits)
    budget = Budget.parse(None, task).for_inputs(list(evaluation[0]))  # as a build judges it (padding masked)
    value = budget_metric(budget, reference, run_target(onnx.load(str(graph)), evaluation, target), feeds=evaluation)
    return ("top-1 agreement" if budget.metric == "top1" else "cosine"), value


def bench_int8_model(
    name: str, threads: int = 2, runs: int = 30, cache_dir: Path = Path("build/.cache")
) -> list[Int8Row]:
    from onnxruntime.quantization import QuantType  # noqa: PLC0415 - ONNX Runtime's quantization tools load slowly

    from exporter.export import export_onnx  # noqa: PLC0415 - imports torch
    from exporter.resolve import resolve  # noqa: PLC0415 - imports torch
    from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

    entry = BY_NAME[name]
    model = resolve(name, cache_dir)
    calibration, evaluation = entry.calibration_data(model.module)
    feeds = model.input_spec.random_feeds("opt", seed=0)
    rows, kept = [], {}
    with tempfile.TemporaryDirectory(prefix="planforge-bench8-") as tmp:
        graphs = {"fp32": Path(tmp) / "fp32.onnx"}
        export_onnx(model.module, model.input_spec, model.output_names, graphs["fp32"])
        exported = onnx.load(str(graphs["fp32"]))
        for target in ("ort", "trt"):
            fp, _ = PassManager(pipeline(target, "fp32")).run(exported)
            result = quantize_target(fp, target, calibrate(fp, calibration, "max"), evaluation,
                                     Budget.parse(None, model.task).for_inputs(model.input_spec.names))
            graphs[f"planforge int8 ({target} form)"] = Path(tmp) / f"pf_{target}.onnx"
            onnx.save_model(result.model, str(graphs[f"planforge int8 ({target} form)"]))
            kept[f"planforge int8 ({target} form)"] = len(result.kept_float)
            if result.form is not None and result.kept_float:  # the same form with no unit in float
                label = f"planforge int8 ({target} form, every unit INT8)"
                graphs[label] = Path(tmp) / f"pf_{target}_all.onnx"
                onnx.save_model(result.form.model, str(graphs[label]))
                kept[label] = 0
        for label, activation in (("peer quantize_static U8/S8", QuantType.QUInt8),
                                  ("peer quantize_static S8/S8 symmetric", QuantType.QInt8)):
            graphs[label] = Path(tmp) / f"peer_{activation.name}.onnx"
            quantize_peer(graphs["fp32"], graphs[label], calibration, activation)
        times = {k: [] for k in graphs}
        for _ in range(ROUNDS):  # interleaved rounds, so load drift hits every variant alike
            for label, path in graphs.items():
                times[label] += time_session(path, feeds, threads, 2, max(1, runs // ROUNDS))

        reference = run_target(exported, evaluation, "ort")  # once: every variant is measured against it
        for label, path in graphs.items():
            target = "trt" if label in TRT_FORMS else "ort"
            metric_name, value = _metric(name, model.task, reference, path, evaluation, target)
            rows.append(Int8Row(name, label, statistics.median(times[label]), metric_name, value, kept.get(label),
                                judged_by(target)))
            logger.info("%s %s: %.2f ms, %s %.4f", name, label, rows[-1].latency_ms, metric_name, value)
    return rows


DEFAULT_MODELS = ("digits_cnn", "resnet18", "bert_tiny")
DEFAULT_OUT = Path("build/bench-int8.json")


def bench_int8(names, threads: int, runs: int, out: Path | None = None) -> tuple[list[Int8Row], dict, Path]:
    """INT8 rows per model (``DEFAULT_MODELS`` when ``names`` is empty), where they ran, and the JSON
    file they were also written to (``DEFAULT_OUT`` unless ``out``)."""
    check_zoo_names(names)
    with LoadWatch() as load:
        rows = [row for name in (list(names) or DEFAULT_MODELS)
                for row in bench_int8_model(name, threads=threads, runs=runs)]
    out = Path(out or DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "int8", "threads": threads, "environment": load.environment(),
           "results": [dataclasses.asdict(r) for r in rows]}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return rows, doc["environment"], out
