"""``planforge inspect BUNDLE --layers``: the precision each node computes in, and the PyTorch module it
came from (``engines.evaluate.provenance``), per graph of the bundle; and TensorRT's own layer list
(``model.layers.json``, the engine inspector's JSON) mapped back to ONNX nodes and modules.

A node's precision: ``int8`` when it reads a DequantizeLinear output (TensorRT fuses the pair into it;
ONNX Runtime runs the QDQ form as its QLinear kernels) or is one of ONNX Runtime's integer operators;
``qdq`` for QuantizeLinear / DequantizeLinear themselves; ``cast`` for Cast; else the type of the float
tensors it reads or writes (``fp32``, ``fp16``, ``bf16``); ``int`` when it moves no floats (shape
arithmetic, indices). Types come from ONNX shape inference; where it cannot type a node (contrib
operators), the node takes the precision of what it reads.
"""

from __future__ import annotations

import collections
import json

import onnx

from engines.evaluate.provenance import Provenance

INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
               "QAttention", "DynamicQuantizeMatMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "MatMulIntegerToFloat"}
FLOATS = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
          onnx.TensorProto.DOUBLE: "fp64"}


def node_precisions(model: onnx.ModelProto, where: Provenance) -> list[dict]:
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort: untyped nodes inherit from their inputs
        typed = model
    graph = typed.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    precision: dict[str, str] = {}
    rows = []
    for node in graph.node:
        value = _precision(node, types, producer, precision)
        for o in node.output:
            precision[o] = value
        rows.append({"node": node.name, "op": node.op_type, "precision": value, "module": where.module(node, producer)})
    return rows


def _precision(node, types, producer, known) -> str:
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return "qdq"
    if node.op_type in INTEGER_OPS:
        return "int8"
    if node.op_type == "Cast":
        return "cast"
    if any((p := producer.get(i)) is not None and p.op_type == "DequantizeLinear" for i in node.input):
        return "int8"
    floats = [FLOATS[t] for t in (types.get(n, 0) for n in [*node.input, *node.output] if n) if t in FLOATS]
    if floats:
        return floats[0]
    typed = [n for n in [*node.input, *node.output] if n and types.get(n)]
    if typed:
        return "int"
    inherited = [known[i] for i in node.input if i in known and known[i] not in ("qdq", "cast", "int")]
    return inherited[0] if inherited else "fp32"


def counts(rows: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(r["precision"] for r in rows))


def trt_layers(layer_json: str, where: Provenance, model: onnx.ModelProto) -> list[dict]:
    """TensorRT's engine inspector JSON (``model.layers.json``): per layer its name, type, the precision of
    its first output (``Int8``, ``Half``, ``Float`` in the tensor format), the ONNX nodes fused into it
    (TensorRT names a fused layer ``"a + b + c"``) and their modules."""
    doc = json.loads(layer_json)
    nodes = {n.name: n for n in model.graph.node if n.name}
    rows = []
    for layer in doc.get("Layers", []):
        if isinstance(layer, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY
            layer = {"Name": layer}
        name = layer.get("Name", "")
        fused = [part.strip() for part in name.replace("[", " ").replace("]", " ").split("+")]
        onnx_nodes = [p for p in fused if p in nodes]
        outputs = layer.get("Outputs") or []
        fmt = (outputs[0].get("Format/Datatype", "") if outputs and isinstance(outputs[0], dict) else "")
        kind = fmt.split()[0].lower() if fmt else ""
        rows.append(
            {
                "layer": name,
                "type": layer.get("LayerType", ""),
                "precision": {"int8": "int8", "half": "fp16", "float": "fp32", "bf16": "bf16"}.get(kind, kind or "?"),
                "onnx_nodes": onnx_nodes,
                "modules": sorted({where.module(nodes[n]) for n in onnx_nodes}),
            }
        )
    return rows


def bundle_layers(bundle, manifest) -> dict:
    """Per graph of the bundle (one entry when both targets share a file): targets, counts, nodes; and
    TensorRT's layers when the bundle has ``model.layers.json``."""
    from engines.bundle import verified_path  # noqa: PLC0415
    from engines.evaluate.provenance import provenance  # noqa: PLC0415

    where = provenance(onnx.load(str(verified_path(bundle, manifest, "model.onnx")), load_external_data=False))
    graphs: dict[str, dict] = {}
    for target in ("trt", "ort"):
        entry = manifest.backends.for_target(target)
        if entry.graph in graphs:
            graphs[entry.graph]["targets"].append(target)
            continue
        model = onnx.load(str(verified_path(bundle, manifest, entry.graph)))
        rows = node_precisions(model, where)
        graphs[entry.graph] = {"targets": [target], "precision": entry.precision, "counts": counts(rows), "nodes": rows}
    layers = None
    engine = manifest.backends.trt
    if engine.plan and engine.layers and engine.layers in manifest.artifacts:
        graph = onnx.load(str(verified_path(bundle, manifest, engine.graph)))
        layers = trt_layers(verified_path(bundle, manifest, engine.layers).read_text(), where, graph)
    return {"graphs": graphs, "trt_layers": layers, "modules_recorded": where.available}
