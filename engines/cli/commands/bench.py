"""``planforge bench``, ``bench-serve``, ``bench-transformer``, ``bench-summary`` and ``bench-passes``:
speed against the peers, with the machine named."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from engines.cli.console import console, err_console, print_json
from engines.cli.options import json_option
from foundation.errors import UsageError


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1), metavar="N",
              help="Batch sizes (repeat) [the batch dim's min, opt and max].")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed runs per point.")
@click.option("--iterations", type=click.IntRange(1), default=20, show_default=True, help="Timed runs per point.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads for every "
              "backend (0: all cores).")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Time ONNX Runtime's quantize_static beside INT8 bundles.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Directory for bench.json and bench.png "
              "[build/bench/<model>].")
@json_option
def bench(bundles, batches, warmup, iterations, threads, peer, out, as_json):
    """Time one model's BUNDLES against PyTorch eager and ONNX Runtime, per batch size."""
    from engines.cli.present import bench_bundle_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.bench.bundles import (  # noqa: PLC0415 - per command: --help stays fast
        BenchRequest,
        bench as run_bench,
    )
    from engines.evaluate.bench.report import save  # noqa: PLC0415 - per command: --help stays fast

    request = BenchRequest(bundles=tuple(bundles), batches=tuple(batches), warmup=warmup, iterations=iterations,
                           threads=threads, peer=peer, out=out)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("loading", total=None)

        def step(description):
            if progress.tasks[task].description != "loading":
                progress.advance(task)
            progress.update(task, description=description)

        doc = run_bench(request, on_step=step, on_total=lambda n: progress.update(task, total=n))
    json_path, png_path, reports = save(doc, request)
    if as_json:
        print_json(doc)
        return
    bench_bundle_table(console, doc)
    console.print(f"wrote {json_path} and {png_path}; the bench section of {', '.join(map(str, reports))}")


@click.command("bench-serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--concurrency", help="Client counts, comma-separated [1,4,16,64; decoders: 1,4,8 streams].")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Seconds per row.")
@click.option("--rate", type=click.FloatRange(0, min_open=True), help="Open loop: Poisson arrivals per second instead.")
@click.option("--zipf", type=click.FloatRange(0), default=1.2, show_default=True,
              help="Zipf exponent of the input draws (0: uniform).")
@click.option("--max-delay-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="The batcher's maximum queue delay.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--no-http", is_flag=True, help="In-process rows only (no planforge serve subprocess).")
@click.option("--requests", type=click.IntRange(1), help="Decoders: requests per level [max(8, 3 x streams)].")
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Decoders: mean prompt length.")
@click.option("--new-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Decoders: mean output length.")
@click.option("--spread", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Decoders: lengths uniform in mean x (1 +- spread).")
@click.option("--shared-prefix", type=click.IntRange(0), default=0, show_default=True,
              help="Decoders: the same N-token prefix on every prompt (the prefix cache's case).")
@click.option("--llama-server", type=click.Path(path_type=Path), help="Decoders: llama.cpp's llama-server binary, "
              "run as the peer on --gguf.")
@click.option("--gguf", type=click.Path(path_type=Path), help="Decoders: the GGUF file the peer serves.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Directory for bench-serve.json and .png "
              "[build/bench-serve/<model>].")
@json_option
def bench_serve(bundle, concurrency, duration, rate, zipf, max_delay_ms, threads, no_http, requests, prompt_tokens,
                new_tokens, spread, shared_prefix, llama_server, gguf, out, as_json):
    """Load-test serving on BUNDLE. Decoders: continuous batching against one-at-a-time and llama.cpp's server,
    in-process and over HTTP. Other models: unbatched, batched, batched+cache, batched over HTTP, and the
    largest-batch ceiling."""
    from engines.bundle import read_manifest  # noqa: PLC0415 - per command: --help stays fast

    manifest = read_manifest(bundle)
    try:
        levels = tuple(int(c) for c in concurrency.split(",")) if concurrency else None
    except ValueError:
        raise UsageError(f"--concurrency {concurrency!r}: expected integers separated by commas, e.g. 1,4,16") from None
    target = out or Path("build") / "bench-serve" / manifest.model.name
    if manifest.decoder is not None:
        from engines.cli.present import serve_llm_table  # noqa: PLC0415
        from engines.evaluate.bench.serve_llm import (  # noqa: PLC0415
            LlmServeBenchRequest,
            bench_serve_llm,
            check_request as check_llm,
        )

        request = LlmServeBenchRequest(bundle, levels or (1, 4, 8), requests, prompt_tokens, new_tokens, spread,
                                       shared_prefix, ("in-process",) if no_http else ("in-process", "http"),
                                       threads=threads or None, llama_server=llama_server, gguf=gguf, out=target)
        check_llm(request)
        doc = bench_serve_llm(request, on_step=lambda s: err_console.print(f"[dim]{s}[/dim]"))
        print_json(doc) if as_json else serve_llm_table(console, doc, request.out)
        return
    from engines.cli.present import serve_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.bench.serve import (  # noqa: PLC0415 - per command: --help stays fast
        ServeBenchRequest,
        bench_serve as run,
        check_request,
    )

    request = ServeBenchRequest(bundle, levels or (1, 4, 16, 64), duration, rate, zipf, threads or None, max_delay_ms,
                                out=target, http=not no_http)
    check_request(request)
    doc = run(request)
    print_json(doc) if as_json else serve_table(console, doc, request.out)


def read_manifest_name(bundle: Path) -> str:
    from engines.bundle import read_manifest  # noqa: PLC0415

    return read_manifest(bundle).model.name


@click.command("bench-transformer")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("int8_bundle", required=False, type=click.Path(path_type=Path))
@click.option(
    "--batch", "batches", multiple=True, type=click.IntRange(1), metavar="N", help="Batch sizes (repeat) [1, 8]."
)
@click.option(
    "--seq", "seqs", multiple=True, type=click.IntRange(1), metavar="L", help="Padded lengths (repeat) [32, 128]."
)
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True, help="Interleaved rounds.")
@click.option(
    "--iterations", type=click.IntRange(1), default=4, show_default=True, help="Timed runs per round and point."
)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads for every "
              "backend (0: all cores).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Directory for bench-transformer.json and .md "
              "[build/bench-transformer/<model>].")
@json_option
def bench_transformer(bundle, int8_bundle, batches, seqs, rounds, iterations, threads, out, as_json):
    """Time a transformer BUNDLE (and its INT8_BUNDLE) against PyTorch, ONNX Runtime and its optimizer, on real text."""
    from engines.evaluate.bench.transformer import (  # noqa: PLC0415 - per command: --help stays fast
        TransformerBenchRequest,
        bench_transformer,
        markdown,
        save,
    )

    request = TransformerBenchRequest(bundle, int8_bundle, tuple(batches) or (1, 8), tuple(seqs) or (32, 128),
                                      rounds, iterations, threads or os.cpu_count() or 1)
    doc = bench_transformer(request)
    json_path, md_path = save(doc, out or Path("build") / "bench-transformer" / doc["model"])
    if as_json:
        print_json(doc)
        return
    console.print(markdown(doc))
    for k, v in doc["targets"].items():
        console.print(f"{k}: {v}")
    console.print(f"wrote {json_path} and {md_path}")


@click.command("bench-summary")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The Markdown file to write.")
@click.option("--allow-mixed", is_flag=True, help="Merge runs with different thread counts or CPU ISA classes.")
def bench_summary(results, out, allow_mixed):
    """Summarize bench.json files as one Markdown table (largest batch per model)."""
    from engines.evaluate.bench.report import check_comparable, load_results, summary_markdown  # noqa: PLC0415 - per command: --help stays fast

    docs = load_results(results)
    check_comparable(docs, allow_mixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summary_markdown(docs))
    console.print(f"wrote {out}")


@click.command("bench-passes")
@click.argument("models", nargs=-1)
@click.option("--target", "targets", multiple=True, type=click.Choice(["trt", "ort"]), default=("ort", "trt"),
              show_default=True)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for ONNX Runtime (0: all cores).")
@click.option("--iterations", "runs", type=click.IntRange(1), default=30, show_default=True,
              help="Timed runs per graph.")
@click.option("--int8", is_flag=True, help="INT8 against ONNX Runtime's quantize_static instead of the passes.")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="JSON results [build/bench-passes.json or build/bench-int8.json].",
)
def bench_passes(models, targets, threads, runs, int8, out):
    """Node counts and ONNX Runtime CPU latency, exported vs optimized graph, per zoo model (or --int8)."""
    import os  # noqa: PLC0415

    from engines.cli.present import bench_int8_table, bench_table  # noqa: PLC0415 - per command: --help stays fast

    threads = threads or os.cpu_count() or 1  # explicit, so every speed figure names its thread count

    if int8:
        from engines.evaluate.bench.int8 import bench_int8  # noqa: PLC0415 - per command: --help stays fast

        rows, environment, out = bench_int8(models, threads, runs, out)
        bench_int8_table(console, rows, environment, threads)
    else:
        from engines.evaluate.bench.passes import bench_zoo  # noqa: PLC0415 - per command: --help stays fast

        results, out = bench_zoo(models, targets, threads, runs, out)
        bench_table(console, results)
    console.print(f"wrote {out}")


COMMANDS = (bench, bench_serve, bench_transformer, bench_summary, bench_passes)
