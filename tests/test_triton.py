"""Triton model repositories, checked with Triton's own ModelConfig protobuf (from tritonclient)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from helpers import add_plan_artifact

from engines.build import BuildRequest, ProfileOptions, build
from engines.deploy.triton import write_repository


def _model_config():
    tritonclient = pytest.importorskip("tritonclient")
    # Loaded by path: tritonclient.grpc's __init__ needs grpcio, the protobuf module does not.
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


def test_bert_bundle_becomes_a_batched_onnxruntime_model(build_root, tmp_path):
    ModelConfig = _model_config()
    bundle = build(
        BuildRequest(
            "bert_tiny",
            out=build_root / "bert-triton",
            build_root=build_root,
            inputs=("input_ids:int64:[batch=1..8@2,seq=1..32@16]:0..30522",),
            shapes=ProfileOptions(profiles=("batch=1..4@2", "batch=5..8@8")),
        )
    ).out
    names = write_repository(bundle, tmp_path / "repo")
    assert names == ["bert_tiny_fp32_ort"]  # no plan on this machine: no tensorrt_plan model
    config = text_format.Parse((tmp_path / "repo/bert_tiny_fp32_ort/config.pbtxt").read_text(), ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in config.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("last_hidden_state", [-1, 128]),
        ("pooler_output", [128]),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 8]
    assert (tmp_path / "repo/bert_tiny_fp32_ort/1/model.onnx").read_bytes() == (bundle / "model.ort.onnx").read_bytes()
    assert config.instance_group[0].kind == ModelConfig().instance_group.add().KIND_CPU


def test_a_plan_becomes_a_tensorrt_model_whose_instances_may_use_every_profile(build_root, tmp_path):
    ModelConfig = _model_config()
    bundle = build(
        BuildRequest(
            "mlp",
            out=build_root / "mlp-triton",
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..8@4", "batch=9..64@32")),
        )
    ).out
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    add_plan_artifact(copy, manifest)  # copied into the repository, never deserialized
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert write_repository(copy, tmp_path / "repo") == ["mlp_fp32_trt", "mlp_fp32_ort"]
    config = text_format.Parse((tmp_path / "repo/mlp_fp32_trt/config.pbtxt").read_text(), ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 64
    # model_config.proto: ``profile`` is the set available to the group; the server picks by shape, so one
    # group lists both (a group pinned to profile 0 would get batches of 40 it cannot take)
    assert [list(g.profile) for g in config.instance_group] == [["0", "1"]]
    assert config.instance_group[0].kind == ModelConfig().instance_group.add().KIND_GPU
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 32]


def test_a_static_bundle_is_not_batched(build_root, tmp_path):
    ModelConfig = _model_config()
    bundle = build(
        BuildRequest(
            "mlp", out=build_root / "mlp-static-triton", build_root=build_root, shapes=ProfileOptions(static=True)
        )
    ).out
    write_repository(bundle, tmp_path / "repo")
    config = text_format.Parse((tmp_path / "repo/mlp_fp32_ort/config.pbtxt").read_text(), ModelConfig())
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [8, 64]
    assert not config.HasField("dynamic_batching")


def test_names_carry_the_precision_and_versions_are_not_overwritten_without_force(build_root, tmp_path, run_cli):
    ModelConfig = _model_config()
    bundle = build(BuildRequest("mlp", out=build_root / "mlp-opt1", build_root=build_root,
                                inputs=("x:float32:[batch=1..8@1,64]",))).out
    repo = tmp_path / "repo"
    code, out, _ = run_cli("triton-repo", bundle, "-o", repo)
    assert code == 0 and (repo / "mlp_fp32_ort" / "1" / "model.onnx").is_file()
    config = text_format.Parse((repo / "mlp_fp32_ort/config.pbtxt").read_text(), ModelConfig())
    assert config.HasField("dynamic_batching") and list(config.dynamic_batching.preferred_batch_size) == []  # opt 1
    code, _, err = run_cli("triton-repo", bundle, "-o", repo)
    assert code == 2 and "mlp_fp32_ort already have version 1; pass --force" in err
    code, _, _ = run_cli("triton-repo", bundle, "-o", repo, "--version", "2", "--name", "digits")
    assert code == 0 and (repo / "digits_ort" / "2" / "model.onnx").is_file()
    code, _, _ = run_cli("triton-repo", bundle, "-o", repo, "--force")
    assert code == 0 and sorted(p.name for p in repo.iterdir()) == ["digits_ort", "mlp_fp32_ort"]


def test_the_dynamic_batcher_and_cache_match_the_in_process_serving_options(build_root, tmp_path):
    """Moving from the runtime's Server to Triton keeps the delay, the preferred sizes and the queue policy."""
    from engines.runtime.batching import Batching

    ModelConfig = _model_config()
    bundle = build(
        BuildRequest(
            "mlp",
            out=build_root / "mlp-serve-triton",
            build_root=build_root,
            shapes=ProfileOptions(profiles=("batch=1..4@2", "batch=5..16@8")),
        )
    ).out
    write_repository(bundle, tmp_path / "repo", batching=Batching(max_delay_ms=3, max_queue=64, timeout_ms=50),
                     cache=True)
    config = text_format.Parse((tmp_path / "repo/mlp_fp32_ort/config.pbtxt").read_text(), ModelConfig())
    batcher = config.dynamic_batching
    assert batcher.max_queue_delay_microseconds == 3000 and list(batcher.preferred_batch_size) == [2, 8]
    policy = batcher.default_queue_policy
    assert policy.max_queue_size == 64 and policy.default_timeout_microseconds == 50000
    assert policy.timeout_action == type(policy).REJECT
    assert config.response_cache.enable
    write_repository(bundle, tmp_path / "plain", batching=Batching())
    plain = text_format.Parse((tmp_path / "plain/mlp_fp32_ort/config.pbtxt").read_text(), ModelConfig())
    assert plain.dynamic_batching.max_queue_delay_microseconds == 2000 and not plain.response_cache.enable
    assert plain.dynamic_batching.default_queue_policy.max_queue_size == 1024
