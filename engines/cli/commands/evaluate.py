"""``planforge inspect``, ``compare``, ``debug`` and ``check-trt``: what a bundle holds and how well it holds up."""

from __future__ import annotations

from pathlib import Path

import click

from engines.cli.console import console, print_json
from engines.cli.options import input_option, json_option
from foundation.errors import ComparisonFailed, TensorRTRefusal, UsageError


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layers", is_flag=True, help="Per node of each graph: the precision it computes in and the PyTorch "
              "module it came from (and TensorRT's layers when the bundle has an engine).")
@json_option
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
        print_json(doc) if as_json else layers_table(console, doc)
        return
    if as_json:
        print_json(describe_path(path))
        return
    inspect_path(console, path)


@click.command()
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
@click.option(
    "--save-inputs",
    type=click.Path(path_type=Path),
    help="Save the inputs as Polygraphy JSON and print polygraphy run lines that repeat the checks on them.",
)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for PyTorch and ONNX Runtime (0: all cores).")
@json_option
def compare(bundle, data, iterations, point, seed, atol, rtol, error_stat, error_quantile, reference, report,
            save_inputs, threads, as_json):
    """Compare every artifact of BUNDLE with its reference (Polygraphy); exit 4 when one fails."""
    from engines.cli.present import compare_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.compare import (  # noqa: PLC0415 - per command: --help stays fast
        CompareRequest,
        compare as run_compare,
    )

    result = run_compare(CompareRequest(
        bundle=bundle, data=data, iterations=iterations, point=point, seed=seed, atol=tuple(atol), rtol=tuple(rtol),
        error_stat=tuple(error_stat), quantile=tuple(error_quantile), reference=reference, report=report,
        save_inputs=save_inputs, threads=threads))
    if as_json:
        print_json(result.to_json())
    else:
        compare_table(console, result)
    result.raise_for_failures()


@click.command()
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
@json_option
def debug(bundle, side, data, batches, limit, int8_relerr, bisect, budget, as_json):
    """Find the first layer where BUNDLE's FP16/INT8 graph diverges from the FP32 export; exit 4 when one does."""
    from engines.cli.present import debug_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.evaluate.debug import DebugRequest, debug as run_debug  # noqa: PLC0415 - per command: --help stays fast

    result = run_debug(DebugRequest(bundle, side, data, batches, limit, bisect, int8_relerr, budget))
    if as_json:
        print_json(result.to_json())
    else:
        debug_table(console, result)
    if not result.ok:
        first = result.first[0]
        raise ComparisonFailed(f"{result.graph} diverges from the FP32 export first at {first.tensor} "
                               f"({first.node}, {first.op}, {first.module}): max abs error {first.max_abs:.3g} "
                               f"against a bound of {first.bound:.3g}")


@click.command("check-trt")
@click.argument("source")
@click.option("--trt-version", default="11.1", show_default=True,
              help="Whose ONNX parser operator table to check against (engines/trt_build/compat/data).")
@input_option
@click.option(
    "--as-is", is_flag=True, help="Check an .onnx file unchanged instead of the trt pipeline's output for it."
)
@json_option
def check_trt(source, trt_version, inputs, as_is, as_json):
    """Predict on this CPU what TensorRT will refuse in SOURCE (a bundle, an .onnx file or a MODEL); exit 12 on any."""
    from engines.cli.actions import trt_graph  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import compat_table  # noqa: PLC0415 - per command: --help stays fast
    from engines.trt_build.compat import check_model  # noqa: PLC0415 - per command: --help stays fast

    model, described = trt_graph(source, tuple(inputs), as_is)
    report = check_model(model, trt_version, described)
    if as_json:
        print_json(report.to_json())
    else:
        compat_table(console, report)
    if not report.ok:
        first = report.refused[0]
        raise TensorRTRefusal(f"{report.summary()}; first: {first.node} ({first.op}): {first.message}. {first.hint}")


COMMANDS = (inspect, compare, debug, check_trt)
