"""Build two zoo models (a CNN and a transformer with dynamic batch and sequence) into bundles and
run them through the runtime at two shapes, against PyTorch."""

import numpy as np
import pytest

from engines import runtime
from engines.build import BuildRequest, Int8Options, build
from exporter.parity import torch_outputs
from exporter.zoo import BY_NAME
from foundation.spec import InputSpec

CASES = {
    "mobilenet_v2": ("x:float32:[batch=1..4@2,3,96,96]",),
    "bert_tiny": ("input_ids:int64:[batch=1..4@2,seq=2..48@16]:0..30522",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_zoo_model_bundle_matches_pytorch_at_two_shapes(name, build_root):
    result = build(BuildRequest(name, inputs=CASES[name], build_root=build_root))
    manifest = result.manifest.to_json()
    assert result.out == build_root / name and not result.reused
    assert manifest["accuracy"]["parity_ok"] and manifest["export"]["exporter"] == "dynamo"
    ort_graph = manifest["backends"]["ort"]["graph"]
    assert set(manifest["artifacts"]) >= {"model.onnx", ort_graph, "model.trt.onnx", "golden.npz", "report.json"}
    if ort_graph == "model.trt.onnx":  # both targets wrote the same bytes: stored once
        assert not (result.out / "model.ort.onnx").exists()
    assert manifest["backends"]["trt"]["skipped"] and manifest["backends"]["trt"]["plan"] is None
    assert manifest["trt_check"]["findings"] == [] and manifest["trt_check"]["nodes"] > 0  # clean for TensorRT 11.1
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


def _bert_dir(root):
    """A seeded two-layer BERT saved as a Hugging Face directory (config.json and safetensors weights), as
    ``save_pretrained`` writes it; None without transformers."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    path = root / "model"
    tf.BertModel(config, add_pooling_layer=False).eval().save_pretrained(path)
    return path


def test_a_local_hugging_face_directory_builds_offline_and_matches_pytorch(build_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = _bert_dir(tmp_path)
    if directory is None:
        pytest.skip("needs transformers (the dev extra)")
    spec = "input_ids:int64:[batch=1..2@2,seq=2..32@8]:0..1000"
    result = build(BuildRequest(str(directory), inputs=(spec,), build_root=build_root))
    manifest = result.manifest.to_json()
    assert manifest["model"]["kind"] == "hf" and manifest["model"]["name"] == "model"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["accuracy"]["parity_worst"]["last_hidden_state"]["max_abs"] < 1e-4
    golden = np.load(result.out / "golden.npz")
    with runtime.load(result.out) as engine:
        feeds = {"input_ids": golden["max/in/input_ids"], "attention_mask": golden["max/in/attention_mask"]}
        np.testing.assert_allclose(engine.infer(feeds)["last_hidden_state"], golden["max/out/last_hidden_state"],
                                   atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_a_graph_with_batchnorm_is_folded_and_still_matches_pytorch(build_root, tmp_path):
    """A TorchScript export without constant folding keeps every BatchNormalization (as graphs
    from older exporters do); the passes must fold them and keep PyTorch's numbers."""
    import contextlib
    import io
    import warnings

    import onnx
    import torch

    module = BY_NAME["resnet18"].build(build_root / ".cache")
    path = tmp_path / "resnet18_bn.onnx"
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, do_constant_folding=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("BatchNormalization") == 20
    out = build_root / "resnet18_bn"
    result = build(BuildRequest(str(path), out=out, inputs=("x:float32:[batch=1..4@2,3,64,64]",),
                                build_root=build_root))
    for target in ("trt", "ort"):
        graph = result.manifest.backends.for_target(target).graph
        graph_ops = [n.op_type for n in onnx.load(str(out / graph)).graph.node]
        assert "BatchNormalization" not in graph_ops and graph_ops.count("Conv") == 20
        fused = [r for r in result.manifest.passes[target] if r["name"] == "FuseConvBatchNorm" and r["changed"]]
        assert fused[0]["stats"] == {"fused": 20}
    with runtime.load(out) as engine, torch.no_grad():
        for batch in (1, 3):
            xb = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32))
            np.testing.assert_allclose(engine.infer({"x": xb.numpy()})["logits"], module(xb).numpy(),
                                       atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_digits_int8_keeps_its_real_accuracy_and_reuses_calibration(build_root, caplog):
    import json
    import logging

    import onnx

    from exporter.zoo import digits
    from passes.verify import session

    out = build_root / "digits-int8"
    result = build(BuildRequest("digits_cnn", out=out, precision="int8", build_root=build_root))
    manifest = result.manifest.to_json()
    assert manifest["precision"] == "int8" and manifest["calibration"]["source"].startswith("zoo:digits_cnn")
    assert manifest["calibration"]["reused"] == {"trt": False, "ort": False}
    assert all(r["met"] for r in manifest["accuracy"]["int8"].values())
    images, labels = digits.digits_split("test")
    fp32 = digits.accuracy(BY_NAME["digits_cnn"].build(build_root / ".cache"), "test")
    for target in ("trt", "ort"):
        graph = onnx.load(str(out / f"model.{target}.onnx"))
        assert sum(n.op_type == "DequantizeLinear" for n in graph.graph.node) >= 4
        # trt: float emulation, the same on every CPU; ort: this CPU's kernels, in the form chosen for its class
        logits = session(graph, optimize=target == "ort").run(None, {"x": images})[0]
        assert (logits.argmax(1) == labels).mean() >= fp32 - 0.01, target
    with runtime.load(out) as engine:
        assert (engine.infer({"x": images[:64]})["logits"].argmax(1) == labels[:64]).mean() >= 0.95
    ranges = json.loads((out / "calibration.json").read_text())["targets"]["trt"]["ranges"]
    assert ranges["x"][0] >= 0.0 and ranges["x"][1] <= 1.0  # pixel range of the real images
    with caplog.at_level(logging.INFO):
        again = build(BuildRequest("digits_cnn", out=out, precision="int8", force=True, build_root=build_root))
    assert again.manifest.calibration.reused == {"trt": True, "ort": True}
    assert "reusing calibration ranges" in caplog.text
    other = build(
        BuildRequest(
            "digits_cnn",
            out=out,
            precision="int8",
            force=True,
            build_root=build_root,
            int8=Int8Options(calib_method="entropy"),
        )
    )
    assert other.manifest.calibration.reused == {"trt": False, "ort": False}
