import numpy as np
from helpers import assert_same_outputs, helper, make_model, ops, run_pass, seeded

from passes.fuse_conv_bn import FuseConvBatchNorm

F32 = np.float32


def _conv_bn(bias: bool = True, groups: int = 1, extra_consumer: bool = False):
    rng = np.random.default_rng(0)
    c_in, c_out = 4, 6
    inits = {"W": seeded((c_out, c_in // groups, 3, 3), 1), "gamma": rng.uniform(0.5, 1.5, c_out).astype(F32),
             "beta": seeded((c_out,), 2), "mean": seeded((c_out,), 3), "var": rng.uniform(0.5, 2.0, c_out).astype(F32)}
    conv_inputs = ["x", "W"]
    if bias:
        inits["B"] = seeded((c_out,), 4)
        conv_inputs.append("B")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3)]
    outputs = [("y", F32, ["n", c_out, 8, 8])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["c"], ["z"]))
        outputs.append(("z", F32, ["n", c_out, 8, 8]))
    return make_model(nodes, [("x", F32, ["n", c_in, 8, 8])], outputs, inits)


FEEDS = {"x": seeded((2, 4, 8, 8), 9)}


def test_conv_bn_becomes_one_conv_with_the_same_outputs():
    for bias in (True, False):
        for groups in (1, 2):
            model = _conv_bn(bias=bias, groups=groups)
            result, out = run_pass(FuseConvBatchNorm(), model)
            assert result.changed and result.stats == {"fused": 1}
            assert ops(out) == ["Conv"] and len(out.graph.node[0].input) == 3
            assert [o.name for o in out.graph.output] == ["y"]
            assert_same_outputs(model, out, FEEDS)


def test_does_not_fire_when_the_conv_output_has_another_consumer():
    model = _conv_bn(extra_consumer=True)
    result, out = run_pass(FuseConvBatchNorm(), model)
    assert not result.changed and sorted(ops(out)) == ["BatchNormalization", "Conv", "Relu"]
    assert_same_outputs(model, out, FEEDS)


def test_does_not_fire_when_the_weight_is_not_constant():
    nodes = [helper.make_node("Conv", ["x", "w_in"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    one = np.ones(2, F32)
    model = make_model(nodes, [("x", F32, [1, 1, 4, 4]), ("w_in", F32, [2, 1, 1, 1])], [("y", F32, [1, 2, 4, 4])],
                       {"g": one, "b": one, "m": one, "v": one})
    result, out = run_pass(FuseConvBatchNorm(), model)
    assert not result.changed and ops(out) == ["Conv", "BatchNormalization"]
    assert_same_outputs(model, out, {"x": seeded((1, 1, 4, 4)), "w_in": seeded((2, 1, 1, 1), 1)})


def test_is_idempotent():
    _, once = run_pass(FuseConvBatchNorm(), _conv_bn())
    again, twice = run_pass(FuseConvBatchNorm(), once)
    assert not again.changed and ops(twice) == ["Conv"]
    assert_same_outputs(once, twice, FEEDS)
