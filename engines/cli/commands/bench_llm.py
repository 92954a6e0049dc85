"""``planforge bench-llm BUNDLE...``: decoder bundles against transformers, onnxruntime-genai and llama.cpp."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engines.cli.console import console, print_json
from engines.cli.options import json_option

COLUMNS = ("backend", "model", "precision", "batch", "ttft_ms", "prompt_tok_per_s", "decode_tok_per_s", "p50_ms",
           "p99_ms", "peak_rss_mb", "perplexity")


@click.command("bench-llm")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--transformers", "hf_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A Hugging Face directory to run with transformers eager FP32 (the bundle's own source).")
@click.option("--genai", "genai_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An onnxruntime-genai model directory (its builder's output; repeat).")
@click.option("--genai-python", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The Python of the venv with onnxruntime-genai [this one].")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A GGUF file to run with llama.cpp.")
@click.option("--llama-python", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The Python of the venv with llama-cpp-python [this one].")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1), metavar="N", help="Batch sizes [1, 4].")
@click.option("--prompt-tokens", type=click.IntRange(2), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=128, show_default=True)
@click.option("--perplexity-tokens", type=click.IntRange(16), default=512, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="CPU threads of every backend.")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True, help="Interleaved rounds (median).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("build/bench-llm"), show_default=True,
              help="Directory for bench-llm.json and bench-llm.png.")
@json_option
def bench_llm(bundles, hf_dir, genai_dirs, genai_python, gguf, llama_python, batches, prompt_tokens, new_tokens,
              perplexity_tokens, threads, rounds, out, as_json):
    """Time decoder BUNDLES and their peers: TTFT, prompt and decode tokens/s, p50/p99, peak RSS, perplexity."""
    from engines.evaluate.bench.llm import LlmBenchRequest, Peer, bench_llm, plot  # noqa: PLC0415 - --help stays fast
    from engines.evaluate.bench.report import write_results  # noqa: PLC0415

    here = Path(sys.executable)
    peers = ([Peer("transformers", hf_dir)] if hf_dir else []) + \
        [Peer("onnxruntime-genai", d, genai_python or here) for d in genai_dirs] + \
        ([Peer("llama.cpp", gguf, llama_python or here)] if gguf else [])
    request = LlmBenchRequest(tuple(bundles), tuple(peers), tuple(batches) or (1, 4), prompt_tokens, new_tokens,
                              perplexity_tokens, threads, rounds)
    doc = bench_llm(request, on_row=lambda row: None if as_json else console.print(
        f"  {row.get('backend')} batch {row.get('batch')}: "
        + (f"{row['decode_tok_per_s']:.1f} decode tok/s" if "decode_tok_per_s" in row else row.get("skipped", ""))))
    json_path, png_path = write_results(doc, out, "bench-llm", plot)
    if as_json:
        print_json(doc["rows"])
        return
    from engines.cli.present import rows_table  # noqa: PLC0415 - per command: --help stays fast

    # the model's file or directory name: two bundles of one precision (two budgets) stay apart in the table
    rows = [{**row, "model": Path(row["model"]).name} if row.get("model") else row for row in doc["rows"]]
    rows_table(console, rows, COLUMNS, (json_path, png_path))


COMMANDS = (bench_llm,)
