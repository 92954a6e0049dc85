"""Run a graph under ONNX Runtime CPU exactly as written (graph optimizations off) and compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from exporter.core.ort_session import create_session


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
        atol, rtol = tolerances[name]
        act = actual.get(name)
        if act is None or act.shape != exp.shape:
            return name, float("inf")
        a, e = act.astype(np.float64), exp.astype(np.float64)
        if not np.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True):
            diff = np.abs(a - e)
            return name, float(np.nanmax(diff)) if diff.size else float("inf")
    return None, 0.0
