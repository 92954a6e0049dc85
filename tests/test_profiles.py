"""Optimization profiles, the engine cache key, --static, and the paths without TensorRT."""

import json

import numpy as np
import onnx
import pytest

from engines.build import BuildRequest, ProfileOptions, build
from engines.profiles import Profile, auto_profiles, envelope, parse_profile, profiles_for, select
from engines.trt_build.builder import TrtOptions
from engines.trt_build.cache import engine_key, timing_cache_path
from foundation.errors import BuildError, TensorRTUnavailable, UsageError
from foundation.spec import InputSpec

SPEC = InputSpec.parse(["ids:int64:[batch=1..64@8,seq=1..128@32]", "mask:int64:[batch,seq]"])


def test_explicit_profiles_keep_unnamed_dims_and_validate_ranges():
    small, large = profiles_for(SPEC, ("batch=1..8@4", "batch=9..64@32,seq=16..128@64"))
    assert small.min["ids"] == (1, 1) and small.opt["mask"] == (4, 32) and small.max["ids"] == (8, 128)
    assert large.min["mask"] == (9, 16) and large.opt["ids"] == (32, 64)
    with pytest.raises(UsageError, match="min <= opt <= max"):
        parse_profile("batch=8..4", SPEC, "bad")
    with pytest.raises(UsageError, match="'width' is not a symbolic dim"):
        parse_profile("width=1..4", SPEC, "bad")
    with pytest.raises(UsageError, match="equal rank"):
        Profile("p", {"x": (1, 2)}, {"x": (1, 2, 3)}, {"x": (1, 2)})
    with pytest.raises(UsageError, match="not both"):
        profiles_for(SPEC, ("batch=1..8",), "auto:2")


def test_auto_profiles_tile_the_spec_without_holes():
    profiles = auto_profiles(SPEC, 3)
    assert [p.min["ids"][0] for p in profiles] == [1, 5, 17] and [p.max["ids"][0] for p in profiles] == [4, 16, 64]
    assert all(p.min["ids"][1] == 1 and p.max["ids"][1] == 128 for p in profiles)  # seq keeps its full range
    for batch in range(1, 65):
        for seq in (1, 77, 128):
            assert select(profiles, {"ids": (batch, seq), "mask": (batch, seq)}) is not None
    by_seq = profiles_for(SPEC, auto="auto:2:seq")
    assert [p.max["ids"][1] for p in by_seq] == [12, 128] and envelope(SPEC, by_seq) == SPEC


def test_envelope_and_selection():
    profiles = profiles_for(SPEC, ("batch=1..8@4", "batch=9..32@16"))
    assert (
        str(envelope(SPEC, profiles))
        == "ids:int64:[batch=1..32@8,seq=1..128@32] mask:int64:[batch=1..32@8,seq=1..128@32]"
    )
    assert select(profiles, {"ids": (12, 5), "mask": (12, 5)}) == 1
    assert select(profiles, {"ids": (40, 5), "mask": (40, 5)}) is None
    assert Profile.from_json(profiles[0].to_json()) == profiles[0]


def test_engine_cache_key_changes_with_every_input():
    base = ("g" * 64, profiles_for(SPEC), TrtOptions().to_json(), "11.4.0", "9.0")
    key = engine_key(*base)
    assert key == engine_key(*base) and len(key) == 64
    variants = [("h" * 64, *base[1:]), (base[0], profiles_for(SPEC, auto="auto:2"), *base[2:]),
                (*base[:2], TrtOptions(strict_fp32=True).to_json(), *base[3:]), (*base[:3], "11.4.1", "9.0"),
                (*base[:4], "8.9")]
    assert len({engine_key(*v) for v in variants} | {key}) == len(variants) + 1
    assert timing_cache_path("c", "11.4.0", "9.0").name == "trt-11.4.0-sm90.cache"
    with pytest.raises(BuildError, match="outside 0..5"):
        TrtOptions(optimization_level=7)


def test_bundle_records_profiles_and_why_tensorrt_was_skipped(build_root):
    result = build(
        BuildRequest(
            "mlp",
            out=build_root / "mlp-prof",
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..4@2", "batch=5..16@8")),
        )
    )
    manifest = result.manifest.to_json()
    assert [p["max"]["x"] for p in manifest["profiles"]] == [[4, 64], [16, 64]]
    assert manifest["inputs"][0]["text"] == "x:float32:[batch=1..16@8,64]"  # the bundle accepts the union
    trt = manifest["backends"]["trt"]
    assert trt["plan"] is None and "native libraries" in trt["skipped"] or "not installed" in trt["skipped"]
    assert manifest["environment"]["tensorrt"] is None and manifest["environment"]["tensorrt_status"] == trt["skipped"]
    with pytest.raises(TensorRTUnavailable, match="--require-trt: TensorRT cannot build here") as info:
        build(BuildRequest("mlp", out=build_root / "mlp-req", require_trt=True, build_root=build_root))
    assert info.value.exit_code == 8 and not (build_root / "mlp-req").exists()


def test_profiles_outside_what_the_graph_accepts_are_refused(build_root, tmp_path):
    from helpers import helper, make_model

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]  # only batches that split into pairs
    model = make_model(nodes, [("x", np.float32, ["n", 4])], [("y", np.float32, [-1, 2, 4])],
                       {"shape": np.array([-1, 2, 4], np.int64)})
    onnx.save(model, str(tmp_path / "pairs.onnx"))
    # the union 2..8 runs at its ends (even), the second profile starts at an odd size
    with pytest.raises(UsageError, match="profile profile1: the exported graph does not run at its min shapes"):
        build(
            BuildRequest(
                str(tmp_path / "pairs.onnx"),
                out=tmp_path / "b",
                inputs=("x:float32:[n=2..8@4,4]",),
                build_root=build_root,
                shapes=ProfileOptions(profiles=("n=2..4@2", "n=5..8@6")),
            )
        )
    assert not (tmp_path / "b").exists()


def test_static_freezes_both_graphs_to_the_opt_shapes(build_root):
    result = build(
        BuildRequest(
            "mlp",
            out=build_root / "mlp-static",
            inputs=("x:float32:[batch=1..16@4,64]",),
            build_root=build_root,
            shapes=ProfileOptions(static=True),
        )
    )
    assert (
        result.manifest.to_json()["profiles"] == []
        and result.manifest.to_json()["inputs"][0]["text"] == "x:float32:[4,64]"
    )
    for target in ("trt", "ort"):
        graph = onnx.load(str(result.out / f"model.{target}.onnx"))
        assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [4, 64]
        assert [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim] == [4, 10]
    golden = np.load(result.out / "golden.npz")
    assert set(golden.files) == {"opt/in/x", "opt/out/logits"}
    assert json.loads((result.out / "report.json").read_text())["graphs"]["model.trt.onnx"]["ok"]


def test_runtime_refuses_shapes_between_disjoint_profiles(build_root):
    from engines import runtime
    from foundation.errors import RuntimeInputError

    result = build(
        BuildRequest(
            "mlp",
            out=build_root / "mlp-gap",
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..4@2", "batch=9..16@12")),
        )
    )
    with runtime.load(result.out) as engine:
        assert engine.infer({"x": np.zeros((3, 64), np.float32)})["logits"].shape == (3, 10)
        assert engine.infer({"x": np.zeros((12, 64), np.float32)})["logits"].shape == (12, 10)
        with pytest.raises(RuntimeInputError, match=r"no optimization profile accepts shapes \{'x': \[6, 64\]\}"):
            engine.infer({"x": np.zeros((6, 64), np.float32)})


def test_shape_tensor_inputs_get_profile_values_from_their_value_range(build_root, tmp_path):
    from helpers import helper, make_model

    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"])]
    model = make_model(nodes, [("x", np.float32, ["n", 1]), ("shape", np.int64, [2])], [("y", np.float32, ["a", "b"])])
    onnx.save(model, str(tmp_path / "expand.onnx"))
    with pytest.raises(UsageError, match="'shape' is a shape tensor"):
        build(BuildRequest(str(tmp_path / "expand.onnx"), out=tmp_path / "b1", inputs=("x:float32:[n=1..4@2,1]",),
                           build_root=build_root))
    result = build(BuildRequest(str(tmp_path / "expand.onnx"), out=tmp_path / "b2",
                                inputs=("x:float32:[n=1..4@2,1]", "shape:int64:[2]:1..5"), build_root=build_root))
    assert result.manifest.to_json()["profiles"][0]["shape_values"] == {"shape": [[1, 1], [4, 4], [4, 4]]}
