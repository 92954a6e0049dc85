"""Shape and type inference with ONNX's own ``infer_shapes`` (data propagation on).

Fills the dtype and shape of every intermediate tensor the inference can derive; symbolic dims
keep their names (``batch``, ``seq``), which later passes and TensorRT profiles rely on. Shapes
already known are left alone.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from passes.base import Pass, PassResult

logger = logging.getLogger(__name__)


class InferShapes(Pass):
    """Annotates intermediate tensors with inferred dtypes and shapes."""

    def run(self, graph: gs.Graph) -> PassResult:
        model = gs.export_onnx(graph, do_type_check=False)
        model.ir_version = 10
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        tensors = graph.tensors()
        filled = 0
        for info in list(inferred.graph.value_info) + list(inferred.graph.output):
            tensor = tensors.get(info.name)
            if not isinstance(tensor, gs.Variable) or tensor.shape is not None:
                continue
            ttype = info.type.tensor_type
            if not ttype.HasField("shape"):
                continue
            tensor.dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
            tensor.shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                            for d in ttype.shape.dim]
            filled += 1
        return PassResult(changed=filled > 0, stats={"annotated": filled} if filled else {})
