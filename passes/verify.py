"""Run a graph under ONNX Runtime CPU exactly as written (graph optimizations off) and compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from foundation.numerics import compare_arrays
from foundation.ort_session import create_session


def session(model: onnx.ModelProto | str, optimize: bool = False, threads: int = 0) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return create_session(source, threads, optimize)


def expose_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are every node output (types left for ONNX Runtime to infer), for
    comparing intermediate tensors; run it with graph optimizations off so nothing is fused differently."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name for o in copy.graph.output}
    for node in copy.graph.node:
        for name in node.output:
            if name and name not in known:
                copy.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    return copy


def run_graph(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def worst_difference(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                     tolerances: dict[str, tuple[float, float]]) -> tuple[str | None, float]:
    """The first output outside ``atol + rtol*|expected|`` and its max abs error, or (None, 0)."""
    for name, exp in expected.items():
        act = actual.get(name)
        error = compare_arrays(act, exp, *tolerances[name]) if act is not None else None
        if error is None or not error.ok:
            return name, error.max_abs if error is not None else float("inf")
    return None, 0.0
