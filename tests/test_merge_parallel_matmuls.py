"""MergeParallelMatMuls: sibling MatMuls on one input (a decoder's q/k/v, its MLP's gate/up) -> one MatMul
and a Split. Structure, the same numbers under ONNX Runtime, what must not merge (a graph output, another K,
weights that are not constant), idempotence."""

from __future__ import annotations

import numpy as np
from helpers import assert_same_outputs, helper, make_model, ops, run_pass

from passes import MergeParallelMatMuls

rng = np.random.default_rng(0)


def _model(k_other: int = 16, last_is_output: bool = False, dynamic_weight: bool = False):
    weights = {"wq": rng.standard_normal((16, 32)).astype(np.float32),
               "wk": rng.standard_normal((16, 8)).astype(np.float32),
               "wv": rng.standard_normal((16, 8)).astype(np.float32),
               "wo": rng.standard_normal((k_other, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "dyn" if dynamic_weight else "wv"], ["v"], name="v"),
             helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=-1),
             helper.make_node("Relu", ["qkv"], ["y"])]
    inputs = [("x", np.float32, ["b", "s", 16])] + ([("dyn", np.float32, [16, 8])] if dynamic_weight else [])
    outputs = [("y", np.float32, ["b", "s", 48])]
    if k_other == 16:
        nodes += [helper.make_node("MatMul", ["x", "wo"], ["o"], name="o"), helper.make_node("Relu", ["o"], ["o_out"])]
        outputs.append(("o_out", np.float32, ["b", "s", 4]))
    if last_is_output:
        outputs.append(("k", np.float32, ["b", "s", 8]))
    return make_model(nodes, inputs, outputs, weights if k_other == 16 else {k: v for k, v in weights.items()
                                                                             if k != "wo"})


def _feeds(dynamic=False):
    feeds = {"x": rng.standard_normal((2, 3, 16)).astype(np.float32)}
    if dynamic:
        feeds["dyn"] = rng.standard_normal((16, 8)).astype(np.float32)
    return feeds


def test_siblings_become_one_matmul_and_a_split_with_the_same_numbers():
    model = _model()
    result, merged = run_pass(MergeParallelMatMuls(), model)
    assert result.stats == {"merged": 4, "groups": 1}
    assert ops(merged).count("MatMul") == 1 and ops(merged).count("Split") == 1
    weight = next(i for i in merged.graph.initializer if i.name.endswith("_weight"))
    assert list(weight.dims) == [16, 52]
    assert_same_outputs(model, merged, _feeds())


def test_a_graph_output_and_non_constant_weights_are_left_alone():
    model = _model(last_is_output=True, dynamic_weight=True)
    result, merged = run_pass(MergeParallelMatMuls(), model)
    assert result.stats == {"merged": 2, "groups": 1}  # q and o: k writes a graph output, v's weight is an input
    assert ops(merged).count("MatMul") == 3
    assert_same_outputs(model, merged, _feeds(dynamic=True))


def test_one_candidate_is_not_a_group_and_running_again_changes_nothing():
    model = _model()
    _, merged = run_pass(MergeParallelMatMuls(), model)
    assert not run_pass(MergeParallelMatMuls(), merged)[0].changed
