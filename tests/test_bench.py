"""``planforge bench BUNDLE...``: the schema of bench.json, the plot, the summary (no timing assertions)."""

import json
from pathlib import Path

import numpy as np
import pytest

from engines.build import BuildRequest, build
from engines.bundle import read_manifest, verified_path
from engines.evaluate.bench.bundles import Backend, BenchRequest, bench, time_backend
from engines.evaluate.bench.report import summary_markdown, write_results
from engines.runtime.cpu import detect

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mlp_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    fp32 = build(BuildRequest("mlp", out=root / "mlp", build_root=root)).out
    int8 = build(BuildRequest("mlp", out=root / "mlp-int8", precision="int8", build_root=root)).out
    return fp32, int8


def test_bench_times_every_backend_at_every_batch_and_writes_json_and_png(mlp_bundles, tmp_path):
    steps = []
    doc = bench(BenchRequest(mlp_bundles, batches=(1, 4), warmup=1, iterations=3, threads=1), on_step=steps.append)

    names = [b["name"] for b in doc["backends"]]
    assert names == ["pytorch eager", "onnxruntime exported", "planforge fp32 ort-cpu", "planforge int8 ort-cpu",
                     "onnxruntime quantize_static int8"]
    assert len(steps) == len(names) * 2 and doc["batches"] == [1, 4] and doc["batch_dim"] == "batch"
    eager = doc["backends"][0]["points"]
    for backend in doc["backends"]:
        assert [p["batch"] for p in backend["points"]] == [1, 4]
        for point, ref in zip(backend["points"], eager):
            assert 0 < point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"]
            assert point["throughput"] == pytest.approx(point["batch"] * 1000 / point["mean_ms"])
            assert point["speedup"] == pytest.approx(ref["p50_ms"] / point["p50_ms"])
        assert backend["load_seconds"] >= 0
    for backend, bundle in zip(doc["backends"][2:4], mlp_bundles):  # build time comes from each manifest
        assert backend["build_seconds"] == read_manifest(bundle).build_seconds["total"] > 0
    assert doc["backends"][4]["build_seconds"] > 0  # quantize_static, timed here
    assert "planforge fp32 trt" in doc["skipped"] and doc["skipped"]["planforge fp32 trt"]

    json_path, png_path = write_results(doc, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(doc))
    assert png_path.read_bytes()[:8] == PNG_MAGIC and png_path.stat().st_size > 10_000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary leftovers

    env = doc["environment"]  # where it ran: the CPU, its ISA class, and how loaded the machine was
    assert env["cpu_isa"] == detect().isa and env["cpu_model"] == detect().model and env["cpus"] == detect().cores
    assert all(isinstance(env["load_1min"][k], float) for k in ("start", "end"))
    assert env["loaded"] == any(v > env["cpus"] for v in env["load_1min"].values())

    summary = summary_markdown([doc])
    assert summary.count("| mlp | 4 |") == len(names) and "1.00x" in summary  # the largest batch, eager = 1x
    assert f"ISA class {detect().isa}" in summary and "1 thread(s)" in summary and "load average" in summary


def test_peak_memory_counts_what_a_backend_allocates():
    """The peak is the resident memory a backend adds: 96 MiB touched at load must show as about that."""
    held = {}

    def load():
        held["array"] = np.ones(96 * 2**20 // 8)  # written, so resident
        return lambda feeds: None

    result = time_backend(Backend("alloc", "fp32", None, load, held.clear), {1: {}}, 0, 1, lambda s: None)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs here: peak memory is not measured on this OS")
    assert 90 <= result.peak_memory_mib <= 160
    assert not held  # closed


def test_bench_summary_refuses_runs_with_other_threads_or_cpu_classes(tmp_path, run_cli):
    doc = {"kind": "bench", "model": "mlp", "threads": 2, "iterations": 3, "bundles": [],
           "environment": {"cpu_isa": "avx2", "cpus": 2, "cpu_model": "x", "onnxruntime": "1",
                           "load_1min": {"start": 0.1, "end": 1.5}, "loaded": False},
           "backends": [{"name": "pytorch eager", "points": [{"batch": 1, "p50_ms": 1.0, "p99_ms": 1.0,
                                                               "throughput": 1.0, "speedup": 1.0}],
                         "peak_memory_mib": None, "build_seconds": None}]}
    paths = []
    for i, change in enumerate(({}, {"threads": 1}, {"environment": dict(doc["environment"], cpu_isa="avx512-vnni")})):
        paths.append(tmp_path / f"b{i}.json")
        paths[-1].write_text(json.dumps({**doc, **change}))
    code, _, _ = run_cli("bench-summary", paths[0], paths[0], "-o", tmp_path / "same.md")
    assert code == 0 and "ISA class avx2" in (tmp_path / "same.md").read_text()
    for other in paths[1:]:
        code, _, err = run_cli("bench-summary", paths[0], other, "-o", tmp_path / "s.md")
        assert code == 2 and "different thread counts or CPU ISA classes" in err and "--allow-mixed" in err
    code, _, _ = run_cli("bench-summary", *paths, "--allow-mixed", "-o", tmp_path / "mixed.md")
    text = (tmp_path / "mixed.md").read_text()
    assert code == 0 and "ISA class avx2" in text and "ISA class avx512-vnni" in text


def test_cli_bench_refuses_bad_batches_and_mixed_models(mlp_bundles, tmp_path, run_cli, build_root):
    code, _, err = run_cli("bench", mlp_bundles[0], "--batch", "65")
    assert code == 2 and "--batch 65" in err and "1..64" in err
    other = build(BuildRequest("gpt_tiny", out=tmp_path / "gpt", build_root=build_root)).out
    code, _, err = run_cli("bench", mlp_bundles[0], other)
    assert code == 2 and "another model" in err
    code, _, err = run_cli("bench-summary", mlp_bundles[0] / "manifest.json", "-o", tmp_path / "s.md")
    assert code == 2 and "not a bench.json" in err


def test_cli_bench_writes_results_next_to_each_other(mlp_bundles, tmp_path, run_cli):
    code, out, _ = run_cli("bench", mlp_bundles[0], "--batch", "2", "--warmup", "0", "--iterations", "2",
                           "-o", tmp_path / "r")
    assert code == 0 and "pytorch eager" in out and "vs eager" in out
    doc = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert doc["batches"] == [2] and (tmp_path / "r" / "bench.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((mlp_bundles[0] / "report.json").read_text())
    assert [b["name"] for b in report["bench"]["backends"]] == ["pytorch eager", "onnxruntime exported",
                                                                "planforge fp32 ort-cpu"]
    assert "parity" in report  # the build's sections stay
    manifest = read_manifest(mlp_bundles[0])
    for name in manifest.artifacts:
        verified_path(mlp_bundles[0], manifest, name)
    code, out, _ = run_cli("bench-summary", tmp_path / "r" / "bench.json", "-o", tmp_path / "summary.md")
    assert code == 0 and "| mlp | 2 | planforge fp32 ort-cpu |" in (tmp_path / "summary.md").read_text()


def test_a_transformer_is_benched_against_onnx_runtimes_own_transformers_optimizer(build_root):
    """The anchor of the transformer work: ``onnxruntime.transformers.optimizer`` on the exported graph."""
    bundle = build(BuildRequest("bert_tiny", out=build_root / "bert-bench", build_root=build_root,
                                inputs=("input_ids:int64:[batch=1..4@2,seq=4..32@16]:0..30522",))).out
    doc = bench(
        BenchRequest((bundle,), batches=(2,), warmup=1, iterations=2, threads=1, cache_dir=build_root / ".cache")
    )
    names = [b["name"] for b in doc["backends"]]
    assert "onnxruntime transformers optimizer (bert)" in names, doc["skipped"]
    row = next(b for b in doc["backends"] if b["name"] == "onnxruntime transformers optimizer (bert)")
    assert row["build_seconds"] > 0 and row["points"][0]["p50_ms"] > 0
    mlp = read_manifest(build(BuildRequest("mlp", out=build_root / "mlp-nobert", build_root=build_root)).out)
    assert "input_ids" not in mlp.inputs.names  # models without token ids get no such row (see the mlp test above)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A Hugging Face BERT directory with a tokenizer, made here (2 layers, 32 wide, seeded weights; the
    vocabulary: the words of the benchmark's sentences)."""
    import torch
    import transformers as tf

    from engines.evaluate.text import sentences

    path = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w.strip(".,;:()'\"").lower() for s in sentences()[:400] for w in s.split()} - {""})
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tf.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    tf.BertModel(config).eval().save_pretrained(str(path))
    return path


def test_bench_transformer_times_every_anchor_on_padded_real_text_and_writes_the_table(tiny_bert_dir, tmp_path,
                                                                                        run_cli, build_root):
    from engines.evaluate.bench.transformer import OPTIMIZER, TRIMMED, TransformerBenchRequest, bench_transformer

    vocab = len((tiny_bert_dir / "vocab.txt").read_text().split())
    spec = (f"input_ids:int64:[batch=1..4@2,seq=1..32@32]:0..{vocab}", "attention_mask:int64:[batch,seq]:0..2")
    bundle = build(BuildRequest(str(tiny_bert_dir), out=tmp_path / "tiny", build_root=build_root, inputs=spec)).out
    doc = bench_transformer(TransformerBenchRequest(bundle, batches=(2,), seqs=(8, 32), rounds=2, iterations=1,
                                                    threads=1, cache_dir=build_root / ".cache"))
    names = list(dict.fromkeys(r["backend"] for r in doc["rows"]))
    assert names == ["pytorch eager", "onnxruntime exported", OPTIMIZER, "planforge fp32 ort", TRIMMED], doc["skipped"]
    for row in doc["rows"]:
        assert row["median_ms"] > 0 and row["vs_export"] > 0 and row["vs_optimizer"] > 0
    padding = {r["seq"]: r["padding"] for r in doc["rows"]}
    assert 0 <= padding[8] < padding[32] < 1  # real sentence lengths: more padding at the longer length
    assert (
        doc["environment"]["cpu_isa"] and doc["threads"] == 1 and "fp32 vs export at 2 x 32 (>= 1.15)" in doc["targets"]
    )
    code, out, _ = run_cli("bench-transformer", bundle, "--batch", "1", "--seq", "16", "--rounds", "1",
                           "--iterations", "1", "--threads", "1", "-o", tmp_path / "out")
    assert code == 0 and "| planforge fp32 ort |" in out
    table = (tmp_path / "out" / "bench-transformer.md").read_text()
    assert "| backend | 1 x 16 |" in table and json.loads((tmp_path / "out" / "bench-transformer.json").read_text())
    code, _, err = run_cli(
        "bench-transformer", build(BuildRequest("mlp", out=tmp_path / "mlp", build_root=build_root)).out
    )
    assert code == 2 and "Hugging Face text model" in err


@pytest.mark.parametrize("code, stderr, expected", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGILL)", "", "killed by SIGILL: an instruction this CPU"),
    ("import sys; sys.exit(3)", "", "exited 3 with no output"),
    ("import sys; print('first'); sys.exit('llama_cpp: cannot load the model')", "cannot load",
     "llama_cpp: cannot load the model"),
])
def test_a_peer_that_dies_is_named_by_its_last_words_or_its_signal(code, stderr, expected):
    """A peer built for another CPU (llama.cpp with AVX-512 on an AVX2 machine) dies of SIGILL before it prints
    anything: the row's ``skipped`` says so instead of 'no output'."""
    import subprocess
    import sys

    from engines.evaluate.bench.environment import worker_failure

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and stderr in done.stderr
    assert worker_failure(done).startswith(expected)
