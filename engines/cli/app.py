"""The ``planforge`` command line: parses options and calls the library. No logic lives here.

Errors a user can fix print one line and exit with the error class's code; ``-v`` adds
tracebacks and debug logging. Ctrl-C exits 130 and leaves no partial bundle.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from engines import __version__
from foundation.errors import ComparisonFailed, PlanforgeError, TensorRTRefusal, UsageError, plain

logger = logging.getLogger("planforge")
# Piped output (logs, CI) is not wrapped at rich's default 80 columns: spec strings stay whole.
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)


OURS = ("planforge", "engines", "exporter", "foundation", "passes")  # the loggers -v turns to DEBUG
GLOBAL_FLAGS = {"-v": ("verbose", 1), "--verbose": ("verbose", 1), "-vv": ("verbose", 2), "-q": ("quiet", 1),
                "--quiet": ("quiet", 1)}


def _setup_logging(verbose: int, quiet: bool) -> None:
    """planforge's own records at INFO (DEBUG with -v, WARNING with -q); everyone else's (onnxscript, the
    exporter, torch: thousands of lines) at WARNING, DEBUG only with -vv."""
    handler = RichHandler(console=err_console, show_time=False, show_path=False, rich_tracebacks=verbose > 0)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for name in OURS:
        logging.getLogger(name).setLevel(level)


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """-v, -vv, -q anywhere before ``--`` count as if given before the command (``planforge build m -v``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="planforge's debug logging and tracebacks (-vv: every library's "
                                                    "debug logging too). Accepted after the command as well.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only (results still print).")
@click.version_option(__version__, "--version", prog_name="planforge", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """planforge: PyTorch -> ONNX -> graph passes -> TensorRT / ONNX Runtime bundles."""
    ctx.obj = {"verbose": verbose, "quiet": quiet}
    _setup_logging(verbose, quiet)


_skip_option = click.option("--skip-pass", "skip_passes", multiple=True, metavar="PASS",
                            help="Leave this pass out of the pipelines (repeat), e.g. --skip-pass FuseAttention.")
def _export_options(command):
    """The export and parity options ``build`` and ``export`` share."""
    for option in reversed((
            click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the export."),
            click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
                         show_default=True, help="torch.onnx exporter; auto: dynamo, TorchScript where dynamo fails."),
            click.option("--parity-atol", type=float, default=1e-4, show_default=True,
                         help="Absolute tolerance of the PyTorch-vs-ONNX Runtime parity check."),
            click.option("--parity-rtol", type=float, default=1e-3, show_default=True,
                         help="Relative tolerance of the parity check."))):
        command = option(command)
    return command


_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print machine-readable JSON on stdout instead of the table.")
_input_option = click.option("--input", "inputs", multiple=True, metavar="SPEC",
                             help='Override an input, e.g. "x:float32:[batch=1..32@8,3,224,224]".')


@cli.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Bundle directory [build/<model>[-<precision>]].")
@_input_option
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16: the TensorRT graph in FP16 (the CPU fallback stays FP32); int8: both graphs with Q/DQ.")
@click.option("--force", is_flag=True, help="Rebuild even if a bundle exists.")
@_export_options
@click.option("--verify-passes/--no-verify-passes", default=True, show_default=True,
              help="Check numbers under ONNX Runtime after every pass.")
@click.option("--keep-fp32", multiple=True, metavar="NAME_OR_OP", help="Keep these nodes or op types in FP32 (fp16).")
@click.option("--calib", metavar="SOURCE", help="INT8 calibration data: a directory of .npz/.npy batches or "
              "module:function (zoo models bring their own).")
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), default="max",
              show_default=True, help="How activation ranges are taken from the calibration data.")
@click.option("--allow-random-calibration", is_flag=True, help="Accept random calibration data (accuracy unknown).")
@click.option("--budget", metavar="[OUTPUT:]METRIC[@STAT]=VALUE",
              help="INT8 accuracy budget: top1=0.99, cosine=0.99 or relerr=0.05 [default by task]; OUTPUT: one output "
                   "(probs:top1=0.99); STAT: relerr@mean|pNN|sample|channel, cosine@min|pNN (boxes:relerr@p99=0.05).")
@click.option("--metric", "metric_hook", metavar="FILE.py:FUNCTION",
              help="A task metric as the INT8 budget: FUNCTION(reference, candidate, feeds) -> (score, passed), "
                   "dicts of arrays over the held-out batches; compare uses it too.")
@click.option("--state", "state", multiple=True, metavar="OUTPUT:INPUT",
              help="A stateful model's output that feeds an input on the next call (repeat): the INT8 budget and "
                   "compare run their batches as a sequence, each graph feeding its own state back (drift counts).")
@click.option("--ort-int8-form", type=click.Choice(["auto", "u8s8", "u8s8-rr", "u8u8", "u8s8-compute",
                                                   "u8s8-rr-compute", "u8u8-compute"]), default="auto",
              show_default=True, help="INT8 form of the ONNX Runtime graph. auto: the fastest accurate form among "
              "those that cannot saturate on this CPU's class (u8s8 with VNNI, AMX or ARM dot product; u8s8-rr or "
              "u8u8 without), each over every op or (-compute) over Conv/Gemm/MatMul layers only.")
@click.option("--require-int8", multiple=True, type=click.Choice(["trt", "ort", "all"]),
              help="Fail (exit 7) when this target's graph cannot be INT8 within the budget, instead of keeping it "
                   "float (repeat, or all).")
@click.option("--int8-time-limit", type=click.FloatRange(0), default=900.0, show_default=True,
              help="Seconds for each target's INT8 fallback search; when they run out the best graph found is kept "
                   "(0: no limit).")
@click.option("--profile", "profiles", multiple=True, metavar="DIM=MIN..MAX@OPT,...",
              help="A TensorRT optimization profile, e.g. batch=1..8@4 (repeat for several).")
@click.option("--profiles", "profiles_auto", metavar="auto:N[:DIM]", help="Split a dim's range into N profiles.")
@click.option("--static", is_flag=True, help="Freeze the graphs to the opt shapes (a static engine).")
@click.option("--require-trt", is_flag=True, help="Fail (exit 8) instead of skipping TensorRT when it cannot build.")
@click.option("--workspace-gib", type=float, default=4.0, show_default=True, help="TensorRT workspace limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--strict-fp32", is_flag=True, help="Clear TF32 so FP32 layers match ONNX Runtime.")
@click.option("--hardware-compat", type=click.Choice(["none", "ampere_plus", "same_compute_capability"]),
              default="none", show_default=True, help="TensorRT hardware compatibility level of the plan.")
@click.option("--version-compatible", is_flag=True, help="Embed a lean runtime (loads on later TensorRT versions).")
@click.option("--sparse-weights", is_flag=True, help="Let TensorRT use 2:4 structured-sparse kernels where weights allow.")
@click.option("--refit", is_flag=True, help="Build a refittable plan (weights can be replaced without a rebuild).")
@_skip_option
def build(model, out, inputs, precision, force, opset, exporter, parity_atol, parity_rtol, verify_passes, keep_fp32,
          calib, calib_method, allow_random_calibration, budget, metric_hook, state, ort_int8_form, require_int8, int8_time_limit,
          profiles, profiles_auto, static,
          require_trt, workspace_gib, opt_level, strict_fp32, hardware_compat, version_compatible, sparse_weights, refit,
          skip_passes):
    """Export MODEL, run the passes and write a bundle."""
    from engines.build import BuildRequest  # noqa: PLC0415 - per command: --help stays fast
    from engines.build import build as run_build
    from engines.cli.present import build_summary  # noqa: PLC0415 - per command: --help stays fast
    from engines.trt_build.builder import TrtOptions  # noqa: PLC0415 - per command: --help stays fast

    request = BuildRequest(
        model=model, out=out, inputs=tuple(inputs), precision=precision, force=force, opset=opset, exporter=exporter,
        parity_atol=parity_atol, parity_rtol=parity_rtol, verify_passes=verify_passes, keep_fp32=tuple(keep_fp32),
        skip_passes=tuple(skip_passes),
        calib=calib, calib_method=calib_method, allow_random_calibration=allow_random_calibration, budget=budget,
        metric_hook=str(Path(metric_hook.rpartition(":")[0]).resolve()) + ":" + metric_hook.rpartition(":")[2]
        if metric_hook and ".py:" in metric_hook else metric_hook, state=tuple(state), ort_int8_form=ort_int8_form, require_int8=tuple(require_int8), int8_time_limit=int8_time_limit or None,
        profiles=tuple(profiles), profiles_auto=profiles_auto, static=static,
        require_trt=require_trt,
        trt=TrtOptions(workspace_gib=workspace_gib, optimization_level=opt_level, strict_fp32=strict_fp32,
                       hardware_compatibility=hardware_compat, version_compatible=version_compatible,
                       sparse_weights=sparse_weights, refit=refit))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("build", total=None)
        result = run_build(request, on_stage=lambda stage: progress.update(task, description=stage))
    build_summary(console, result.out, result.manifest, result.reused, result.seconds)


@cli.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Where to write the .onnx file.")
@_input_option
@_export_options
def export(model, out, inputs, opset, exporter, parity_atol, parity_rtol):
    """Export MODEL to ONNX and check parity with PyTorch (no passes, no bundle)."""
    from engines.cli.actions import export_model  # noqa: PLC0415 - per command: --help stays fast

    report = export_model(model, out, tuple(inputs), opset, exporter, parity_atol, parity_rtol)
    console.print(f"wrote {out} ({report})")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Where to write the optimized graph.")
@click.option("--target", type=click.Choice(["trt", "ort"]), required=True,
              help="Whose pass pipeline: TensorRT's (standard ops) or ONNX Runtime's (its contrib fusions).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 converts the graph (the trt target's FP16 form).")
@_input_option
@click.option("--verify-passes/--no-verify-passes", default=True, show_default=True,
              help="Check numbers under ONNX Runtime after every pass.")
@click.option("--keep-fp32", multiple=True, metavar="NAME_OR_OP", help="Keep these nodes or op types in FP32 (fp16).")
@_skip_option
@click.option("--feed", "feeds", multiple=True, metavar="[NAME=]FILE",
              help="Verify on these inputs instead of random data: NAME=FILE.npy, FILE.npz (arrays named after the "
                   "inputs), or FILE.npy alone for a single-input model (repeat).")
def optimize(source, out, target, precision, inputs, verify_passes, keep_fp32, skip_passes, feeds):
    """Run the pass pipeline for one target on an .onnx file."""
    from engines.cli.actions import optimize_model  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import optimize_summary  # noqa: PLC0415 - per command: --help stays fast

    records, worst = optimize_model(source, out, target, precision, tuple(inputs), verify_passes, tuple(keep_fp32),
                                    tuple(skip_passes), tuple(feeds))
    optimize_summary(console, out, records, worst)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layers", is_flag=True, help="Per node of each graph: the precision it computes in and the PyTorch "
              "module it came from (and TensorRT's layers when the bundle has an engine).")
@_json_option
def inspect(path, layers, as_json):
    """Describe a bundle directory or an .onnx file."""
    from engines.cli.actions import describe_path, inspect_path  # noqa: PLC0415 - per command: --help stays fast

    if layers:
        from engines.bundle import read_manifest  # noqa: PLC0415
        from engines.cli.present import layers_table  # noqa: PLC0415 - per command: --help stays fast
        from engines.evaluate.layers import bundle_layers  # noqa: PLC0415 - imports onnx

        if not Path(path).is_dir():
            raise UsageError(f"--layers takes a bundle directory; {path} is not one")
        doc = bundle_layers(path, read_manifest(path))
        _print_json(doc) if as_json else layers_table(console, doc)
        return
    if as_json:
        _print_json(describe_path(path))
        return
    inspect_path(console, path)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--feed", "inputs", multiple=True, metavar="[NAME=]FILE",
              help="Inputs from files: NAME=FILE.npy, FILE.npz (arrays named after the inputs), or FILE.npy alone "
                   "for a single-input model (repeat). (--input is the input spec everywhere else.)")
@click.option("--random", "random_point", type=click.Choice(["min", "opt", "max"]),
              help="Feed seeded random inputs at this shape point instead of files.")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort-cuda", "ort-cpu"]), default="auto", show_default=True,
              help="auto: TensorRT, then ONNX Runtime CUDA, then CPU, the first this machine can run.")
@click.option("--save-outputs", type=click.Path(path_type=Path), help="Write the outputs to this .npz file.")
@_json_option
def run(bundle, inputs, random_point, backend, save_outputs, as_json):
    """Run one inference on BUNDLE and print output summaries."""
    from engines.cli.actions import run_bundle, summarize_outputs  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import output_summary  # noqa: PLC0415 - per command: --help stays fast

    used, outputs = run_bundle(bundle, inputs, random_point, backend, save_outputs)
    if as_json:
        _print_json({"backend": used, "outputs": summarize_outputs(outputs),
                     "saved": str(save_outputs) if save_outputs else None})
        return
    output_summary(console, used, outputs)
    if save_outputs:
        console.print(f"wrote {save_outputs}")


@cli.command()
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
@_json_option
def bench(bundles, batches, warmup, iterations, threads, peer, out, as_json):
    """Time one model's BUNDLES against PyTorch eager and ONNX Runtime, per batch size."""
    from engines.cli.present import bench_bundle_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.bench.bundles import BenchRequest  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.bench.bundles import bench as run_bench
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
        _print_json(doc)
        return
    bench_bundle_table(console, doc)
    console.print(f"wrote {json_path} and {png_path}; the bench section of {', '.join(map(str, reports))}")


@cli.command("bench-serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--concurrency", default="1,4,16,64", show_default=True, help="Closed-loop client counts, comma-separated.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Seconds per row.")
@click.option("--rate", type=click.FloatRange(0, min_open=True), help="Open loop: Poisson arrivals per second instead.")
@click.option("--zipf", type=click.FloatRange(0), default=1.2, show_default=True,
              help="Zipf exponent of the input draws (0: uniform).")
@click.option("--max-delay-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="The batcher's maximum queue delay.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Directory for bench-serve.json and .png "
              "[build/bench-serve/<model>].")
@_json_option
def bench_serve(bundle, concurrency, duration, rate, zipf, max_delay_ms, threads, out, as_json):
    """Load-test the serving layer on BUNDLE: unbatched, batched, batched+cache, and the largest-batch ceiling."""
    from engines.cli.present import serve_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.bench.serve import (  # noqa: PLC0415
        ServeBenchRequest,
        check_request,  # noqa: PLC0415
    )
    from engines.evaluate.bench.serve import bench_serve as run

    try:
        levels = tuple(int(c) for c in concurrency.split(","))
    except ValueError:
        raise UsageError(f"--concurrency {concurrency!r}: expected integers separated by commas, e.g. 1,4,16") from None
    manifest_name = read_manifest_name(bundle)
    request = ServeBenchRequest(bundle, levels, duration, rate, zipf, threads or None, max_delay_ms,
                                out=out or Path("build") / "bench-serve" / manifest_name)
    check_request(request)
    doc = run(request)
    _print_json(doc) if as_json else serve_table(console, doc, request.out)


def read_manifest_name(bundle: Path) -> str:
    from engines.bundle import read_manifest  # noqa: PLC0415

    return read_manifest(bundle).model.name


@cli.command("bench-transformer")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("int8_bundle", required=False, type=click.Path(path_type=Path))
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1), metavar="N", help="Batch sizes (repeat) [1, 8].")
@click.option("--seq", "seqs", multiple=True, type=click.IntRange(1), metavar="L", help="Padded lengths (repeat) [32, 128].")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True, help="Interleaved rounds.")
@click.option("--iterations", type=click.IntRange(1), default=4, show_default=True, help="Timed runs per round and point.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads for every "
              "backend (0: all cores).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Directory for bench-transformer.json and .md "
              "[build/bench-transformer/<model>].")
@_json_option
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
        _print_json(doc)
        return
    console.print(markdown(doc))
    for k, v in doc["targets"].items():
        console.print(f"{k}: {v}")
    console.print(f"wrote {json_path} and {md_path}")


@cli.command("bench-summary")
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


@cli.command("bench-passes")
@click.argument("models", nargs=-1)
@click.option("--target", "targets", multiple=True, type=click.Choice(["trt", "ort"]), default=("ort", "trt"),
              show_default=True)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for ONNX Runtime (0: all cores).")
@click.option("--iterations", "runs", type=click.IntRange(1), default=30, show_default=True,
              help="Timed runs per graph.")
@click.option("--int8", is_flag=True, help="INT8 against ONNX Runtime's quantize_static instead of the passes.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="JSON results [build/bench-passes.json or build/bench-int8.json].")
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


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", default="auto", show_default=True, metavar="SOURCE",
              help="golden (the bundle's golden.npz), random (Polygraphy's DataLoader from the input spec), eval "
                   "(a zoo model's evaluation batches), or an .npz file / directory of them. auto: eval for INT8 zoo "
                   "bundles, else golden.")
@click.option("--batches", "iterations", type=click.IntRange(1), default=4, show_default=True,
              help="Batches of random data (--data random).")
@click.option("--point", type=click.Choice(["min", "opt", "max"]), default="opt", show_default=True,
              help="Shape point of random data.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random data.")
@click.option("--atol", multiple=True, metavar="[OUTPUT:]VALUE", help="Absolute tolerance, e.g. 1e-3 or logits:1e-3.")
@click.option("--rtol", multiple=True, metavar="[OUTPUT:]VALUE", help="Relative tolerance.")
@click.option("--error-stat", multiple=True, metavar="[OUTPUT:]STAT",
              help="Error statistic checked: elemwise, max, mean, median or quantile.")
@click.option("--error-quantile", multiple=True, metavar="[OUTPUT:]Q", help="Quantile for --error-stat quantile.")
@click.option("--reference", type=click.Choice(["auto", "pytorch", "onnx"]), default="auto", show_default=True,
              help="PyTorch (auto when the bundle came from a PyTorch model) or ONNX Runtime on the exported graph.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the report here instead of BUNDLE/report.json.")
@click.option("--save-inputs", type=click.Path(path_type=Path), help="Save the inputs as Polygraphy JSON and print polygraphy run lines that repeat the checks on them.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for PyTorch and ONNX Runtime (0: all cores).")
@_json_option
def compare(bundle, data, iterations, point, seed, atol, rtol, error_stat, error_quantile, reference, report,
            save_inputs, threads, as_json):
    """Compare every artifact of BUNDLE with its reference (Polygraphy); exit 4 when one fails."""
    from engines.cli.present import compare_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.compare import CompareRequest  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.compare import compare as run_compare

    result = run_compare(CompareRequest(
        bundle=bundle, data=data, iterations=iterations, point=point, seed=seed, atol=tuple(atol), rtol=tuple(rtol),
        error_stat=tuple(error_stat), quantile=tuple(error_quantile), reference=reference, report=report,
        save_inputs=save_inputs, threads=threads))
    if as_json:
        _print_json(result.to_json())
    else:
        compare_table(console, result)
    result.raise_for_failures()


@cli.command("triton-repo")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The Triton model repository.")
@click.option("--name", help="Model name prefix [<model>_<precision>]; the models are NAME_trt and NAME_ort.")
@click.option("--version", "model_version", type=int, default=1, show_default=True, help="The model version directory.")
@click.option("--force", is_flag=True, help="Replace an existing version of these models.")
@click.option("--max-delay-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="The dynamic batcher's max_queue_delay (the in-process batcher's default).")
@click.option("--max-queue", type=click.IntRange(1), default=1024, show_default=True,
              help="Queue policy max_queue_size; past it Triton rejects, as the runtime refuses.")
@click.option("--timeout-ms", type=click.FloatRange(0, min_open=True), help="Queue policy default timeout (REJECT).")
@click.option("--cache", is_flag=True, help="Enable Triton's response cache for the models.")
def triton_repo(bundle, out, name, model_version, force, max_delay_ms, max_queue, timeout_ms, cache):
    """Write BUNDLE as Triton models (tensorrt_plan and onnxruntime_onnx) with config.pbtxt."""
    from engines.deploy.triton import write_repository  # noqa: PLC0415 - per command: --help stays fast
    from engines.runtime.batching import Batching  # noqa: PLC0415

    batching = Batching(max_delay_ms=max_delay_ms, max_queue=max_queue, timeout_ms=timeout_ms)
    for model in write_repository(bundle, out, name, model_version, force, batching, cache):
        console.print(f"wrote {out / model} (config.pbtxt, {model_version}/)")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--side", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True,
              help="Whose graph against the FP32 export (auto: the one that is not FP32, trt first).")
@click.option("--data", default="auto", show_default=True,
              help="auto (evaluation batches, else golden), golden, random, eval, or .npz/.npy files as compare takes.")
@click.option("--batches", type=click.IntRange(1), default=1, show_default=True, help="How many batches of the data.")
@click.option("--limit", type=click.IntRange(1), default=10, show_default=True, help="At most this many layers listed.")
@click.option("--int8-relerr", type=click.FloatRange(0, min_open=True), default=0.25, show_default=True,
              help="An INT8 tensor diverges past this max abs error relative to max|FP32|.")
@click.option("--bisect", is_flag=True, help="Keep groups of the suspected nodes in float to name the smallest set "
              "that brings the outputs within budget.")
@click.option("--budget", metavar="[OUTPUT:]METRIC[@STAT]=VALUE",
              help="--bisect: the budget the outputs must meet [the bundle's INT8 budget; relerr=0.02 for FP16].")
@_json_option
def debug(bundle, side, data, batches, limit, int8_relerr, bisect, budget, as_json):
    """Find the first layer where BUNDLE's FP16/INT8 graph diverges from the FP32 export; exit 4 when one does."""
    from engines.cli.present import debug_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.debug import DebugRequest  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.debug import debug as run_debug

    result = run_debug(DebugRequest(bundle, side, data, batches, limit, bisect, int8_relerr, budget))
    if as_json:
        _print_json(result.to_json())
    else:
        debug_table(console, result)
    if not result.ok:
        first = result.first[0]
        raise ComparisonFailed(f"{result.graph} diverges from the FP32 export first at {first.tensor} "
                               f"({first.node}, {first.op}, {first.module}): max abs error {first.max_abs:.3g} "
                               f"against a bound of {first.bound:.3g}")


@cli.command("check-trt")
@click.argument("source")
@click.option("--trt-version", default="11.1", show_default=True,
              help="Whose ONNX parser operator table to check against (engines/trt_build/compat/data).")
@_input_option
@click.option("--as-is", is_flag=True, help="Check an .onnx file unchanged instead of the trt pipeline's output for it.")
@_json_option
def check_trt(source, trt_version, inputs, as_is, as_json):
    """Predict on this CPU what TensorRT will refuse in SOURCE (a bundle, an .onnx file or a MODEL); exit 12 on any."""
    from engines.cli.actions import trt_graph  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import compat_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.trt_build.compat import check_model  # noqa: PLC0415 - per command: --help stays fast

    model, described = trt_graph(source, tuple(inputs), as_is)
    report = check_model(model, trt_version, described)
    if as_json:
        _print_json(report.to_json())
    else:
        compat_table(console, report)
    if not report.ok:
        first = report.refused[0]
        raise TensorRTRefusal(f"{report.summary()}; first: {first.node} ({first.op}): {first.message}. {first.hint}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Where to write the packed bundle.")
@click.option("--runtime-only", is_flag=True,
              help="Only what the runtime loads (ONNX Runtime graph, TensorRT plan): no exported graph, golden or "
                   "evaluation data, calibration or reports.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def pack(bundle, out, runtime_only, force):
    """Copy BUNDLE to OUT after verifying every artifact, with its own manifest (--runtime-only: for production)."""
    from engines.bundle.pack import pack as run_pack  # noqa: PLC0415 - per command: --help stays fast

    result = run_pack(bundle, out, runtime_only, force)
    left = f"; left out {', '.join(result.omitted)}" if result.omitted else ""
    console.print(f"wrote {out}: {len(result.manifest.artifacts)} artifact(s), {result.size / 2**20:.1f} MiB{left}")


@cli.command()
@_json_option
def zoo(as_json):
    """List the zoo models and their inputs."""
    from engines.cli.present import zoo_table  # noqa: PLC0415 - per command: --help stays fast
    from exporter.zoo import ENTRIES  # noqa: PLC0415 - per command: --help stays fast

    if as_json:
        _print_json([{"name": e.name, "task": e.task, "inputs": list(e.inputs), "outputs": list(e.outputs),
                      "description": e.description} for e in ENTRIES])
        return
    zoo_table(console, ENTRIES)


def _print_json(doc) -> None:
    """One JSON document on stdout (logs and progress go to stderr)."""
    click.echo(json.dumps(doc, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    argv = _hoist_global_flags(list(argv if argv is not None else sys.argv[1:]))
    verbose = any(GLOBAL_FLAGS.get(a, ("", 0))[0] == "verbose" for a in argv)
    try:
        code = cli.main(args=argv, prog_name="planforge", standalone_mode=False)
        if isinstance(code, int) and code:  # --version and --help return through here
            return code
    except click.exceptions.Abort:
        err_console.print("interrupted: nothing was written")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing was written")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except PlanforgeError as exc:
        if verbose:
            logger.exception("error")
        err_console.print(_for_stderr(f"error: {exc}"), markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless -v
        if verbose:
            logger.exception("internal error")
        err_console.print(_for_stderr(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)"),
                          markup=False, highlight=False, soft_wrap=True)
        return 70
    finally:
        for name in OURS:  # an in-process caller's logging is left as it was
            logging.getLogger(name).setLevel(logging.NOTSET)
    return 0


def _for_stderr(text: str) -> str:
    """Colour codes only for a terminal: a log file or CI gets plain text."""
    return text if err_console.is_terminal else plain(text)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
