"""A decoder bundle end to end: ``planforge build`` on a local Hugging Face ``*ForCausalLM`` directory
(seeded LLaMA-style weights, GQA, a word-level tokenizer made in the test) records the decoder in the
manifest and ships its tokenizer; ``runtime.load(bundle).generate`` and ``planforge generate`` give
transformers' greedy tokens; compare passes; what decoders cannot do yet is refused in one line."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from decoders import WORDS, tiny_llama, tiny_llama_bundle  # noqa: E402

from engines.bundle import read_manifest  # noqa: E402
from engines.runtime import load  # noqa: E402
from foundation.decoder import DEFAULT_DECODER_BUDGET, DecoderBudget  # noqa: E402
from foundation.errors import IntegrityError  # noqa: E402

pytestmark = pytest.mark.xdist_group("decoder-bundle")  # one worker builds the module's bundles (--dist loadgroup)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    _, model, tokenizer = tiny_llama(root)
    return root, model, tokenizer


@pytest.fixture(scope="module")
def bundle(llm):
    """``planforge build`` of the same seeded weights (``tiny_llama``) at max length 64, made once per test run
    and shared with the other files that read such a bundle."""
    return tiny_llama_bundle()[0]


def test_the_manifest_records_the_decoder_and_the_bundle_ships_its_tokenizer(bundle):
    manifest = read_manifest(bundle)
    decoder = manifest.decoder
    assert (decoder.family, decoder.layers, decoder.kv_heads, decoder.head_dim, decoder.vocab) == \
        ("llama", 2, 2, 16, len(WORDS))
    assert decoder.max_length == 64 and decoder.bos == 1 and decoder.eos == (2,)
    assert (decoder.cache, decoder.trt_cache) == ("shared", "static")  # GroupQueryAttention; TensorScatter
    assert manifest.trt_check["refused"] == 0
    assert manifest.model.kind == "decoder" and manifest.export.exporter == "dynamo"
    assert manifest.artifacts["tokenizer.json"].role == "tokenizer"
    shapes = {o.name: o.shape for o in manifest.outputs}
    assert shapes["logits"] == ("batch", "seq", len(WORDS))
    assert shapes["present.0.key"] == ("batch", 2, "total", 16)
    report = json.loads((bundle / "report.json").read_text())
    assert set(report["parity"]["points"]) == {"prefill", "decode"} and report["parity"]["ok"]
    # the ort graph's weights sit beside it (ONNX Runtime maps them: one copy in memory), hashed like the graph
    assert manifest.artifacts["model.ort.onnx.data"].role == "external-data"
    graph = onnx.load(str(bundle / "model.ort.onnx"), load_external_data=False)
    assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"model.ort.onnx.data"}


def test_a_changed_external_weights_file_is_refused_before_loading(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = copy / "model.ort.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="model.ort.onnx.data does not match the sha256"):
        load(copy)


def test_the_runtime_generates_what_transformers_generates(bundle, llm):
    _, model, tokenizer = llm
    prompts = ["w5 w6 w7 w8", "w40 w41"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    with load(bundle) as runner:
        ours = runner.generate(ids, max_new_tokens=12)
    for prompt, got in zip(ids, ours):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert got == (expected[:expected.index(2)] if 2 in expected else expected)


def test_planforge_generate_prints_the_text_and_its_tokens(bundle, llm, run_cli):
    _, model, tokenizer = llm
    code, out, _ = run_cli("generate", bundle, "w5 w6 w7 w8", "--max-new-tokens", "10", "--json")
    assert code == 0
    doc = json.loads(out)
    with load(bundle) as runner:
        assert doc["new_tokens"] == runner.generate([tokenizer("w5 w6 w7 w8")["input_ids"]], 10)[0]
    assert doc["text"] == tokenizer.decode(doc["new_tokens"], skip_special_tokens=True)
    code, out, _ = run_cli("generate", bundle, "w5 w6 w7 w8", "--max-new-tokens", "10")
    assert code == 0 and out.strip() == doc["text"]
    code, out, _ = run_cli("generate", bundle, "1,7,8,9", "--ids", "--max-new-tokens", "5", "--temperature", "0.8",
                           "--seed", "3")
    again = run_cli("generate", bundle, "1,7,8,9", "--ids", "--max-new-tokens", "5", "--temperature", "0.8",
                    "--seed", "3")
    assert code == 0 and out == again[1] and len(out.strip().split(",")) <= 5


def test_compare_passes_on_the_decoder_bundle(bundle, tmp_path):
    from engines.evaluate.compare import CompareRequest, compare

    result = compare(CompareRequest(bundle, report=tmp_path / "r.json", cache_dir=tmp_path / ".cache"))
    assert result.ok and result.reference == "pytorch"
    assert {p.runner for p in result.pairs} >= {"onnxruntime model.ort.onnx", "planforge ort-cpu"}


@pytest.fixture(scope="module")
def int4_bundle(llm):
    from engines.cli import main

    root, _, _ = llm
    out = root / "bundle-int4"
    assert main(["build", str(root / "tiny-llama"), "-o", str(out), "--max-length", "64", "--precision", "int4",
                 "-q"]) == 0
    return out


def test_an_int4_bundle_holds_4_bit_weights_within_its_perplexity_budget(int4_bundle):
    import onnx

    from engines.runtime.generate.perplexity import evaluation_ids, score
    from engines.runtime.generate.text import Tokenizer

    manifest = read_manifest(int4_bundle)
    report = manifest.accuracy.int4["ort"]
    assert manifest.precision == "int4" and manifest.backends.ort.precision == "int4"
    assert report.budget == DEFAULT_DECODER_BUDGET and any(t["met"] for t in report.tries)
    assert DecoderBudget.parse(report.budget).met(report.result["perplexity"], report.result["agreement"],
                                                  report.reference["perplexity"])
    graph = onnx.load(str(int4_bundle / manifest.backends.ort.graph))
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert bits.count(4) == report.int4 and bits.count(8) == len(report.int8) and bits
    assert not [n for n in graph.graph.node if n.op_type == "MatMul"]
    trt = onnx.load(str(int4_bundle / manifest.backends.trt.graph))  # TensorRT's form: standard ONNX
    trt_ops = [n.op_type for n in trt.graph.node]
    assert "MatMulNBits" not in trt_ops and trt_ops.count("DequantizeLinear") == trt_ops.count("MatMul") > 0
    assert manifest.backends.trt.precision == "int4" and manifest.trt_check["refused"] == 0
    assert manifest.accuracy.int4["trt"].int4 + len(manifest.accuracy.int4["trt"].int8) == trt_ops.count("MatMul")
    with load(int4_bundle) as runner:  # the recorded perplexity is the bundle's, scored again here
        ids = evaluation_ids(Tokenizer(int4_bundle).encode, manifest.decoder.bos, report.result["tokens"])
        again, _ = score(runner.generator(), ids)
        assert again.perplexity == pytest.approx(report.result["perplexity"], rel=1e-4)
        assert len(runner.generate([[1, 5, 6, 7]], max_new_tokens=6)[0]) <= 6


def test_inspect_says_how_an_int4_bundle_met_its_budget(int4_bundle, run_cli):
    report = read_manifest(int4_bundle).accuracy.int4["ort"]
    code, out, _ = run_cli("inspect", int4_bundle)
    line = next(x for x in " ".join(out.split()).split("int4 ")[1:] if x.startswith("ort:"))
    assert code == 0 and f"{report.int4} MatMuls at 4 bits, {len(report.int8)} at 8" in line
    assert f"perplexity {report.result['perplexity']:.3f} (float {report.reference['perplexity']:.3f})" in line
    assert "GGUF" not in line  # a Hugging Face directory has no blocks to carry


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "--precision int8 is not available for decoders"),
    (["--precision", "int4", "--budget", "top1=0.9"], "decoder budget 'top1=0.9': expected perplexity=R"),
    (["--prune", "auto"], "--prune is not available for decoders"),
])
def test_what_decoders_cannot_do_yet_is_refused_in_one_line(llm, run_cli, tmp_path, args, message):
    root, _, _ = llm
    code, _, err = run_cli("build", root / "tiny-llama", "-o", tmp_path / "b", *args)
    assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "b").exists()


def test_a_budget_out_of_reach_tries_the_heads_floor_before_it_stops(llm, run_cli, tmp_path, monkeypatch):
    """Every MatMul at 8 bits breaking the budget: the LM head takes more candidates, then runs whole in 8 bits,
    and only then does the build stop, naming each try (the tiny vocabulary of 96 runs rescored with 4 or 8
    candidates; agreement 1.01 is out of any graph's reach)."""
    monkeypatch.setattr("engines.build.int4.RESCORE", (4, 8, 0))
    root, _, _ = llm
    code, _, err = run_cli("build", root / "tiny-llama", "-o", tmp_path / "b", "--max-length", "64",
                           "--precision", "int4", "--budget", "agreement=1.01", "-q")
    message = " ".join(err.split())
    assert code != 0 and "Traceback" not in err and not (tmp_path / "b").exists()
    assert "break the budget agreement=1.01 even with every MatMul at 8 bits" in message
    tries = [message.index(t) for t in ("with the LM head's 4 best candidates in 8 bits",
                                         "with the LM head's 8 best candidates in 8 bits",
                                         "with the LM head whole in 8 bits")]
    assert tries == sorted(tries)


def test_bad_generation_requests_exit_with_the_reason(bundle, run_cli, tmp_path):
    code, _, err = run_cli("generate", bundle, "1," + ",".join(["7"] * 70), "--ids")
    assert code != 0 and "longer than the max length 64" in err
    code, _, err = run_cli("generate", bundle, "1,x", "--ids")
    assert code == 2 and "expected token ids separated by commas" in err


def test_compare_reports_perplexity_and_agreement_and_judges_an_int4_bundle_by_its_budget(int4_bundle, tmp_path):
    from engines.evaluate.compare import CompareRequest, compare

    result = compare(CompareRequest(int4_bundle, report=tmp_path / "r.json", cache_dir=tmp_path / ".cache"))
    metric = result.task_metric
    report = read_manifest(int4_bundle).accuracy.int4["ort"]
    assert metric["values"]["planforge ort-cpu"] == pytest.approx(report.result["perplexity"], rel=1e-4)
    assert metric["values"]["onnxruntime model.onnx"] == pytest.approx(report.reference["perplexity"], rel=1e-3)
    assert metric["budget"] == DEFAULT_DECODER_BUDGET and metric["passed"] and result.ok
    judged = [p for p in result.pairs if p.precision == "int4"]
    assert judged and all(p.budget["passed"] for p in judged)
