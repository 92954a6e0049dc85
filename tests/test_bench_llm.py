"""``planforge bench-llm`` on a seeded LLaMA-style bundle and transformers on the same directory, each in its
own process: the rows carry every field the issue names, and the two perplexities of the same FP32 weights
on the same token ids agree (an independent check of the bundle's scoring). Speed is reported, never
asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from decoders import tiny_llama_bundle

FIELDS = {"backend", "precision", "batch", "prompt_tokens", "new_tokens", "ttft_ms", "prompt_tok_per_s",
          "decode_tok_per_s", "p50_ms", "p99_ms", "peak_rss_mb", "perplexity"}


def test_bench_llm_rows_and_the_same_weights_perplexity_in_planforge_and_transformers(tmp_path, run_cli):
    bundle, directory = tiny_llama_bundle()  # planforge build of tiny_llama, shared by the test run
    code, out, err = run_cli("bench-llm", bundle, "--transformers", directory, "--batch", "1", "--batch", "2",
                             "--prompt-tokens", "16", "--new-tokens", "8", "--perplexity-tokens", "32",
                             "-o", tmp_path / "bench", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in ("planforge", "transformers") for n in (1, 2)}
    assert {r["backend"]: Path(r["model"]) for r in rows} == {"planforge": bundle, "transformers": directory}
    for row in rows:
        assert FIELDS <= set(row), row
        assert row["prompt_tokens"] == 16 and row["new_tokens"] == 8 and row["decode_tok_per_s"] > 0
    ppl = {r["backend"]: r["perplexity"] for r in rows if r["batch"] == 1}
    assert ppl["planforge"] == pytest.approx(ppl["transformers"], rel=1e-3)
    doc = json.loads((tmp_path / "bench" / "bench-llm.json").read_text())
    assert doc["environment"]["cpu_isa"] and (tmp_path / "bench" / "bench-llm.png").stat().st_size > 0
