"""Which PyTorch module an ONNX node came from.

torch's dynamo exporter writes each node's name scopes in its metadata (``pkg.torch.onnx.name_scopes``:
``['', 'layers', 'layers.0', 'layers.0.conv1', 'convolution']``, the last the aten op) and the module
classes (``pkg.torch.onnx.class_hierarchy``). planforge's passes rebuild nodes without that metadata,
so optimized graphs are mapped through the bundle's exported graph (``model.onnx``): by node name, else
by the tensor the node writes (passes keep tensor names at the boundary of what they fuse).
"""

from __future__ import annotations

import ast
import dataclasses

import onnx

NO_METADATA = "(no module: the exported graph has no name-scope metadata, e.g. a TorchScript export or an ONNX file)"


@dataclasses.dataclass(frozen=True)
class Provenance:
    by_node: dict[str, str]
    by_tensor: dict[str, str]
    available: bool

    def module(self, node: onnx.NodeProto, producer: dict | None = None, depth: int = 3) -> str:
        """The module of ``node``; ``producer`` (tensor -> node of the same graph) lets a node a pass added
        (a Q/DQ pair, a Cast) be traced up through what it reads."""
        if not self.available:
            return NO_METADATA
        if node.name in self.by_node:
            return self.by_node[node.name]
        for name in node.output:
            if name in self.by_tensor:
                return self.by_tensor[name]
        for name in node.input:
            if name in self.by_tensor:
                return self.by_tensor[name] + " (input)"
        if producer and depth:
            for name in node.input:
                if name in producer:
                    found = self.module(producer[name], producer, depth - 1)
                    if not found.startswith("("):
                        return found if found.endswith(" (input)") else found + " (input)"
        return "(added by a planforge pass)"


def provenance(exported: onnx.ModelProto) -> Provenance:
    by_node, by_tensor = {}, {}
    for node in exported.graph.node:
        path = module_path({p.key: p.value for p in node.metadata_props})
        if path is None:
            continue
        by_node[node.name] = path
        for name in node.output:
            by_tensor[name] = path
    return Provenance(by_node, by_tensor, bool(by_node))


def module_path(metadata: dict[str, str]) -> str | None:
    """``layers.0.conv1 (Conv2d)`` from a node's metadata; ``(top) (ResNet18)`` for the root module."""
    try:
        scopes = ast.literal_eval(metadata["pkg.torch.onnx.name_scopes"])
    except (KeyError, ValueError, SyntaxError):
        return None
    try:
        classes = ast.literal_eval(metadata.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        classes = []
    if not isinstance(scopes, list) or len(scopes) < 2:
        return None
    path = scopes[-2] or "(top)"
    cls = classes[-2].rsplit(".", 1)[-1] if isinstance(classes, list) and len(classes) >= 2 else ""
    return f"{path} ({cls})" if cls else path
