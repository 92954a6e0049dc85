"""FuseSkipRmsNorm: Add(residual, x) -> RMSNormalization -> SkipSimplifiedLayerNormalization with the sum as
its output 3. Structure, the same numbers under ONNX Runtime (both the normalized output and the residual
sum the next layer reads), what must not fuse (a bias Add that broadcasts, a sum that is a graph output), and
idempotence. Decoder graphs are covered end to end in test_decoder.py (the ort pipeline's generation)."""

from __future__ import annotations

import numpy as np
from helpers import assert_same_outputs, helper, make_model, ops

from passes import FuseSkipRmsNorm, InferShapes, PassManager

rng = np.random.default_rng(0)
W = 16


def _model(bias: bool = False, sum_is_output: bool = False):
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["y"], ["b"]),
             helper.make_node("Add", ["a", "bias" if bias else "b"], ["s"]),
             helper.make_node("RMSNormalization", ["s", "gamma"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("Mul", ["n", "s"], ["out"])]  # the sum goes on, as a residual stream does
    outputs = [("out", np.float32, ["b", "t", W])] + ([("s", np.float32, ["b", "t", W])] if sum_is_output else [])
    inits = {"gamma": rng.standard_normal(W).astype(np.float32)}
    if bias:
        inits["bias"] = rng.standard_normal(W).astype(np.float32)
    return make_model(nodes, [("x", np.float32, ["b", "t", W]), ("y", np.float32, ["b", "t", W])], outputs, inits,
                      opset=23)


def _fuse(model):
    fused, records = PassManager([InferShapes(), FuseSkipRmsNorm()]).run(model)
    return records[-1], fused


def _feeds():
    return {name: rng.standard_normal((2, 3, W)).astype(np.float32) for name in ("x", "y")}


def test_add_and_rms_norm_become_one_node_that_also_gives_the_sum():
    model = _model()
    record, fused = _fuse(model)
    assert record.stats == {"fused": 1}
    assert "Add" not in ops(fused) and "RMSNormalization" not in ops(fused)
    node = next(n for n in fused.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert node.domain == "com.microsoft" and node.output[3] == "s"
    assert_same_outputs(model, fused, _feeds())


def test_a_bias_add_and_a_sum_the_graph_returns_are_left_alone():
    for model in (_model(bias=True), _model(sum_is_output=True)):
        record, fused = _fuse(model)
        assert not record.changed and ops(fused) == ops(model)


def test_running_again_changes_nothing():
    _, fused = _fuse(_model())
    assert not _fuse(fused)[0].changed
