"""What TensorRT will refuse, decided on a CPU before any GPU is involved (``planforge check-trt``).

``check_model(model)`` runs the parser rules (``rules``: operators, domains, opset, types, restrictions
from the operator table of a TensorRT version, ``table``) and, on Q/DQ graphs, the placement lint
(``qdq``) over the graph TensorRT would get; it returns a ``CompatReport`` of findings, and which layers
hold 2:4 sparse weights (``passes/sparsify_24.py``: what ``SPARSE_WEIGHTS`` can use).
"""

from __future__ import annotations

import onnx

from engines.trt_build.compat.findings import CHECK, REFUSED, CompatReport, Finding
from engines.trt_build.compat.graph import GraphIndex
from engines.trt_build.compat.qdq import placement_findings, type_findings
from engines.trt_build.compat.rules import model_findings, node_findings
from engines.trt_build.compat.table import DEFAULT_VERSION, load_table, versions
from passes.sparsify_24 import sparse_layers

__all__ = ["CHECK", "DEFAULT_VERSION", "REFUSED", "CompatReport", "Finding", "check_model", "versions"]


def check_model(model: onnx.ModelProto, version: str = DEFAULT_VERSION, graph: str = "") -> CompatReport:
    table = load_table(version)
    index = GraphIndex.build(model)
    found = model_findings(index, table)
    for node in index.nodes:
        found += node_findings(node, index, table)
        for sub in _subgraph_nodes(node):  # If / Loop bodies: operator support only
            found += [f for f in node_findings(sub, index, table) if f.rule in ("unsupported-op", "plugin")]
    found += type_findings(index) + placement_findings(index)
    layers, sparse = sparse_layers(model)
    return CompatReport(table.version, table.source, graph, len(index.nodes), tuple(found), len(layers), tuple(sparse))


def _subgraph_nodes(node: onnx.NodeProto):
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for sub in g.node:
                yield sub
                yield from _subgraph_nodes(sub)
