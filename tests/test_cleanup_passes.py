"""RemoveNoOps, MergeTransposes, MergeReshapes, DeduplicateConstants, EliminateCommonSubexpressions."""

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from passes import FixedPoint, PassManager
from passes.deduplicate_constants import DeduplicateConstants
from passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from passes.infer_shapes import InferShapes
from passes.merge_reshapes import MergeReshapes
from passes.merge_transposes import MergeTransposes
from passes.remove_noops import RemoveNoOps

F32 = np.float32
X = {"x": seeded((2, 3, 4))}


def _inferred(model):
    return run_pass(InferShapes(), model)[1]


def _noop_model(noop: bool):
    """Cast, Reshape, Transpose and Expand that are no-ops (or, with noop=False, are not)."""
    to = onnx.TensorProto.FLOAT if noop else onnx.TensorProto.DOUBLE
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=to),
             helper.make_node("Reshape", ["c", "s"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 2] if noop else [0, 2, 1]),
             helper.make_node("Expand", ["t", "e"], ["u"]),
             helper.make_node("Concat", ["u"] if noop else ["u", "u"], ["k"], axis=0),  # a traced empty KV cache
             helper.make_node("Relu", ["k"], ["y"])]
    shape = np.array([0, 3, -1] if noop else [2, 12, 1], np.int64)
    expand = np.array([1, 4] if noop else [2, 2, 3, 4], np.int64)
    out_dtype = F32 if noop else np.float64
    out_shape = ["n", 3, 4] if noop else [4, 2, 1, 12]
    if not noop:
        expand = np.array([2, 2, 1, 12], np.int64)
    return make_model(nodes, [("x", F32, ["n", 3, 4])], [("y", out_dtype, out_shape)], {"s": shape, "e": expand})


def test_remove_noops_removes_each_kind_and_keeps_numbers():
    model = _inferred(_noop_model(True))
    result, out = run_pass(RemoveNoOps(), model)
    assert result.stats == {"Cast": 1, "Reshape": 1, "Transpose": 1, "Expand": 1, "Concat": 1}
    assert ops(out) == ["Relu"]
    assert_same_outputs(model, out, X)
    again, _ = run_pass(RemoveNoOps(), out)
    assert not again.changed


def test_remove_noops_does_not_fire_when_the_op_changes_the_tensor():
    model = _inferred(_noop_model(False))
    result, out = run_pass(RemoveNoOps(), model)
    assert not result.changed and ops(out) == ops(model)
    assert_same_outputs(model, out, {"x": seeded((2, 3, 4))})


def test_remove_noops_requires_shape_inference():
    with pytest.raises(Exception, match="RemoveNoOps requires InferShapes"):
        PassManager([RemoveNoOps()])


def _transposes(p1, p2, extra_reader=False):
    mid = [[2, 3, 4][i] for i in p1]
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=p1), helper.make_node("Transpose", ["a"], ["y"], perm=p2)]
    outputs = [("y", F32, [mid[i] for i in p2])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["a"], ["z"]))
        outputs.append(("z", F32, mid))
    return make_model(nodes, [("x", F32, [2, 3, 4])], outputs)


def test_merge_transposes_composes_permutations_and_drops_identities():
    model = _transposes([1, 2, 0], [0, 2, 1])
    result, out = run_pass(MergeTransposes(), model)
    assert result.changed and ops(out) == ["Transpose"]
    assert list(out.graph.node[0].attribute[0].ints) == [1, 0, 2]
    assert_same_outputs(model, out, X)
    inverse = _transposes([1, 2, 0], [2, 0, 1])
    result, out = run_pass(MergeTransposes(), inverse)
    assert result.changed and ops(out) in ([], ["Transpose"])  # x -> y directly, or one identity copy
    assert_same_outputs(inverse, out, X)
    again, _ = run_pass(MergeTransposes(), run_pass(MergeTransposes(), model)[1])
    assert not again.changed


def test_merge_transposes_does_not_fire_when_the_inner_one_has_other_readers():
    model = _transposes([1, 2, 0], [0, 2, 1], extra_reader=True)
    result, out = run_pass(MergeTransposes(), model)
    assert not result.changed and len(ops(out)) == 3
    assert_same_outputs(model, out, X)


def _reshapes(second):
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("Reshape", ["a", "s2"], ["y"])]
    inits = {"s1": np.array([6, 4], np.int64), "s2": np.array(second, np.int64)}
    shape = [6 if d == 0 else d for d in second]
    shape = [int(24 // -np.prod(shape)) if d == -1 else int(d) for d in shape]
    return make_model(nodes, [("x", F32, [2, 3, 4])], [("y", F32, shape)], inits)


def test_merge_reshapes_keeps_only_the_last_shape():
    model = _reshapes([4, -1])
    result, out = run_pass(MergeReshapes(), model)
    assert result.changed and ops(out) == ["Reshape"]
    assert_same_outputs(model, out, X)
    again, _ = run_pass(MergeReshapes(), out)
    assert not again.changed


def test_merge_reshapes_does_not_fire_when_the_outer_shape_copies_dims():
    model = _reshapes([0, 2, 2])  # 0 copies the intermediate's first dim (6), not x's (2)
    result, out = run_pass(MergeReshapes(), model)
    assert not result.changed and ops(out) == ["Reshape", "Reshape"]
    assert_same_outputs(model, out, X)


def _head_split(back):
    """x [batch, seq, 8] -> [batch, seq, 2, 4] (a shape computed at run time, as exporters write it) -> ``back``
    (with 0 entries) -> Relu."""
    nodes = [helper.make_node("Shape", ["x"], ["full"]),
             helper.make_node("Slice", ["full", "zero", "two"], ["bs"]),
             helper.make_node("Concat", ["bs", "heads"], ["s1"], axis=0),
             helper.make_node("Reshape", ["x", "s1"], ["a"]),
             helper.make_node("Reshape", ["a", "s2"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    inits = {"zero": np.array([0], np.int64), "two": np.array([2], np.int64), "heads": np.array([2, 4], np.int64),
             "s2": np.array(back, np.int64)}
    out = ["batch", "seq"] + [int(d) for d in back[2:]]
    return make_model(nodes, [("x", F32, ["batch", "seq", 8])], [("y", F32, out)], inits)


def test_merge_reshapes_removes_a_round_trip_whose_shapes_are_only_known_at_run_time():
    """[batch, seq, 8] -> [batch, seq, 2, 4] -> [0, 0, 8]: the inferred shapes say the pair is the identity, though
    neither target is a constant without 0 entries. Both go (the shape arithmetic with them)."""
    model = _inferred(_head_split([0, 0, 8]))
    result, out = run_pass(MergeReshapes(), model)
    assert result.changed and ops(out) == ["Relu"]
    feeds = {"x": seeded((3, 5, 8))}
    assert_same_outputs(model, out, feeds)
    again, _ = run_pass(MergeReshapes(), _inferred(out))
    assert not again.changed


def test_merge_reshapes_keeps_a_pair_that_does_not_come_back():
    """[batch, seq, 8] -> [batch, seq, 2, 4] -> [0, 0, 4, 2] is not the identity (nor mergeable: the 0s copy the
    intermediate's dims); an uninferred graph (no shapes) is left alone too."""
    for model in (_inferred(_head_split([0, 0, 4, 2])), _head_split([0, 0, 8])):
        result, out = run_pass(MergeReshapes(), model)
        assert not result.changed and ops(out).count("Reshape") == 2
        assert_same_outputs(model, out, {"x": seeded((3, 5, 8))})


def _duplicates(same_values=True):
    half = np.array(0.5, F32)
    other = half if same_values else np.array(0.25, F32)
    nodes = [helper.make_node("Mul", ["x", "h1"], ["a"]), helper.make_node("Mul", ["x", "h2"], ["b"]),
             helper.make_node("Exp", ["a"], ["ea"]), helper.make_node("Exp", ["b"], ["eb"]),
             helper.make_node("Add", ["ea", "eb"], ["y"])]
    return make_model(nodes, [("x", F32, [2, 3, 4])], [("y", F32, [2, 3, 4])], {"h1": half, "h2": other.copy()})


def test_deduplicate_then_cse_collapse_repeated_work():
    model = _duplicates()
    result, deduped = run_pass(DeduplicateConstants(), model)
    assert result.stats == {"shared": 1} and len(deduped.graph.initializer) == 1
    assert_same_outputs(model, deduped, X)
    result, out = run_pass(EliminateCommonSubexpressions(), deduped)
    assert result.stats == {"merged": 2} and ops(out) == ["Mul", "Exp", "Add"]
    assert_same_outputs(model, out, X)
    assert not run_pass(DeduplicateConstants(), out)[0].changed
    assert not run_pass(EliminateCommonSubexpressions(), out)[0].changed


def test_dedup_and_cse_do_not_fire_on_different_values_or_random_ops():
    model = _duplicates(same_values=False)
    assert not run_pass(DeduplicateConstants(), model)[0].changed
    result, out = run_pass(EliminateCommonSubexpressions(), model)
    assert not result.changed and ops(out) == ops(model)
    assert_same_outputs(model, out, X)
    nodes = [helper.make_node("RandomUniformLike", ["x"], ["a"], seed=1.0),
             helper.make_node("RandomUniformLike", ["x"], ["b"], seed=1.0), helper.make_node("Add", ["a", "b"], ["y"])]
    random_model = make_model(nodes, [("x", F32, [2])], [("y", F32, [2])])
    assert not run_pass(EliminateCommonSubexpressions(), random_model)[0].changed


def test_fixed_point_group_repeats_until_nothing_changes():
    # Reshape(Reshape(Transpose(Transpose(x)))) where the transposes cancel and the reshapes
    # merge into a no-op: each pass exposes work for another.
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["t2", "s1"], ["r1"]), helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
             helper.make_node("Relu", ["r2"], ["y"])]
    inits = {"s1": np.array([6, 4], np.int64), "s2": np.array([2, 3, 4], np.int64)}
    model = make_model(nodes, [("x", F32, [2, 3, 4])], [("y", F32, [2, 3, 4])], inits)
    group = FixedPoint([InferShapes(), MergeTransposes(), MergeReshapes(), RemoveNoOps()])
    out, records = PassManager([group], verify_feeds=[X]).run(model)
    assert ops(out) == ["Relu"]
    assert sum(r.changed for r in records) >= 3 and not any(r.changed for r in records[-4:])
    assert_same_outputs(model, out, X)


def test_deduplicate_keeps_a_scalar_and_a_one_element_vector_apart():
    # Found by the peer corpus (test_affine_grid_*_expanded): Slice needs 1-D starts.
    nodes = [helper.make_node("Slice", ["x", "starts", "ends"], ["s"]), helper.make_node("Add", ["s", "one"], ["y"])]
    inits = {"starts": np.array([1], np.int64), "ends": np.array([3], np.int64), "one": np.array(1, np.int64)}
    model = make_model(nodes, [("x", np.int64, [4])], [("y", np.int64, [2])], inits)
    result, out = run_pass(DeduplicateConstants(), model)
    assert not result.changed and len(out.graph.initializer) == 3
    assert_same_outputs(model, out, {"x": np.arange(4, dtype=np.int64)})
