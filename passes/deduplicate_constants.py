"""Share identical constants: initializers with the same dtype, shape and bytes become one.

Exporters write the same small constants (axes, shapes, scalars like 0.5 or sqrt(2)) many
times; sharing them shrinks the file and lets common-subexpression elimination see that two
nodes read the same value.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult

logger = logging.getLogger(__name__)


def constant_key(tensor: gs.Constant) -> tuple:
    values = np.asarray(tensor.values)  # not ascontiguousarray: it makes 0-d arrays 1-d, so a scalar would equal [x]
    return values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).hexdigest()


class DeduplicateConstants(Pass):
    """Replaces every copy of an initializer with the first one."""

    def run(self, graph: gs.Graph) -> PassResult:
        first: dict[tuple, gs.Constant] = {}
        replaced = 0
        for node in graph.nodes:
            for i, tensor in enumerate(node.inputs):
                if not isinstance(tensor, gs.Constant) or tensor.values is None:
                    continue
                keep = first.setdefault(constant_key(tensor), tensor)
                if keep is not tensor:
                    node.inputs[i] = keep
                    replaced += 1
        if replaced:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=replaced > 0, stats={"shared": replaced} if replaced else {})
