"""``planforge build --prune``: the search keeps the budget and records what it removed; ``compare`` judges
the pruned graphs again by that budget on the stored held-out batches; pruning stacks with INT8; bad
options are refused in one line."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.bundle import read_manifest
from engines.evaluate.compare import CompareRequest, compare

pytestmark = pytest.mark.xdist_group("prune-build")  # one worker builds the module's bundle (--dist loadgroup)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from engines.build import BuildRequest, build

    root = tmp_path_factory.mktemp("prune")
    return build(BuildRequest("bert_tiny", out=root / "bert", build_root=root, prune="auto")).out


def test_prune_auto_keeps_the_budget_and_records_what_it_removed(pruned):
    manifest = read_manifest(pruned)
    report = manifest.accuracy.prune
    assert report.requested == "auto" and report.groups == 2 and sorted(report.units.values()) == [512, 512]
    assert report.passed and report.budget.met(report.metric) and str(report.budget).startswith("cosine")
    met = [t["ratio"] for t in report.tries if t["met"]]
    assert report.ratio == max(met, default=0.0)  # the largest ratio tried that kept the budget
    assert all(not t["met"] for t in report.tries if t["ratio"] > report.ratio)
    assert report.ratio > 0 and report.units_removed > 0 and report.params_after < report.params_before
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0
    kept = 512 - report.units_removed // 2
    for target in ("ort", "trt"):  # both graphs start from the same pruned graph: no 512-unit layer left
        graph = onnx.load(str(pruned / f"model.{target}.onnx"))
        shapes = [tuple(i.dims) for i in graph.graph.initializer if len(i.dims) == 2]
        assert sum(kept in s and 128 in s for s in shapes) == 4
        assert shapes.count((512, 128)) + shapes.count((128, 512)) == 1  # the position table alone
    assert "evaluation.npz" in manifest.artifacts


def test_compare_judges_the_pruned_graphs_by_the_build_budget_on_its_held_out_batches(pruned, tmp_path):
    result = compare(CompareRequest(pruned, report=tmp_path / "r.json", cache_dir=tmp_path / ".cache"))
    assert result.data.source == "eval"
    exported = [p for p in result.pairs if p.runner == "onnxruntime model.onnx"]
    judged = [p for p in result.pairs if p not in exported]  # both graphs and the runtime loading the bundle
    assert len(judged) == 3 and all(p.budget and p.budget["passed"] for p in judged), [p.budget for p in judged]
    assert result.ok
    assert len(exported) == 1 and exported[0].budget is None and exported[0].passed  # the unpruned export: exact
    assert json.loads((tmp_path / "r.json").read_text())


def test_prune_then_int8_judges_both_and_records_both(in_tmp, tmp_path, run_cli):
    code, _, err = run_cli("build", "bert_tiny", "--prune", "0.25", "--precision", "int8", "-o", tmp_path / "b", "-q")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "b")
    assert manifest.accuracy.prune.ratio == 0.25 and manifest.accuracy.prune.passed
    assert all(r.met for r in manifest.accuracy.int8.values())
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "b" / "model.ort.onnx")).graph.initializer]
    # the pruned hidden layer's weights, quantized: int8, or uint8 where the build measured u8u8 the faster form
    # (an AVX2 CPU's candidates: engines/build/int8/forms.py; which wins depends on the timings)
    assert any(w.dtype in (np.int8, np.uint8) and w.ndim == 2 and 384 in w.shape for w in weights)
    # INT8 of the pruned graph was judged against the unpruned export: compare's verdict on the final graphs agrees
    result = compare(CompareRequest(tmp_path / "b", report=tmp_path / "r.json", cache_dir=tmp_path / ".cache"))
    finals = {p.target: p.budget["value"] for p in result.pairs if p.graph}
    assert result.ok and all(abs(finals[t] - r.final) < 1e-3 for t, r in manifest.accuracy.int8.items()), finals


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "half"])
def test_a_bad_prune_option_is_refused_in_one_line(value, in_tmp, tmp_path, run_cli):
    code, _, err = run_cli("build", "mlp", "--prune", value, "-o", tmp_path / "x")
    assert code == 2 and "expected auto or a ratio" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bench_prune_measures_planforge_and_torch_pruning_alike_at_the_bundle_ratio(pruned, tmp_path):
    """bench-prune re-prunes the export at the bundle's ratio from the recorded calibration data (the same
    graph, so the same metric and parameters as the build's report), and Torch-Pruning, in its own process,
    removes as many units of the same groups: the same parameter count, scored by the same budget."""
    from engines.evaluate.bench.prune import PruneBenchRequest, bench_prune

    report = read_manifest(pruned).accuracy.prune
    doc = bench_prune(PruneBenchRequest((pruned,), methods=("planforge", "torch-pruning"), runs=2,
                                        cache_dir=tmp_path / ".cache"))
    rows = {(r["method"], r["ratio"]): r for r in doc["rows"]}
    dense, ours, peer = rows[("dense", 0.0)], rows[("planforge", report.ratio)], rows[("torch-pruning", report.ratio)]
    assert dense["metric"] == pytest.approx(1.0, abs=1e-5) and dense["passed"] and dense["speedup"] == 1.0
    assert ours["metric"] == pytest.approx(report.metric, abs=1e-4) and ours["passed"]
    assert ours["params"] == report.params_after < dense["params"] and ours["units_removed"] == report.units_removed
    assert "skipped" not in peer, peer
    assert peer["params"] == ours["params"] and 0 < peer["metric"] <= 1  # same units removed, its own choice
    assert all(r["latency_ms"] > 0 and r["budget"] == str(report.budget) for r in rows.values())


def test_bench_prune_refuses_a_bundle_built_without_prune(in_tmp, tmp_path, run_cli):
    assert run_cli("build", "mlp", "-o", tmp_path / "m", "-q")[0] == 0
    code, _, err = run_cli("bench-prune", tmp_path / "m", "-o", tmp_path / "out")
    assert code == 2 and "expected a bundle built with --prune" in err and "Traceback" not in err
    code, _, err = run_cli("bench-prune", tmp_path / "m", "--ratio", "1.5")
    assert code == 2 and "expected a ratio of units above 0 and below 1" in err


def test_inspect_shows_what_each_group_kept_and_the_summary_line(pruned, run_cli):
    report = read_manifest(pruned).accuracy.prune
    code, out, _ = run_cli("inspect", pruned)
    assert code == 0 and f"pruned groups ({report.allocation})" in out
    assert all(name in out for name in report.kept) and set(report.kinds.values()) == {"units"}
    assert f"{report.units_removed} units in 2 groups" in out and f"{report.params_before:,}" in out
