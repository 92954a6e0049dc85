"""Freeze dynamic input dims to fixed sizes (``--static``): a static engine for users who want one.

Graph inputs take the given shapes and every intermediate shape is forgotten, so the following
``InferShapes`` recomputes them statically and shape folding can turn shape arithmetic into
constants.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from foundation.errors import PassError
from passes.base import Pass, PassResult

logger = logging.getLogger(__name__)


class FreezeInputShapes(Pass):
    """Replaces symbolic input dims with the given sizes."""

    def __init__(self, shapes: dict[str, tuple[int, ...]] | None = None):
        self.shapes = dict(shapes or {})

    def run(self, graph: gs.Graph) -> PassResult:
        frozen = 0
        for tensor in graph.inputs:
            shape = self.shapes.get(tensor.name)
            if shape is None:
                continue
            if tensor.shape is not None and len(tensor.shape) != len(shape):
                raise PassError(f"cannot freeze input {tensor.name!r} of rank {len(tensor.shape)} to {list(shape)}")
            fixed = [int(s) for s in shape]
            if tensor.shape is not None and any(isinstance(d, int) and d != s for d, s in zip(tensor.shape, fixed)):
                raise PassError(f"input {tensor.name!r} has fixed dims {tensor.shape}; {fixed} disagrees")
            if list(tensor.shape or []) != fixed:
                tensor.shape = fixed
                frozen += 1
        if frozen:
            inputs = {id(t) for t in graph.inputs}
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Variable) and id(tensor) not in inputs:
                    tensor.shape = None  # recomputed by InferShapes, now with fixed sizes
        return PassResult(changed=frozen > 0, stats={"frozen_inputs": frozen} if frozen else {})
