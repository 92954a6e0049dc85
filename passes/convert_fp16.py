"""FP16 for the ``trt`` target: FP16 weights and compute, FP32 kept where FP16 overflows or loses
accuracy, graph inputs and outputs keep their types.

TensorRT 11 builds strongly typed networks, so the ONNX graph alone decides precision.

Written here rather than wrapping ``onnxconverter_common.float16`` (what Polygraphy's
``--fp-to-fp16`` uses): version 1.16 produced graphs ONNX Runtime rejects on two of the six zoo
models (``bert_tiny``, ``gpt_tiny``: "Type (tensor(float16)) of output arg ... does not match
expected type (tensor(float))" at a Cast of the attention mask and at consumers of FP32 graph
inputs), with or without the graph's value_info. ModelOpt AutoCast needs the nvidia-modelopt
stack. The rules here are few and explicit:

- A node computes in FP32 when its op is in ``KEEP_FP32_OPS`` (normalizations and reductions,
  the softmax and its input, exp/pow/sqrt/reciprocal, ranges and cumulative sums), when its
  op type or name is in the user's keep list, or when it holds a subgraph. Every other node that
  reads or writes float tensors computes in FP16.
- A node that reads a float initializer with values beyond FP16's +-65504 computes in FP32 (a
  BatchNormalization whose running variance exceeds it; weights that large), recorded with the
  reason, unless it is elementwise arithmetic (``CLIPPED_OPS``: Add, Sub, Mul, Div, Where, Max,
  Min), where the large values are masks: a -1e9 attention mask becomes -65000, still zero after
  softmax. That clipping is logged as a WARNING naming the constants.
- ONNX's fused ``Attention`` (opset 23) computes in FP16 with ``softmax_precision`` FLOAT: the
  softmax inside it stays FP32, as the rule above keeps a ``Softmax`` node.
- FP32 initializers read only by FP16 nodes are stored as FP16. Float ``Cast`` and ``Constant``
  nodes in FP16 regions produce FP16.
- A ``Cast`` is inserted, once per tensor and direction, wherever a tensor crosses between the
  two precisions; graph inputs stay FP32 (cast on entry) and graph outputs stay FP32 (cast on exit,
  under the original name).
- Inputs that the ONNX spec fixes as float32 (``Resize`` scales) are left alone.

Budget (checked by the pass manager's verification and by the build): each output within
``max abs error <= 2e-2 * max|FP32 output| + 1e-3`` of the FP32 graph under ONNX Runtime CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from foundation.numerics import compare_arrays, fp16_atol, where_error_starts
from passes.base import Pass, PassResult
from passes.graph_utils import fresh_name
from passes.infer_shapes import InferShapes

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
# What constants beyond FP16's range (masks) become: inside it, because ONNX Runtime's Attention takes exactly
# FP16's lowest as "this row is fully masked" and answers zeros where the softmax it replaces gives mean(V).
MASK_VALUE = 65000.0
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
KEEP_FP32_OPS = frozenset({
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "GroupNormalization",
    "InstanceNormalization", "LpNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Softmax", "LogSoftmax", "Exp", "Pow",
    "Sqrt", "Reciprocal", "Range", "CumSum", "Einsum",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
})
FIXED_FLOAT32_INPUTS = {"Resize": {2}, "Upsample": {1}}
CLIPPED_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min"})  # large constants here are masks


def _is_float32(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values).dtype == F32
    return tensor.dtype is not None and np.dtype(tensor.dtype) == F32


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = np.asarray(tensor.values).dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    return dtype is not None and np.dtype(dtype) in (F32, F16)


def _float_tensors(node: gs.Node) -> bool:
    """Does the node compute on floats (and is not a boundary Cast from FP16 back to FP32)?

    FP16 tensors count too, so a second run sees the nodes it converted as FP16 nodes.
    """
    if node.op == "Cast" and node.attrs.get("to") == 1:
        src = node.inputs[0]
        return not (src.dtype is not None and np.dtype(src.dtype) == F16)
    return any(_is_float(t) for t in list(node.inputs) + list(node.outputs) if t.name)


class ConvertToFp16(Pass):
    """Replaces FP32 compute with FP16 except where FP32 is kept (see the module docstring)."""

    requires = (InferShapes,)

    def __init__(self, keep: tuple[str, ...] = ()):
        self.keep = frozenset(keep)
        self.measured: tuple[str, ...] = ()  # nodes kept in FP32 after their FP16 error was measured (repair)

    @staticmethod
    def budget(expected: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
        return {n: (fp16_atol(v), 0.0) for n, v in expected.items()}

    def hint(self) -> str:
        return ("keep the node that loses accuracy in FP32 with --keep-fp32 NAME_OR_OP (its name or op type, "
                "see 'planforge inspect'), or skip the conversion with --skip-pass ConvertToFp16")

    def verification_model(self, before, after):
        """FP16 as stored: ONNX Runtime's CPU provider runs most FP16 ops by casting to FP32 and drops the
        casts between neighbours, so an FP16 intermediate that overflows (a 160000 between two Muls)
        never does there. The check runs ``emulate_fp16`` instead: ``before`` with each converted node's
        float outputs and FP16 weights rounded through FP16 by explicit Casts, which it keeps."""
        return emulate_fp16(before, after)

    def repair(self, before, after, feeds) -> str | None:
        """Keep in FP32 the node where FP16 error starts (``first_fp16_culprit``), measured on ``feeds``."""
        name = first_fp16_culprit(before, emulate_fp16(before, after), feeds, skip=self.keep | set(self.measured))
        if name is None:
            return None
        self.measured = (*self.measured, name)
        return f"node {name!r} is where its FP16 error starts (measured): it is kept in FP32"

    def _keeps_fp32(self, node: gs.Node) -> str | None:
        if node.op in KEEP_FP32_OPS:
            return "op kept in FP32"
        if node.name in self.measured:
            return "its FP16 output broke the budget (measured)"
        if node.op in self.keep or node.name in self.keep:
            return "named in the keep list"
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return "holds a subgraph"
        if node.op not in CLIPPED_OPS:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and _is_float32(tensor):
                    peak = float(np.abs(np.asarray(tensor.values)).max(initial=0.0))
                    if peak > FP16_MAX:
                        return f"reads {tensor.name} with values up to {peak:.3g}, beyond FP16's {FP16_MAX:g}"
        return None

    def run(self, graph: gs.Graph) -> PassResult:
        half = {id(n) for n in graph.nodes if _float_tensors(n) and not self._keeps_fp32(n)}
        retyped, produced_half = self._retype_outputs(graph, half)
        casts = self._insert_casts(graph, half, produced_half)
        weights = self._convert_initializers(graph, half)
        if not (retyped or casts or weights):
            return PassResult(False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        kept = sum(1 for n in graph.nodes if _float_tensors(n) and self._keeps_fp32(n))
        stats = {"fp16_nodes": len(half), "fp32_nodes": kept, "casts": casts, "weights": weights}
        if self.measured:
            stats["measured_fp32"] = list(self.measured)
        return PassResult(True, stats)

    def _retype_outputs(self, graph: gs.Graph, half: set[int]) -> tuple[int, set[int]]:
        """FP16 nodes write FP16: output dtypes, Cast targets and Constant values change."""
        produced, retyped = set(), 0
        for node in (n for n in graph.nodes if id(n) in half):
            if node.op == "Cast" and node.attrs.get("to") == 1:
                node.attrs["to"] = 10
            if node.op == "Attention" and node.domain in ("", "ai.onnx"):
                node.attrs["softmax_precision"] = 1  # FLOAT: the fused softmax stays FP32, as a Softmax node would
            if node.op in ("Constant", "ConstantOfShape") and "value" in node.attrs:
                value = node.attrs["value"]
                if np.asarray(value.values).dtype == F32:
                    node.attrs["value"] = gs.Constant(value.name, _to_half(value.values))
            for out in node.outputs:
                if out.dtype is not None and np.dtype(out.dtype) == F32:
                    out.dtype = F16
                    retyped += 1
                if out.dtype is not None and np.dtype(out.dtype) == F16:
                    produced.add(id(out))
        return retyped, produced

    def _insert_casts(self, graph: gs.Graph, half: set[int], produced_half: set[int]) -> int:
        casts: dict[tuple[int, int], gs.Variable] = {}
        count = 0

        def cast(tensor: gs.Tensor, to: int) -> gs.Variable:
            nonlocal count
            key = (id(tensor), to)
            if key not in casts:
                out = gs.Variable(fresh_name(graph, f"{tensor.name}_to_{'fp16' if to == 10 else 'fp32'}"),
                                  dtype=F16 if to == 10 else F32, shape=tensor.shape)
                graph.nodes.append(gs.Node("Cast", fresh_name(graph, f"{tensor.name}_cast"), {"to": to},
                                           inputs=[tensor], outputs=[out]))
                casts[key] = out
                count += 1
            return casts[key]

        for node in list(graph.nodes):
            if node.op == "Cast":
                continue  # a Cast reads any type
            fixed = FIXED_FLOAT32_INPUTS.get(node.op, set())
            for i, tensor in enumerate(list(node.inputs)):
                if isinstance(tensor, gs.Constant) or not tensor.name or i in fixed:
                    continue
                is_half = id(tensor) in produced_half
                is_float = is_half or _is_float32(tensor)
                if not is_float:
                    continue
                if id(node) in half and not is_half:
                    node.inputs[i] = cast(tensor, 10)
                elif id(node) not in half and is_half:
                    node.inputs[i] = cast(tensor, 1)
        for out in list(graph.outputs):
            if id(out) in produced_half:
                inner = gs.Variable(fresh_name(graph, f"{out.name}_fp16"), dtype=F16, shape=out.shape)
                writer = out.inputs[0]
                writer.outputs[[k for k, t in enumerate(writer.outputs) if t is out][0]] = inner
                for consumer in list(out.outputs):
                    consumer.inputs[[k for k, t in enumerate(consumer.inputs) if t is out][0]] = inner
                out.dtype = F32
                graph.nodes.append(gs.Node("Cast", fresh_name(graph, f"{out.name}_cast"), {"to": 1},
                                           inputs=[inner], outputs=[out]))
                count += 1
        return count

    def _convert_initializers(self, graph: gs.Graph, half: set[int]) -> int:
        """FP32 constants read only by FP16 nodes become FP16 (one copy per constant)."""
        converted: dict[int, gs.Constant] = {}
        clipped, clipped_names = 0, set()
        for node in (n for n in graph.nodes if id(n) in half):
            fixed = FIXED_FLOAT32_INPUTS.get(node.op, set())
            for i, tensor in enumerate(list(node.inputs)):
                if not isinstance(tensor, gs.Constant) or i in fixed or not _is_float32(tensor):
                    continue
                if id(tensor) not in converted:
                    values = np.asarray(tensor.values)
                    over = int(np.count_nonzero(np.abs(values) > FP16_MAX))
                    if over:
                        clipped += over
                        clipped_names.add(tensor.name)
                    readers_all_half = all(id(r) in half for r in tensor.outputs)
                    name = tensor.name if readers_all_half else fresh_name(graph, f"{tensor.name}_fp16")
                    new = gs.Constant(name, _to_half(values))
                    if readers_all_half:
                        tensor.values = new.values
                        new = tensor
                    converted[id(tensor)] = new
                node.inputs[i] = converted[id(tensor)]
        if clipped:
            logger.warning("ConvertToFp16: %d values of %s clipped to +-%g (masks read by elementwise ops; keep a "
                           "node in FP32 with --keep-fp32 to avoid it)", clipped, ", ".join(sorted(clipped_names)),
                           MASK_VALUE)
        return len(converted)


def emulate_fp16(before, after):
    """``before`` (FP32) computing as ``after`` stores: every float output of a node that ``after`` computes
    in FP16 goes through Cast(FP16) -> Cast(FP32) under its own name, and every float initializer that
    ``after`` holds in FP16 is rounded to FP16 values. Names are ``before``'s, so tensors line up."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    half_outputs = {o for n in after.graph.node for o in n.output}
    types = {v.name: v.type.tensor_type.elem_type for v in list(after.graph.value_info) + list(after.graph.output)}
    half_inits = {i.name for i in after.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    model = onnx.ModelProto()
    model.CopyFrom(before)
    graph = model.graph
    for init in graph.initializer:
        if init.name in half_inits and init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(init)).astype(np.float32), init.name))
    by_name = {n.name: n for n in after.graph.node if n.name}
    cast_to_half = {o for n in after.graph.node if n.op_type == "Cast" and any(
        a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute) for o in n.output}
    nodes, rounded = [], set()
    for node in graph.node:
        twin = by_name.get(node.name)
        if twin is not None and len(twin.input) == len(node.input):
            for k, (name, converted) in enumerate(zip(node.input, twin.input)):
                if name and converted != name and converted in cast_to_half:  # the pass cast this input to FP16
                    if name not in rounded:
                        nodes += [onnx.helper.make_node("Cast", [name], [f"{name}__in16"], to=onnx.TensorProto.FLOAT16),
                                  onnx.helper.make_node("Cast", [f"{name}__in16"], [f"{name}__in32"],
                                                        to=onnx.TensorProto.FLOAT)]
                        rounded.add(name)
                    node.input[k] = f"{name}__in32"
        nodes.append(node)
        for k, name in enumerate(node.output):
            if name in half_outputs and types.get(name) == onnx.TensorProto.FLOAT16:
                raw = f"{name}__fp32"
                node.output[k] = raw
                nodes += [onnx.helper.make_node("Cast", [raw], [f"{name}__fp16"], to=onnx.TensorProto.FLOAT16),
                          onnx.helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def first_fp16_culprit(before, after, feeds: dict, skip=frozenset()) -> str | None:
    """The node of ``before`` (FP32) where the FP16 error of ``after`` starts, not where it shows
    (``foundation.numerics.where_error_starts``, the FP16 budget as each tensor's bound). Both graphs run
    with every node output exposed; outputs keep their names through the conversion."""
    from passes.verify import expose_outputs, run_graph  # noqa: PLC0415 - ONNX Runtime, only when repairing

    reference, actual = run_graph(expose_outputs(before), feeds), run_graph(expose_outputs(after), feeds)

    def ratio(name: str) -> float:
        ref, act = reference.get(name), actual.get(name)
        if ref is None or act is None or ref.dtype.kind != "f" or ref.shape != act.shape:
            return 0.0
        return compare_arrays(act, ref).max_abs / fp16_atol(ref)

    nodes = [(node.name, max((ratio(o) for o in node.output), default=0.0),
              max((ratio(i) for i in node.input), default=0.0))
             for node in before.graph.node if node.name and node.name not in skip]
    starts = where_error_starts(nodes)
    return starts[0] if starts else None


def fp32_nodes(model, keep: tuple[str, ...] = (), measured: tuple[str, ...] = ()) -> list[dict]:
    """The float nodes of a converted ModelProto that compute in FP32, with the reason (for the manifest);
    ``measured``: the nodes the pass kept after measuring (``ConvertToFp16.repair``)."""
    graph = gs.import_onnx(model)
    rule = ConvertToFp16(keep)
    rule.measured = tuple(measured)
    return [{"name": n.name, "op": n.op, "reason": rule._keeps_fp32(n)}
            for n in graph.nodes if rule._keeps_fp32(n) and _float_tensors(n)]


def _to_half(values) -> np.ndarray:
    values = np.asarray(values)
    values = np.where(np.abs(values) > FP16_MAX, np.sign(values) * MASK_VALUE, values)
    return np.asarray(values, dtype=np.float16)  # 0-d stays an array

