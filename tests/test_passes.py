"""Each pass: structure, numbers under ONNX Runtime, a must-not-fire case and idempotence."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from foundation.errors import PassError
from passes import PIPELINES, Cleanup, FoldConstants, InferShapes, PassManager, PassResult
from passes.base import Pass

F32 = np.float32


def _chain_model():
    """y = Relu(x @ W + (a + b)), where a + b is foldable; t is an unannotated intermediate."""
    a, b, w = seeded((4,), 1), seeded((4,), 2), seeded((3, 4), 3)
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("MatMul", ["x", "W"], ["t"]),
             helper.make_node("Add", ["t", "ab"], ["u"]), helper.make_node("Relu", ["u"], ["y"])]
    return make_model(nodes, [("x", F32, ["batch", 3])], [("y", F32, ["batch", 4])], {"a": a, "b": b, "W": w})


FEEDS = {"x": seeded((5, 3), 7)}


# InferShapes ----------------------------------------------------------------------------------

def test_infer_shapes_annotates_intermediates_with_symbolic_dims():
    model = _chain_model()
    result, out = run_pass(InferShapes(), model)
    assert result.changed and result.stats["annotated"] >= 2
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert shapes["t"] == ["batch", 4] and shapes["u"] == ["batch", 4]
    assert ops(out) == ops(model)
    assert_same_outputs(model, out, FEEDS)


def test_infer_shapes_does_not_fire_when_shapes_are_known_and_is_idempotent():
    model = onnx.shape_inference.infer_shapes(_chain_model())
    result, out = run_pass(InferShapes(), model)
    assert not result.changed
    _, once = run_pass(InferShapes(), _chain_model())
    again, _ = run_pass(InferShapes(), once)
    assert not again.changed
    assert_same_outputs(model, out, FEEDS)


# FoldConstants --------------------------------------------------------------------------------

def test_fold_constants_replaces_a_constant_subgraph_with_its_value():
    model = _chain_model()
    result, out = run_pass(FoldConstants(), model)
    assert result.changed and result.stats == {"folded": 1}
    assert ops(out) == ["MatMul", "Add", "Relu"]
    assert_same_outputs(model, out, FEEDS)
    again, _ = run_pass(FoldConstants(), out)
    assert not again.changed


def test_fold_constants_does_not_fire_on_nodes_fed_by_graph_inputs():
    nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
    model = make_model(nodes, [("x", F32, [2])], [("y", F32, [2])], {"c": seeded((2,))})
    result, out = run_pass(FoldConstants(), model)
    assert not result.changed and ops(out) == ["Add"]
    assert_same_outputs(model, out, {"x": seeded((2,), 4)})


def test_fold_constants_leaves_outputs_above_the_size_threshold_computed():
    nodes = [helper.make_node("Expand", ["c", "shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])]
    inits = {"c": seeded((1, 1)), "shape": np.array([512, 512], np.int64)}
    model = make_model(nodes, [("x", F32, [512, 512])], [("y", F32, [512, 512])], inits)
    result, out = run_pass(FoldConstants(size_threshold=1 << 16), model)
    assert not result.changed and ops(out) == ["Expand", "Add"]
    assert_same_outputs(model, out, {"x": seeded((512, 512), 5)})
    result, folded = run_pass(FoldConstants(), model)  # default threshold (16 MiB) folds 1 MiB
    assert result.changed and ops(folded) == ["Add"]
    assert_same_outputs(model, folded, {"x": seeded((512, 512), 5)})


def test_fold_constants_is_strict_when_a_constant_node_fails():
    nodes = [helper.make_node("Reshape", ["c", "shape"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    inits = {"c": seeded((6,)), "shape": np.array([4, 2], np.int64)}  # 6 elements cannot become 4x2
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", 1, [4, 2])],
                              [helper.make_tensor_value_info("y", 1, [4, 2])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model.graph.node[0].name = "reshape_weights"
    with pytest.raises(PassError, match=r"constant folding failed at node reshape_weights \(Reshape\)"):
        run_pass(FoldConstants(), model)


# Cleanup --------------------------------------------------------------------------------------

def test_cleanup_removes_identity_and_inference_dropout_and_dead_nodes():
    nodes = [helper.make_node("Identity", ["x"], ["i1"]), helper.make_node("Relu", ["i1"], ["r"]),
             helper.make_node("Dropout", ["r"], ["d"]), helper.make_node("Sigmoid", ["x"], ["unused"]),
             helper.make_node("Identity", ["d"], ["y"])]
    model = make_model(nodes, [("x", F32, [2, 3])], [("y", F32, [2, 3])])
    result, out = run_pass(Cleanup(), model)
    assert result.changed and result.stats == {"passthrough": 3, "dead": 1}
    assert ops(out) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]  # the graph output keeps its name
    assert_same_outputs(model, out, {"x": seeded((2, 3))})
    again, _ = run_pass(Cleanup(), out)
    assert not again.changed


def test_cleanup_keeps_dropout_whose_mask_is_used_and_identity_of_an_input_to_an_output():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Cast", ["mask"], ["m"], to=1),
             helper.make_node("Add", ["d", "m"], ["y"]), helper.make_node("Identity", ["x"], ["z"])]
    model = make_model(nodes, [("x", F32, [2, 3])], [("y", F32, [2, 3]), ("z", F32, [2, 3])])
    result, out = run_pass(Cleanup(), model)
    assert not result.changed and sorted(ops(out)) == sorted(ops(model))
    assert_same_outputs(model, out, {"x": seeded((2, 3))})


# PassManager ----------------------------------------------------------------------------------

class _NeedsFolding(Pass):
    requires = (FoldConstants,)

    def run(self, graph):
        return PassResult(False)


class _FlipAddToSub(Pass):
    """A deliberately wrong pass: the verifier must catch it."""

    def run(self, graph: gs.Graph) -> PassResult:
        for node in graph.nodes:
            if node.op == "Add":
                node.op = "Sub"
        return PassResult(True, {"flipped": 1})


def test_manager_enforces_declared_requirements():
    with pytest.raises(PassError, match="_NeedsFolding requires FoldConstants"):
        PassManager([_NeedsFolding(), FoldConstants()])
    PassManager([FoldConstants(), _NeedsFolding()])


def test_manager_verification_names_the_pass_that_changed_the_numbers():
    manager = PassManager([InferShapes(), _FlipAddToSub()], verify_feeds=[FEEDS])
    with pytest.raises(PassError, match="pass _FlipAddToSub changed output 'y'.*--skip-pass _FlipAddToSub"):
        manager.run(_chain_model())


def test_manager_refuses_verification_feeds_that_do_not_run_the_original_graph():
    manager = PassManager([InferShapes(), FoldConstants()], verify_feeds=[{"x": seeded((5, 2), 7)}])  # x is [batch, 3]
    with pytest.raises(PassError, match="verification feeds do not run the graph before the passes.*INVALID_ARGUMENT"):
        manager.run(_chain_model())


def test_manager_records_stats_and_keeps_ir_version_and_opset():
    model = _chain_model()
    out, records = PassManager([InferShapes(), FoldConstants(), Cleanup()], verify_feeds=[FEEDS]).run(model)
    assert [r.name for r in records] == ["InferShapes", "FoldConstants", "Cleanup"]
    folding = records[1]
    assert folding.nodes_before == {"Add": 2, "MatMul": 1, "Relu": 1}
    assert folding.nodes_after == {"Add": 1, "MatMul": 1, "Relu": 1}
    assert out.ir_version == model.ir_version and out.opset_import[0].version == 18
    assert_same_outputs(model, out, FEEDS)


def test_every_pipeline_satisfies_its_own_requirements():
    from passes import pipeline

    for target, precision in PIPELINES:
        PassManager(pipeline(target, precision))


def test_skip_pass_leaves_a_pass_out_refuses_unknown_names_and_keeps_requirements():
    from foundation.errors import UsageError
    from passes import pipeline

    def names(steps):
        return [n for s in steps for n in (names(s.passes) if hasattr(s, "passes") else [s.name])]

    assert "FuseAttention" in names(pipeline("ort", "fp32"))
    skipped = pipeline("ort", "fp32", skip=("FuseAttention", "FuseGelu"))
    assert not {"FuseAttention", "FuseGelu"} & set(names(skipped)) and "FuseLayerNorm" in names(skipped)
    PassManager(skipped)  # still a valid pipeline
    assert names(pipeline("trt", "fp32", skip=("FuseAttention",))) == names(pipeline("trt", "fp32"))  # ort-only pass
    with pytest.raises(UsageError, match="--skip-pass FuseAtention: no such pass; the ort/fp32 pipeline runs"):
        pipeline("ort", "fp32", skip=("FuseAtention",))
    with pytest.raises(PassError, match="requires InferShapes"):
        PassManager(pipeline("trt", "fp16", skip=("InferShapes",)))
    model = _chain_model()
    out, records = PassManager(pipeline("ort", "fp32", skip=("FoldConstants",)), verify_feeds=[FEEDS]).run(model)
    assert "FoldConstants" not in [r.name for r in records] and "Add" in ops(out)
    assert_same_outputs(model, out, FEEDS)
