"""Atomic bundle writing and distrustful reading."""

import json

import pytest
from helpers import tiny_manifest

from engines.bundle import SCHEMA_VERSION, StagedBundle, read_manifest, verified_path
from foundation.errors import BundleError


def _stage(out, replace=False, content=b"weights"):
    with StagedBundle(out, replace=replace) as stage:
        (stage.path / "model.ort.onnx").write_bytes(content)
        return stage.commit(tiny_manifest(), {"model.ort.onnx": "ort-graph"})


def test_commit_hashes_artifacts_writes_the_manifest_and_renames_into_place(tmp_path):
    manifest = _stage(tmp_path / "b")
    art = manifest.artifacts["model.ort.onnx"]
    assert art.size == 7 and len(art.sha256) == 64 and art.role == "ort-graph"
    assert read_manifest(tmp_path / "b") == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging left behind


def test_an_error_inside_the_block_leaves_nothing_behind(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with StagedBundle(tmp_path / "b") as stage:
            (stage.path / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_replace_swaps_the_old_bundle_for_the_new(tmp_path):
    _stage(tmp_path / "b", content=b"old")
    _stage(tmp_path / "b", replace=True, content=b"new!")
    assert (tmp_path / "b" / "model.ort.onnx").read_bytes() == b"new!"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("manifest, message", [
    (None, "no manifest.json"),
    ("{not json", "not valid JSON"),
    (json.dumps({"artifacts": {}}), "no integer schema_version"),
    (json.dumps({"schema_version": SCHEMA_VERSION + 1, "artifacts": {}}), "upgrade planforge"),
    (json.dumps({"schema_version": 1, "artifacts": {"../etc/passwd": {}}}), "not a plain file name"),
])
def test_read_manifest_refuses_broken_bundles_with_advice(tmp_path, manifest, message):
    (tmp_path / "b").mkdir()
    if manifest is not None:
        (tmp_path / "b" / "manifest.json").write_text(manifest)
    with pytest.raises(BundleError, match=message):
        read_manifest(tmp_path / "b")


def test_verified_path_refuses_edited_truncated_and_missing_artifacts(tmp_path):
    manifest = _stage(tmp_path / "b", content=b"weights")
    assert verified_path(tmp_path / "b", manifest, "model.ort.onnx").read_bytes() == b"weights"
    (tmp_path / "b" / "model.ort.onnx").write_bytes(b"weightz")
    with pytest.raises(BundleError, match="does not match the sha256"):
        verified_path(tmp_path / "b", manifest, "model.ort.onnx")
    (tmp_path / "b" / "model.ort.onnx").unlink()
    with pytest.raises(BundleError, match="is missing"):
        verified_path(tmp_path / "b", manifest, "model.ort.onnx")
    with pytest.raises(BundleError, match="does not list"):
        verified_path(tmp_path / "b", manifest, "model.plan")


def test_the_typed_manifest_round_trips_and_a_newer_writers_extra_keys_are_ignored(tmp_path):
    manifest = _stage(tmp_path / "b")
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 2 and "unquantized_nodes" not in data
    assert type(manifest).from_json(data) == manifest and manifest.to_json() == data
    data["model"]["added_later"] = 1
    assert type(manifest).from_json(data).model == manifest.model


def test_a_schema_1_manifest_still_loads_with_its_fields_split(tmp_path):
    manifest = _stage(tmp_path / "b")
    data = manifest.to_json()
    kept = [{"name": "conv", "op": "Conv", "target": "trt", "reason": "sensitivity"}]
    old = dict(
        data,
        schema_version=1,
        precision="int8",
        unquantized_nodes=kept,
        calibration={
            "method": "max",
            "source": "zoo:m",
            "samples": 8,
            "evaluation_batches": 1,
            "data_sha256": "0" * 64,
            "file": "calibration.json",
            "reused": {},
            "budget": "top1 >= 0.99",
        },
    )
    for key in ("int8_float_layers", "fp16_fp32_nodes"):
        old.pop(key)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(old))
    loaded = read_manifest(tmp_path / "b")
    assert loaded.int8_float_layers == tuple(kept) and loaded.fp16_fp32_nodes == ()
    assert loaded.calibration.budget.metric == "top1" and loaded.calibration.budget.threshold == 0.99
    assert loaded.schema_version == SCHEMA_VERSION


def test_a_malformed_manifest_names_what_is_wrong(tmp_path):
    manifest = _stage(tmp_path / "b")
    data = manifest.to_json()
    del data["backends"]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed 'backends'; rebuild the bundle"):
        read_manifest(tmp_path / "b")
