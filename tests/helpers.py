"""Helpers shared by the tests: tiny inline ONNX graphs and running them under ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from passes.base import PassManager
from passes.verify import run_graph

OPSET = 18
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, domains: tuple[str, ...] = ()
               ) -> onnx.ModelProto:
    """inputs/outputs: (name, numpy dtype, shape) triples; shape entries may be dim names. ``domains``: other
    operator domains the nodes use (version 1, as ``com.microsoft`` has)."""
    def info(name, dtype, shape):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)

    graph = helper.make_graph(list(nodes), "test", [info(*i) for i in inputs], [info(*o) for o in outputs],
                              [onnx.numpy_helper.from_array(v, k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    *(helper.make_opsetid(d, 1) for d in domains)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run_pass(pass_obj, model: onnx.ModelProto):
    """Run one pass directly on a graphsurgeon graph; return (result, new model)."""
    from passes.base import to_model

    graph = gs.import_onnx(model)
    result = pass_obj.run(graph)
    return result, to_model(graph, model)


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict,
                        atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Outputs of both graphs under ONNX Runtime CPU, graph optimizations off, must match."""
    if all(onnx.defs.has(n.op_type, n.domain) for n in rewritten.graph.node):
        onnx.checker.check_model(rewritten, full_check=True)
    # else: ONNX Runtime-only ops (contrib fusions for the ort target) have no ONNX schema; running
    # the graph under ONNX Runtime below is the check.
    expected, actual = run_graph(original, feeds), run_graph(rewritten, feeds)
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, rtol=rtol, err_msg=name)


def add_plan_artifact(bundle, manifest: dict, data: bytes = b"\x00engine bytes") -> None:
    """Give a copied bundle a model.plan whose sha256 matches the manifest. Its bytes are never
    deserialized on a machine without TensorRT: it exercises selection, hashing and copying only."""
    import hashlib

    (bundle / "model.plan").write_bytes(data)
    manifest["artifacts"]["model.plan"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                           "role": "trt-plan"}
    manifest["backends"]["trt"].update(plan="model.plan", skipped=None)


def tiny_manifest(**changes):
    """The smallest valid typed manifest (a one-input model, nothing built), for bundle-store tests."""
    import dataclasses

    from engines.bundle import (
        Accuracy,
        Backends,
        Environment,
        ExportInfo,
        Manifest,
        ModelSource,
        OrtBackend,
        TrtBackend,
    )
    from foundation.spec import InputSpec, OutputSpec

    manifest = Manifest("0", "2026-01-01T00:00:00+00:00", "key", ModelSource("m", "zoo", "m", "0" * 64),
                        InputSpec.parse(["x:float32:[batch=1..4@2,8]"]), (OutputSpec("y", "float32", ("batch", 4)),),
                        (), "fp32", (), (), None, ExportInfo("dynamo", None, 18, 0.0, False, "pytorch"), {},
                        Backends(OrtBackend("model.ort.onnx", "fp32"), TrtBackend("model.trt.onnx", "fp32")),
                        Environment(), Accuracy(None, None, {}))
    return dataclasses.replace(manifest, **changes)


def seeded(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


__all__ = [
    "add_plan_artifact",
    "tiny_manifest",
    "TensorProto",
    "helper",
    "make_model",
    "ops",
    "run_pass",
    "assert_same_outputs",
    "seeded",
    "PassManager",
]
