"""Explicit INT8 for ONNX Runtime CPU: the Q/DQ form its integer kernels fuse (QLinearConv,
QLinearMatMul, MatMulInteger), placed by ONNX Runtime's own quantizer.

Measured on this CPU (ResNet-18, batch 8, 2 threads): unsigned asymmetric activations with
signed per-channel weights run 4.75x faster than PyTorch eager, the symmetric signed form
TensorRT needs 1.13x. So this target uses U8 activations (zero point from the calibrated range)
and S8 per-channel weights. The placement is ``onnxruntime.quantization.quantize_static``'s
(QDQ format, its default op types): that is the layout its graph transformers turn into integer
kernels, so it is wrapped rather than rewritten. planforge's calibrated ranges go in through the
quantizer's public calibration cache, so both targets quantize from the same ranges; layers the
sensitivity analysis keeps in float go in as ``nodes_to_exclude``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

from exporter.errors import PassError
from passes.base import Pass, PassResult
from passes.infer_shapes import InferShapes
from passes.quantize_trt import candidates, ensure_node_names

logger = logging.getLogger(__name__)


class QuantizeForOnnxRuntime(Pass):
    """Inserts U8-activation / S8-per-channel-weight Q/DQ where ONNX Runtime fuses them."""

    requires = (InferShapes,)

    def __init__(self, ranges: dict[str, tuple[float, float]] | None = None, exclude: tuple[str, ...] = ()):
        self.ranges = ranges or {}
        self.exclude = tuple(exclude)

    def run(self, graph: gs.Graph) -> PassResult:
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            return PassResult(False)  # already quantized
        ensure_node_names(graph)
        model = gs.export_onnx(graph, do_type_check=False)
        model.ir_version = graph.ir_version or 10
        quantized = quantize_with_ranges(model, self.ranges, self.exclude, activation=QuantType.QUInt8)
        new = gs.import_onnx(quantized)
        graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
        graph.import_domains = new.import_domains
        added = sum(1 for n in graph.nodes if n.op == "DequantizeLinear")
        return PassResult(added > 0, {"dequantize_nodes": added, "excluded": len(self.exclude)})


def units(graph: gs.Graph) -> list[gs.Node]:
    """What the sensitivity analysis may keep in float for this target, in graph order: the shared
    candidates plus every other Add and Mul, which ONNX Runtime's quantizer also quantizes (QLinearAdd,
    QLinearMul) and which are often the sensitive ones (MobileNetV2's residual Adds between two Convs:
    with only the candidates in float, top-1 agreement stayed at 0.69)."""
    chosen = {n.name for n in candidates(graph)}
    return [n for n in graph.nodes if n.name in chosen or n.op in ("Add", "Mul")]


@contextlib.contextmanager
def quiet_quantizer():
    """quantize_static prints to stdout and logs a pre-processing hint at WARNING on the root logger;
    planforge's output stays its own (other loggers still propagate to the root's handlers)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_with_ranges(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], exclude=(),
                         activation=QuantType.QUInt8) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static (QDQ, per-channel S8 weights) fed precomputed ranges."""
    missing = [i.name for i in model.graph.input if i.name not in ranges]
    if len(missing) == len(model.graph.input) and not ranges:
        raise PassError("INT8 quantization for ONNX Runtime needs calibration ranges; none were given")
    with tempfile.TemporaryDirectory(prefix="planforge-ortq-") as tmp, quiet_quantizer():
        src, dst, cache = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", Path(tmp) / "ranges.json"
        onnx.save_model(model, str(src))
        arrays = {k: (np.array(lo, np.float32), np.array(hi, np.float32)) for k, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, arrays), cache)
        quantize_static(str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activation, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=str(cache))
        return onnx.load(str(dst))
