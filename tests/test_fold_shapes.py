import numpy as np
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from passes.fold_shapes import FoldShapes
from passes.infer_shapes import InferShapes

F32 = np.float32


def _shape_model(start=None, end=None, batch="n"):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], **attrs),
        helper.make_node("Cast", ["s"], ["sf"], to=1),
        helper.make_node("ReduceSum", ["sf"], ["total"], keepdims=1),
        helper.make_node("Add", ["y0", "total"], ["y"]),
    ]
    model = make_model(nodes, [("x", F32, [batch, 3, 4]), ("y0", F32, [1])], [("y", F32, [1])])
    return run_pass(InferShapes(), model)[1]


def _feeds(batch=2):
    return {"x": seeded((batch, 3, 4)), "y0": np.zeros(1, F32)}


def test_fold_shapes_honours_start_and_end_where_dims_are_static():
    # graphsurgeon's own folding returned the whole shape here (found by ONNX's test_shape_start_*).
    for start, end in ((1, None), (-2, None), (1, 2), (None, -1)):
        model = _shape_model(start, end)
        result, out = run_pass(FoldShapes(), model)
        if start is None and end == -1:  # x.shape[:-1] includes the dynamic batch: nothing to fold
            assert not result.changed
            continue
        assert result.changed and "Shape" not in ops(out)
        assert_same_outputs(model, out, _feeds(3))
        again, _ = run_pass(FoldShapes(), out)
        assert not again.changed


def test_fold_shapes_folds_gathers_of_static_dims_only():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i_static"], ["d1"], axis=0),
             helper.make_node("Gather", ["s", "i_batch"], ["d0"], axis=0),
             helper.make_node("Mul", ["d0", "d1"], ["p"]), helper.make_node("Cast", ["p"], ["y"], to=1)]
    inits = {"i_static": np.array(2, np.int64), "i_batch": np.array(0, np.int64)}
    model = run_pass(InferShapes(), make_model(nodes, [("x", F32, ["n", 3, 4])], [("y", F32, [])], inits))[1]
    result, out = run_pass(FoldShapes(), model)
    assert result.stats == {"folded": 1} and ops(out).count("Gather") == 1
    assert_same_outputs(model, out, {"x": seeded((5, 3, 4))})


def test_fold_shapes_does_not_fire_on_dynamic_dims():
    model = _shape_model(None, 1)  # only the dynamic batch
    result, out = run_pass(FoldShapes(), model)
    assert not result.changed and ops(out) == ops(model)
    assert_same_outputs(model, out, _feeds(2))
