"""``planforge debug BUNDLE``: the first layer where a bundle's FP16 or INT8 graph diverges from FP32.

The exported FP32 graph (``model.onnx``) and a side's graph (``trt``: ``model.trt.onnx``; ``ort``: its
ONNX Runtime graph) run on the same inputs with every node output exposed and ONNX Runtime's graph
optimizations off, so exposing tensors changes nothing that is measured and nothing is fused
differently. Tensors that exist in both under the same name are compared in the side's topological
order; a region a pass fused is compared at its boundary (its inner tensors exist in one graph only).

A tensor diverges when its max abs error exceeds the side's bound: FP32 ``1e-4 + 1e-3 * max|ref|``, FP16
the FP16 pass's ``2e-2 * max|ref| + 1e-3``, INT8 ``0.25 * max|ref|`` (``INT8_RELERR``: beyond
quantization noise). Data: the bundle's evaluation batches when it has them, else golden.npz (``--data``
as in compare), the first ``--batches``. Where the error *starts* is a diverging tensor whose node reads
only tensors within the bound (``foundation.numerics.where_error_starts``); each is reported with its
ONNX node, operator and PyTorch module (``engines.evaluate.provenance``). ``--bisect`` then keeps groups
of the suspected nodes in float (``engines.evaluate.bisect``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx

from engines.bundle import Manifest, read_manifest, verified_path
from engines.evaluate.compare.data import load_data
from engines.evaluate.provenance import provenance
from foundation.errors import UsageError
from foundation.numerics import GRAPH_ATOL, GRAPH_RTOL, compare_arrays, fp16_atol, where_error_starts
from passes.verify import expose_outputs, run_graph

logger = logging.getLogger(__name__)

# An INT8 tensor's bound relative to max|ref|. An INT8 budget is a task metric on the outputs and implies no
# per-tensor bound; quantization noise inside healthy bundles reaches 0.12 (resnet18, pre-activation
# BatchNorm outputs) and 0.17 (bert_tiny's ONNX Runtime graph, top-1 / cosine budgets met), so a tensor
# diverges past 0.25: beyond quantization noise. ``--int8-relerr`` tightens it.
INT8_RELERR = 0.25
# ONNX Runtime's quantizer removes a Relu/Clip before QuantizeLinear (the u8 range clips instead) and gives
# its output name to the Conv before it: that tensor is pre-activation in the candidate, not comparable.
CLIPPING = {"Relu", "Clip"}


@dataclasses.dataclass(frozen=True)
class DebugRequest:
    bundle: Path
    side: str = "auto"  # auto | trt | ort
    data: str = "auto"  # as compare's --data
    batches: int = 1
    limit: int = 10
    bisect: bool = False
    int8_relerr: float = INT8_RELERR
    budget: str | None = None  # --bisect: the budget the outputs must meet (default: the bundle's)


@dataclasses.dataclass(frozen=True)
class TensorError:
    tensor: str
    node: str
    op: str
    module: str
    max_abs: float
    scale: float  # max |reference|
    bound: float
    inputs_ratio: float  # the worst error / bound among the tensors the node reads (<= 1: the error starts here)

    @property
    def ratio(self) -> float:
        return self.max_abs / self.bound if self.bound > 0 else (0.0 if self.max_abs == 0 else float("inf"))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


@dataclasses.dataclass
class DebugResult:
    bundle: Path
    side: str
    graph: str
    precision: str
    data: str
    compared: int
    diverging: list[TensorError]  # every tensor over its bound, in topological order
    first: list[TensorError]  # where the error starts
    outputs: list[TensorError]
    bisect: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.diverging

    def to_json(self) -> dict:
        return {"ok": self.ok, "bundle": str(self.bundle), "side": self.side, "graph": self.graph,
                "precision": self.precision, "data": self.data, "compared": self.compared,
                "first": [t.to_json() for t in self.first], "diverging": len(self.diverging),
                "outputs": [t.to_json() for t in self.outputs], "bisect": self.bisect}


def debug(request: DebugRequest) -> DebugResult:
    bundle = Path(request.bundle)
    manifest = read_manifest(bundle)
    side = _side(manifest, request.side)
    entry = manifest.backends.for_target(side)
    exported = onnx.load(str(verified_path(bundle, manifest, "model.onnx")))
    candidate = onnx.load(str(verified_path(bundle, manifest, entry.graph)))
    source = request.data
    if source == "auto":
        source = "eval" if "evaluation.npz" in manifest.artifacts else "golden"
    data = load_data(source, bundle, manifest, manifest.inputs, request.batches)
    feeds = data.feeds[:request.batches]
    bound = _bound(entry.precision, request.int8_relerr)
    errors = tensor_errors(exported, candidate, feeds, bound)
    where = provenance(exported)
    order = {name: k for k, node in enumerate(candidate.graph.node) for name in node.output}
    producers = {o: n for n in candidate.graph.node for o in n.output}
    rows = []
    for name in sorted(errors, key=lambda n: order.get(n, -1)):
        node = producers.get(name)
        if node is None:  # a graph output no node writes (an input or initializer passed through)
            continue
        max_abs, scale, limit = errors[name]
        reads = [
            errors[i][0] / errors[i][2] if errors[i][2] > 0 else 0.0 for i in _compared_inputs(node, producers, errors)
        ]
        rows.append(TensorError(name, node.name, node.op_type, where.module(node, producers), max_abs, scale, limit,
                                max(reads, default=0.0)))
    diverging = [r for r in rows if r.ratio > 1.0]
    starts = set(where_error_starts([(r.tensor, r.ratio, r.inputs_ratio) for r in rows]))
    first = [r for r in diverging if r.tensor in starts]
    outputs = [r for r in rows if r.tensor in {o.name for o in candidate.graph.output}]
    logger.debug("%s (%s): %d tensors compared, %d over the bound, %d where the error starts", entry.graph,
                entry.precision, len(rows), len(diverging), len(first))
    result = DebugResult(bundle, side, entry.graph, entry.precision, data.description, len(rows), diverging,
                         first[:request.limit], outputs)
    if request.bisect and first:
        from engines.evaluate.bisect import bisect  # noqa: PLC0415

        result.bisect = bisect(manifest, bundle, side, exported, candidate, feeds, [r.node for r in first],
                               request.budget)
    return result


def _compared_inputs(node: onnx.NodeProto, producers: dict, errors: dict) -> set[str]:
    """The compared tensors ``node`` reads, looking up through tensors only the candidate has (a Q/DQ pair,
    a Cast, the inside of a fused region) to the nearest compared ones."""
    found, seen, todo = set(), set(), [i for i in node.input if i]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in errors:
            found.add(name)
        elif name in producers:
            todo += [i for i in producers[name].input if i]
    return found


def tensor_errors(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict],
                  bound) -> dict[str, tuple[float, float, float]]:
    """Per tensor present in both graphs (same name, float, same shape): (max abs error, max |ref|, bound)
    over ``feeds``; both graphs run as written with every node output exposed."""
    worst: dict[str, list[float]] = {}
    ops = {o: n.op_type for n in candidate.graph.node for o in n.output}
    folded = {o for n in reference.graph.node if n.op_type in CLIPPING for o in n.output
              if ops.get(o, n.op_type) != n.op_type}
    for feed in feeds:
        ref, act = run_graph(expose_outputs(reference), feed), run_graph(expose_outputs(candidate), feed)
        for name, r in ref.items():
            a = act.get(name)
            if a is None or r.dtype.kind != "f" or a.dtype.kind != "f" or r.shape != a.shape or name in feed \
                    or name in folded:
                continue
            error = compare_arrays(a, r)
            values = worst.setdefault(name, [0.0, 0.0, 0.0])
            values[0] = max(values[0], error.max_abs)
            values[1] = max(values[1], error.scale)
            values[2] = max(values[2], bound(r))
    return {k: (v[0], v[1], v[2]) for k, v in worst.items()}


def _bound(precision: str, relerr: float):
    if precision == "fp16":
        return fp16_atol
    if precision == "int8":
        return lambda ref: relerr * float(np.abs(ref).max(initial=0.0)) + GRAPH_ATOL
    return lambda ref: GRAPH_ATOL + GRAPH_RTOL * float(np.abs(ref).max(initial=0.0))


def _side(manifest: Manifest, side: str) -> str:
    if side in ("trt", "ort"):
        return side
    if side != "auto":
        raise UsageError(f"--side {side!r}: expected trt, ort or auto")
    backends = manifest.backends
    return "trt" if backends.trt.precision != "fp32" or backends.ort.precision == "fp32" else "ort"
