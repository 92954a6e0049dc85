"""Explicit INT8 for ONNX Runtime CPU: the Q/DQ form its integer kernels fuse (QLinearConv,
QLinearMatMul, MatMulInteger), placed by ONNX Runtime's own quantizer.

Activations are U8 (zero point from the calibrated range), far faster on ONNX Runtime's CPU kernels
than the symmetric signed form TensorRT needs. The weights come in one of three forms (``FORMS``),
because x86 CPUs without VNNI sum pairs of U8xS8 products in 16 bits and saturate
(``engines.runtime.cpu``): ``u8s8`` (S8 per-channel, the fastest where products accumulate in 32
bits), ``u8s8-rr`` (7-bit S8 weights, ONNX Runtime's ``reduce_range``: 255 * 64 * 2 fits in 16 bits)
and ``u8u8`` (U8 weights, whose kernels do not saturate); the build measures the candidates of its own
CPU class and picks one (``engines.build.int8.forms``; measurements in
docs/decisions/004-ort-int8-forms.md). The placement is ``onnxruntime.quantization.quantize_static``'s
(QDQ format, its default op types): that is the layout its graph transformers turn into integer
kernels, so it is wrapped rather than rewritten. planforge's calibrated ranges go in through the
quantizer's public calibration cache, so both targets quantize from the same ranges; layers the
sensitivity analysis keeps in float go in as ``nodes_to_exclude``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from foundation.errors import PassError
from passes.base import Pass, PassResult
from passes.infer_shapes import InferShapes
from passes.quantization import Unit, candidates, ensure_node_names

logger = logging.getLogger(__name__)


# The ops a "-compute" form quantizes: layers with integer kernels and the data movement and activations
# between them, but not the elementwise arithmetic, normalizations and softmax. Measured on
# all-MiniLM-L6-v2 (avx512-vnni): with every op ONNX Runtime quantizes, all-INT8 pooled cosine 0.42
# (the residual Adds carry outlier channels that one U8 range per tensor cannot hold) and 57 of 139
# units had to stay float; the build measures both op sets (``engines.build.int8.forms``).
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "AveragePool",
                         "GlobalAveragePool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat",
                         "Split", "Slice", "Resize", "Pad", "Gather"})


@dataclasses.dataclass(frozen=True)
class OrtForm:
    """One Q/DQ form of ONNX Runtime's quantizer: activation and weight types, weight bits, and which
    op types it quantizes (None: every op the quantizer knows)."""

    name: str
    activation: QuantType
    weight: QuantType
    reduce_range: bool
    description: str
    op_types: frozenset[str] | None = None


_BASE = (
    OrtForm("u8s8", QuantType.QUInt8, QuantType.QInt8, False,
            "U8 activations, S8 per-channel weights (sums pairs in 16 bits without VNNI)"),
    OrtForm("u8s8-rr", QuantType.QUInt8, QuantType.QInt8, True,
            "U8 activations, 7-bit S8 per-channel weights (reduce_range: pair sums fit 16 bits)"),
    OrtForm("u8u8", QuantType.QUInt8, QuantType.QUInt8, False,
            "U8 activations, U8 per-channel weights (U8U8 kernels do not saturate)"),
)
FORMS = {f.name: f for f in _BASE} | {
    f"{f.name}-compute": dataclasses.replace(f, name=f"{f.name}-compute", op_types=COMPUTE_OPS,
                                             description=f"{f.description}; compute layers only")
    for f in _BASE}


class QuantizeForOnnxRuntime(Pass):
    """Inserts U8-activation Q/DQ (weights in the given form) where ONNX Runtime fuses them."""

    requires = (InferShapes,)

    def __init__(self, ranges: dict[str, tuple[float, float]] | None = None, exclude: tuple[str, ...] = (),
                 form: str = "u8s8"):
        if form not in FORMS:
            raise PassError(f"ONNX Runtime INT8 form {form!r} is not one of {', '.join(FORMS)}")
        self.ranges = ranges or {}
        self.exclude = tuple(exclude)
        self.form = FORMS[form]

    def run(self, graph: gs.Graph) -> PassResult:
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            return PassResult(False)  # already quantized
        ensure_node_names(graph)
        model = gs.export_onnx(graph, do_type_check=False)
        model.ir_version = graph.ir_version or 10
        quantized = quantize_with_ranges(model, self.ranges, self.exclude, self.form)
        new = gs.import_onnx(quantized)
        graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
        graph.import_domains = new.import_domains
        added = sum(1 for n in graph.nodes if n.op == "DequantizeLinear")
        return PassResult(added > 0, {"dequantize_nodes": added, "excluded": len(self.exclude),
                                      "form": self.form.name})


def quantizable_ops() -> frozenset[str]:
    """The op types ``quantize_static`` quantizes in QDQ format when none are named: its QLinear and QDQ
    registries together (read from the installed ONNX Runtime, so a new release's list is followed)."""
    return frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)


# Ops whose output ONNX Runtime quantizes with its input's range or fuses into the op before (Relu, Clip
# after a Conv), or that only move or select values: they join the unit of the layer that feeds them, so
# a layer kept in float takes its activation and data movement with it (measured: as separate units a
# resnet18 Conv in float still had its Relu's Q/DQ on its output, 21 of 48 units ended in float).
FOLLOWERS = frozenset({"Relu", "Clip", "LeakyRelu", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                       "Slice", "MaxPool", "AveragePool", "GlobalAveragePool", "Split", "Pad", "Resize", "TopK",
                       "Concat", "Where", "Gather", "GatherElements", "CumSum", "ArgMax"})


def units(graph: gs.Graph, op_types: frozenset[str] | None = None) -> list[Unit]:
    """Everything ONNX Runtime's quantizer would quantize in this graph, as sensitivity units in graph order,
    so that every unit in float is the float graph. A tensor stays float only when its producer and every
    consumer are excluded (the quantizer Q/DQs a tensor any quantized node marks), so units are grouped:
    each anchor (a candidate layer, Add, Mul, Softmax, Sigmoid, a normalization, ...) with the followers
    (``FOLLOWERS``) that read its output, directly or through ops the quantizer does not touch. A follower
    fed by a graph input (an input Pad, a Transpose of the raw input) is a unit of its own."""
    ensure_node_names(graph)
    quantizable = quantizable_ops() & op_types if op_types is not None else quantizable_ops()
    chosen = {n.name for n in candidates(graph) if n.op in quantizable}
    owner: dict[str, int] = {}  # node name -> index into groups
    groups: list[list[gs.Node]] = []
    for node in graph.nodes:
        if node.name not in chosen and (node.op not in quantizable or not _moves_floats(node)):
            continue
        if node.name not in chosen and node.op in FOLLOWERS:
            upstream = _feeding_unit(node, owner, quantizable)
            if upstream is not None:
                owner[node.name] = upstream
                groups[upstream].append(node)
                continue
        owner[node.name] = len(groups)
        groups.append([node])
    return [Unit(g[0].name, g[0].op, tuple(n.name for n in g)) for g in groups]


def _moves_floats(node: gs.Node) -> bool:
    """Whether a node reads or writes a float activation (shape arithmetic on int64 is never quantized)."""
    def is_float(tensor: gs.Variable) -> bool:
        try:
            return tensor.dtype is None or np.issubdtype(np.dtype(tensor.dtype), np.floating)
        except TypeError:  # a type NumPy has no dtype for (bfloat16 as an ONNX enum): not ours to judge
            return True

    return any(is_float(t) for t in list(node.inputs) + list(node.outputs) if isinstance(t, gs.Variable))


def _feeding_unit(node: gs.Node, owner: dict[str, int], quantizable: frozenset[str], depth: int = 8) -> int | None:
    """The unit of the nearest quantized node upstream of ``node``'s first variable input, walking up through
    nodes the quantizer leaves alone (Erf, Div, Shape arithmetic), or None at a graph input."""
    current = node
    for _ in range(depth):
        source = next((t for t in current.inputs if isinstance(t, gs.Variable) and t.inputs), None)
        if source is None:
            return None
        current = source.inputs[0]
        if current.name in owner:
            return owner[current.name]
        if current.op in quantizable:
            return None
    return None


class _FromOrtQuantization(logging.Filter):
    """Drops the records ONNX Runtime's quantization package logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime/quantization" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_quantizer():
    """quantize_static prints to stdout and logs a pre-processing hint at WARNING on the root logger;
    planforge's output stays its own. Scoped: a filter on the root logger drops only records created
    by onnxruntime.quantization while the block runs (the root logger's level is left alone, so other
    threads' logging is untouched); stdout is captured for the block."""
    root, only_ort = logging.getLogger(), _FromOrtQuantization()
    root.addFilter(only_ort)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(only_ort)


def quantize_with_ranges(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], exclude=(),
                         form: OrtForm = FORMS["u8s8"]) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static (QDQ, per-channel weights in ``form``) fed precomputed ranges."""
    missing = [i.name for i in model.graph.input if i.name not in ranges]
    if len(missing) == len(model.graph.input) and not ranges:
        raise PassError("INT8 quantization for ONNX Runtime needs calibration ranges; none were given")
    with tempfile.TemporaryDirectory(prefix="planforge-ortq-") as tmp, quiet_quantizer():
        src, dst, cache = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", Path(tmp) / "ranges.json"
        onnx.save_model(model, str(src))
        arrays = {k: (np.array(lo, np.float32), np.array(hi, np.float32)) for k, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, arrays), cache)
        quantize_static(str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=form.reduce_range, activation_type=form.activation,
                        weight_type=form.weight,
                        nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=sorted(form.op_types) if form.op_types is not None else None,
                        calibration_cache_path=str(cache))
        return onnx.load(str(dst))
