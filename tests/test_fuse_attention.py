"""Attention fusions on graphs made here, one per mask form and per exporter spelling: FuseAttention
(``ort``: ONNX's Attention with 3-D inputs, or com.microsoft.MultiHeadAttention below opset 18) and
FuseStandardAttention (``trt``: ONNX's Attention with 4-D inputs). Structure and numbers both, on
symbolic batch and sequence dims; real exports are in test_transformer_exports.py."""

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from passes.fold_shapes import FoldShapes
from passes.fuse_attention import FuseAttention
from passes.fuse_standard_attention import FuseStandardAttention
from passes.infer_shapes import InferShapes
from passes.verify import run_graph

F32 = np.float32
B, S, T, N, H = 2, 5, 6, 2, 4
D = N * H
MIN = float(np.finfo(F32).min)


def _const(name, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(value, dtype), name))


def _split(x: str, name: str, perm: list[int]) -> list:
    """Reshape x [B, L, D] to [B, L, N, H] with the target computed from Shape(x), then Transpose."""
    return [helper.make_node("Shape", [x], [f"{name}_shape"]),
            helper.make_node("Slice", [f"{name}_shape", "zero", "two"], [f"{name}_bl"]),
            helper.make_node("Concat", [f"{name}_bl", "heads_size"], [f"{name}_target"], axis=0),
            helper.make_node("Reshape", [x, f"{name}_target"], [f"{name}r"]),
            helper.make_node("Transpose", [f"{name}r"], [f"{name}4"], perm=perm)]


def _key(form: str) -> list:
    """k transposed to [B, N, H, T] as eager code, the legacy exporter and dynamo's SDPA write it."""
    if form == "eager":
        return _split("k", "k", [0, 2, 3, 1])
    nodes = _split("k", "kh", [0, 2, 1, 3])
    if form == "transpose":
        return nodes + [helper.make_node("Transpose", ["kh4"], ["k4"], perm=[0, 1, 3, 2])]
    return nodes + [  # dynamo: Reshape(Transpose(Reshape(k4, [-1, T, H]), [0, 2, 1]), [B, N, H, T])
        helper.make_node("Shape", ["kh4"], ["k4_shape"]),
        helper.make_node("Slice", ["k4_shape", "minus2", "minus1"], ["k4_t"]),
        helper.make_node("Slice", ["k4_shape", "zero", "minus2"], ["k4_bn"]),
        helper.make_node("Concat", ["minus_one", "k4_t", "size"], ["flat_target"], axis=0),
        helper.make_node("Reshape", ["kh4", "flat_target"], ["k3"]),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["k4_bn", "size", "k4_t"], ["back_target"], axis=0),
        helper.make_node("Reshape", ["k3t", "back_target"], ["k4"])]


def _mask(form: str) -> list:
    """The additive bias named "bias" from an int64 attention_mask [B, T], or a given one."""
    if form == "padding":  # older transformers: (1 - mask) * min, [B, 1, 1, T]
        return [helper.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Sub", ["one_f", "m"], ["inv"]), helper.make_node("Mul", ["inv", "min_f"], ["bias2"]),
                helper.make_node("Unsqueeze", ["bias2", "axes12"], ["bias"])]
    if form == "bool":  # Where(mask, 0, min) on a boolean mask, as SDPA exports build it
        return [helper.make_node("Cast", ["attention_mask"], ["mb"], to=onnx.TensorProto.BOOL),
                helper.make_node("Unsqueeze", ["mb", "axes12"], ["mb4"]),
                helper.make_node("Where", ["mb4", "zero_f", "min_f"], ["bias"])]
    if form == "inf":
        return [helper.make_node("Cast", ["attention_mask"], ["mb"], to=onnx.TensorProto.BOOL),
                helper.make_node("Unsqueeze", ["mb", "axes12"], ["mb4"]),
                helper.make_node("Where", ["mb4", "zero_f", "ninf_f"], ["bias"])]
    return []


def _block(mask="none", key="eager", scale="after", guard=False, cross=False, opset=18):
    """One attention block over projections of x (and of memory for cross-attention)."""
    kv_source, tdim = ("memory", "mem_seq") if cross else ("x", "seq")
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", [kv_source, "wk"], ["k"]),
             helper.make_node("MatMul", [kv_source, "wv"], ["v"])]
    nodes += _split("q", "q", [0, 2, 1, 3]) + _key(key) + _split("v", "v", [0, 2, 1, 3]) + _mask(mask)
    if scale == "split":  # SDPA: sqrt(scale) on both sides
        nodes += [
            helper.make_node("Mul", ["q4", "sqrt_scale"], ["qs"]),
            helper.make_node("Mul", ["k4", "sqrt_scale"], ["ks"]),
            helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        ]
    else:
        nodes += [
            helper.make_node("MatMul", ["q4", "k4"], ["qk"]),
            helper.make_node("Div", ["qk", "sqrt_h"], ["scores"]),
        ]
    biased = "scores"
    if mask == "causal":
        nodes.append(helper.make_node("Add", ["scores", "causal"], ["biased"]))
        biased = "biased"
    elif mask == "full":
        nodes.append(helper.make_node("Add", ["full_bias", "scores"], ["biased"]))
        biased = "biased"
    elif mask != "none":
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["biased"]))
        biased = "biased"
    nodes.append(helper.make_node("Softmax", [biased], ["p"], axis=-1))
    probs = "p"
    if guard:
        nodes += [helper.make_node("IsNaN", ["p"], ["nan"]), helper.make_node("Where", ["nan", "zero_f", "p"], ["pg"])]
        probs = "pg"
    nodes += [helper.make_node("MatMul", [probs, "v4"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Concat", ["q_bl", "width"], ["merge_target"], axis=0),
              helper.make_node("Reshape", ["ctx_t", "merge_target"], ["y"])]
    inputs = [("x", F32, ["batch", "seq", D])]
    if cross:
        inputs.append(("memory", F32, ["batch", "mem_seq", D]))
    if mask in ("padding", "bool", "inf"):
        inputs.append(("attention_mask", np.int64, ["batch", tdim]))
    if mask == "full":
        inputs.append(("full_bias", F32, ["batch", N, "seq", tdim]))
    inits = {"wq": seeded((D, D), 1) / 3, "wk": seeded((D, D), 2) / 3, "wv": seeded((D, D), 3) / 3,
             "zero": np.array([0], np.int64), "two": np.array([2], np.int64), "minus1": np.array([-1], np.int64),
             "minus2": np.array([-2], np.int64), "minus_one": np.array([-1], np.int64), "size": np.array([H], np.int64),
             "heads_size": np.array([N, H], np.int64), "width": np.array([D], np.int64),
             "sqrt_h": np.array(np.sqrt(H), F32), "sqrt_scale": np.array(H ** -0.25, F32),
             "one_f": np.array(1.0, F32), "zero_f": np.array(0.0, F32), "min_f": np.array(MIN, F32),
             "ninf_f": np.array(-np.inf, F32), "axes12": np.array([1, 2], np.int64),
             "causal": np.triu(np.full((S, S), MIN, F32), 1)[None, None]}
    used = {i for n in nodes for i in n.input}
    model = make_model(nodes, inputs, [("y", F32, ["batch", "seq", D])], {k: v for k, v in inits.items() if k in used},
                       opset=opset)
    return run_pass(InferShapes(), model)[1]


def _feeds(model, seq=S, mem_seq=T):
    feeds = {"x": seeded((B, seq, D), 4)}
    names = {i.name for i in model.graph.input}
    if "memory" in names:
        feeds["memory"] = seeded((B, mem_seq, D), 5)
    tdim = mem_seq if "memory" in names else seq
    if "attention_mask" in names:  # the second sequence is padded at its end
        mask = np.ones((B, tdim), np.int64)
        mask[1, -2:] = 0
        feeds["attention_mask"] = mask
    if "full_bias" in names:
        feeds["full_bias"] = seeded((B, N, seq, tdim), 6) * 3
    return feeds


CASES = {  # name: (block options, the seq used for the feeds)
    "no mask": dict(),
    "padding [B,1,1,T]": dict(mask="padding"),
    "boolean padding": dict(mask="bool", key="transpose"),
    "full bias [B,N,S,T]": dict(mask="full"),
    "causal": dict(mask="causal"),
    "dynamo SDPA": dict(mask="bool", key="dynamo", scale="split", guard=True),
    "cross-attention": dict(mask="padding", cross=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_becomes_standard_attention_for_ort_with_the_same_outputs(case):
    model = _block(**CASES[case])
    result, out = run_pass(FuseAttention(target="ort"), model)
    assert result.changed and result.stats == {"fused": 1, "op": "Attention"}
    fused = [n for n in out.graph.node if n.op_type == "Attention"]
    assert len(fused) == 1 and "Softmax" not in ops(out) and "MatMul" in ops(out)  # the projections stay
    attrs = {a.name: helper.get_attribute_value(a) for a in fused[0].attribute}
    assert attrs["q_num_heads"] == attrs["kv_num_heads"] == N and attrs["scale"] == pytest.approx(H ** -0.5)
    assert [o.version for o in out.opset_import if o.domain == ""] == [23]
    for seq in (S, 3) if case != "causal" else (S,):
        assert_same_outputs(model, out, _feeds(model, seq=seq, mem_seq=seq + 1), atol=1e-5)
    again, _ = run_pass(InferShapes(), out)
    assert not run_pass(FuseAttention(target="ort"), run_pass(InferShapes(), out)[1])[0].changed


@pytest.mark.parametrize("case", ["padding [B,1,1,T]", "dynamo SDPA", "causal", "cross-attention"])
def test_attention_becomes_4d_standard_attention_for_trt_with_the_same_outputs(case):
    model = _block(**CASES[case])
    result, out = run_pass(FuseStandardAttention(target="trt"), model)
    assert result.changed and result.stats == {"fused": 1}
    node = next(n for n in out.graph.node if n.op_type == "Attention")
    assert {a.name for a in node.attribute} == {"scale"} and len(node.input) == (3 if case == "no mask" else 4)
    inferred = run_pass(InferShapes(), out)[1].graph
    shapes = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.value_info}
    shapes.update({t.name: len(t.dims) for t in inferred.initializer})
    assert all(shapes.get(name) == 4 for name in node.input)  # TensorRT's parser: Q, K, V and mask 4-D
    assert_same_outputs(model, out, _feeds(model), atol=1e-5)
    assert not run_pass(FuseStandardAttention(target="trt"), run_pass(InferShapes(), out)[1])[0].changed


def test_below_opset_18_ort_gets_multi_head_attention_and_trt_nothing():
    model = _block(mask="padding", opset=17)
    result, out = run_pass(FuseAttention(target="ort"), model)
    assert result.stats == {"fused": 1, "op": "MultiHeadAttention"} and "MultiHeadAttention" in ops(out)
    assert [o.version for o in out.opset_import if o.domain == ""] == [17]
    assert_same_outputs(model, out, _feeds(model))
    result, out = run_pass(FuseStandardAttention(target="trt"), model)
    assert not result.changed and result.stats == {"unfused": 1} and ops(out) == ops(model)


def test_legacy_shape_reads_of_the_context_are_kept_working():
    """The TorchScript exporter computes the merge target from Shape(context): it must still run."""
    model = _block(mask="padding")
    graph_nodes = list(model.graph.node)
    for node in graph_nodes:
        if node.op_type == "Concat" and node.output[0] == "merge_target":
            node.input[0] = "ctx_bl"
    extra = [helper.make_node("Shape", ["ctx_t"], ["ctx_shape"]),
             helper.make_node("Slice", ["ctx_shape", "zero", "two"], ["ctx_bl"])]
    model.graph.node.insert(len(graph_nodes) - 2, extra[1])
    model.graph.node.insert(len(graph_nodes) - 2, extra[0])
    model = run_pass(InferShapes(), model)[1]
    for fusion in (FuseAttention(target="ort"), FuseStandardAttention(target="trt")):
        result, out = run_pass(fusion, model)
        assert result.changed and "Softmax" not in ops(out)
        assert_same_outputs(model, out, _feeds(model))


def test_a_minus_inf_mask_behind_the_nan_guard_becomes_a_boolean_mask_with_zeros_for_masked_rows():
    """The legacy exporter's SDPA: Where(keep, 0, -inf) and Where(IsNaN(p), 0, p). A fully masked row
    (the second sequence all padding here) is zeros in the original; the fused op must agree."""
    model = _block(mask="inf", guard=True, key="transpose")
    feeds = _feeds(model)
    feeds["attention_mask"][1] = 0
    for fusion, op in ((FuseAttention(target="ort"), "Attention"), (FuseStandardAttention(target="trt"), "Attention")):
        result, out = run_pass(fusion, model)
        assert result.changed and op in ops(out) and "IsNaN" not in ops(out)
        node = next(n for n in out.graph.node if n.op_type == op)
        mask = run_pass(InferShapes(), out)[1]
        types = {v.name: v.type.tensor_type.elem_type for v in mask.graph.value_info}
        assert types[node.input[3]] == onnx.TensorProto.BOOL
        assert_same_outputs(model, out, feeds)
        assert not np.any(run_graph(out, feeds)["y"][1])
    below_18 = _block(mask="inf", guard=True, opset=17)  # no boolean mask in MultiHeadAttention: left alone
    assert not run_pass(FuseAttention(target="ort"), below_18)[0].changed


@pytest.mark.parametrize("mask", ["padding", "bool"])
def test_a_fully_masked_row_keeps_the_unfused_result_with_the_lowest_float_mask(mask):
    """Exporters mask with float32's lowest value; a row with every key masked is then the mean of V in
    the original graph, which ONNX Runtime's Attention answers with zeros unless the mask is clamped."""
    model = _block(mask=mask, guard=mask == "bool")
    feeds = _feeds(model)
    feeds["attention_mask"][1] = 0
    for fusion in (FuseAttention(target="ort"), FuseStandardAttention(target="trt")):
        result, out = run_pass(fusion, model)
        assert result.changed and "Max" in ops(out)
        assert_same_outputs(model, out, feeds)
        assert np.any(run_graph(out, feeds)["y"][1])


def test_a_fully_masked_row_survives_fp16_conversion_of_the_fused_graph():
    """ConvertToFp16 moves the mask into FP16's range; it must not land on FP16's lowest, which ONNX
    Runtime's Attention also reads as "fully masked" (zeros instead of the mean of V)."""
    from passes import PassManager, pipeline

    model = _block(mask="padding")
    feeds = _feeds(model)
    feeds["attention_mask"][1] = 0
    half, _ = PassManager(pipeline("trt", "fp16")).run(model)
    assert "Attention" in ops(half) and "Softmax" not in ops(half)
    expected, actual = run_graph(model, feeds)["y"], run_graph(half, feeds)["y"]
    np.testing.assert_allclose(actual, expected, atol=2e-2 * np.abs(expected).max() + 1e-3)
    assert np.abs(actual[1]).max() > 0.1 * np.abs(expected[1]).max()


def test_attention_is_left_alone_where_it_almost_matches():
    other_reader = _block()
    other_reader.graph.output.append(
        helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, ["batch", N, "seq", "seq"])
    )
    wrong_axis = _block()
    next(n for n in wrong_axis.graph.node if n.op_type == "Softmax").attribute[0].i = 2
    default_axis = _block(opset=12)  # before opset 13 a Softmax without axis normalises from axis 1 on
    softmax = next(n for n in default_axis.graph.node if n.op_type == "Softmax")
    del softmax.attribute[:]
    per_query = _block(mask="full")  # a bias [B, N, S, 1] adds one value per query row: not a mask of the keys
    per_query.graph.input[-1].type.tensor_type.shape.dim[-1].Clear()
    per_query.graph.input[-1].type.tensor_type.shape.dim[-1].dim_value = 1
    per_query = run_pass(InferShapes(), per_query)[1]
    for model in (other_reader, wrong_axis, default_axis, per_query):
        for fusion in (FuseAttention(target="ort"), FuseStandardAttention(target="trt")):
            result, out = run_pass(fusion, model)
            assert not result.changed and ops(out) == ops(model)
            feeds = _feeds(model)
            if "full_bias" in feeds:
                feeds["full_bias"] = feeds["full_bias"][..., :1]
            assert_same_outputs(model, out, feeds)


def test_each_target_runs_only_its_own_fusion():
    model = _block(mask="padding")
    assert not run_pass(FuseAttention(target="trt"), model)[0].changed
    assert not run_pass(FuseStandardAttention(target="ort"), model)[0].changed


def test_fold_shapes_keeps_a_gather_of_a_shape_scalar_when_the_index_is_a_constant_node():
    """A scalar index from a Constant node (the legacy exporter's form) folds to a scalar, not [1]."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), _const("idx", 2),
             helper.make_node("Gather", ["shape", "idx"], ["dim"], axis=0),
             helper.make_node("Unsqueeze", ["dim", "axis0"], ["dim1"]),
             helper.make_node("Concat", ["minus_one", "dim1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, [("x", F32, ["batch", 3, D])], [("y", F32, ["rows", D])],
                       {"axis0": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)})
    model = run_pass(InferShapes(), model)[1]
    result, out = run_pass(FoldShapes(), model)
    assert result.changed and "Shape" not in ops(out)
    assert_same_outputs(model, out, {"x": seeded((2, 3, D))})
