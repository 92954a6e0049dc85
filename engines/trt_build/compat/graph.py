"""A read-only index of an ONNX graph for the TensorRT checks: producers, consumers, element types
and ranks (after ONNX shape inference), and the constant values (initializers, Constant nodes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper


@dataclasses.dataclass
class GraphIndex:
    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    types: dict[str, int]
    ranks: dict[str, int]
    dims: dict[str, list]
    constants: dict[str, np.ndarray]
    inputs: set[str]
    outputs: set[str]

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort: rules needing a type or rank then skip
            inferred = model
        graph = inferred.graph
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes = list(graph.node)
        for node in nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        constants[node.output[0]] = numpy_helper.to_array(attr.t)
        types, ranks, dims = {}, {}, {}
        for info in [*graph.input, *graph.output, *graph.value_info]:
            tensor = info.type.tensor_type
            if tensor.elem_type:
                types[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                ranks[info.name] = len(tensor.shape.dim)
                dims[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in tensor.shape.dim]
        for t in graph.initializer:
            types[t.name], ranks[t.name], dims[t.name] = t.data_type, len(t.dims), list(t.dims)
        producer = {o: n for n in nodes for o in n.output if o}
        consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                if i:
                    consumers.setdefault(i, []).append(n)
        initializers = {t.name for t in graph.initializer}
        return cls(inferred, nodes, producer, consumers, types, ranks, dims, constants,
                   {i.name for i in graph.input if i.name not in initializers}, {o.name for o in graph.output})

    def opset(self, domain: str = "") -> int | None:
        return next((o.version for o in self.model.opset_import if o.domain in ((domain, "ai.onnx") if domain == ""
                                                                              else (domain,))), None)

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.consumers or name in self.outputs)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def text(value):
    return value.decode() if isinstance(value, bytes) else value
