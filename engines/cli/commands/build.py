"""``planforge build``, ``export``, ``optimize`` and ``zoo``: from a MODEL to graphs and bundles."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from engines.cli.console import console, err_console, print_json
from engines.cli.options import (
    export_options,
    input_option,
    int8_options,
    json_option,
    pass_options,
    profile_options,
    trt_options,
)


@click.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Bundle directory [build/<model>[-<precision>]].")
@input_option
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True,
              help="fp16: the TensorRT graph in FP16 (the CPU fallback stays FP32); int8: both graphs with Q/DQ; "
                   "int4: a decoder's weights in 4 bits (8 where its --budget needs them).")
@click.option("--force", is_flag=True, help="Rebuild even if a bundle exists.")
@click.option("--prune", metavar="auto|RATIO", help="Remove MLP hidden units and conv channels before the passes, "
              "refitting what follows: RATIO of them, or auto: as many as --budget allows (judged on the --calib "
              "data's held-out batches, as INT8).")
@click.option("--sparsity", type=click.Choice(["2:4"]), help="Make the TensorRT graph's weights 2:4 sparse (2 of every "
              "4 input-channel weights zero) where --budget allows, and build with TensorRT's sparse kernels.")
@export_options
@pass_options
@int8_options
@profile_options
@click.option("--require-trt", is_flag=True, help="Fail (exit 8) instead of skipping TensorRT when it cannot build.")
@trt_options
def build(model, out, inputs, precision, force, prune, sparsity, export, passes, int8, shapes, require_trt, trt):
    """Export MODEL, run the passes and write a bundle."""
    from engines.build import BuildRequest, build as run_build  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import build_summary  # noqa: PLC0415 - per command: --help stays fast

    request = BuildRequest(model=model, out=out, inputs=tuple(inputs), precision=precision, force=force,
                           export=export, passes=passes, int8=int8, shapes=shapes, require_trt=require_trt, trt=trt,
                           prune=prune, sparsity=sparsity)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("build", total=None)
        result = run_build(request, on_stage=lambda stage: progress.update(task, description=stage))
    build_summary(console, result.out, result.manifest, result.reused, result.seconds)


@click.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Where to write the .onnx file.")
@input_option
@export_options
def export(model, out, inputs, export):
    """Export MODEL to ONNX and check parity with PyTorch (no passes, no bundle)."""
    from engines.cli.actions import export_model  # noqa: PLC0415 - per command: --help stays fast

    report = export_model(model, out, tuple(inputs), export)
    console.print(f"wrote {out} ({report})")


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Where to write the optimized graph.")
@click.option("--target", type=click.Choice(["trt", "ort"]), required=True,
              help="Whose pass pipeline: TensorRT's (standard ops) or ONNX Runtime's (its contrib fusions).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 converts the graph (the trt target's FP16 form).")
@input_option
@pass_options
@click.option("--feed", "feeds", multiple=True, metavar="[NAME=]FILE",
              help="Verify on these inputs instead of random data: NAME=FILE.npy, FILE.npz (arrays named after the "
                   "inputs), or FILE.npy alone for a single-input model (repeat).")
def optimize(source, out, target, precision, inputs, passes, feeds):
    """Run the pass pipeline for one target on an .onnx file."""
    from engines.cli.actions import optimize_model  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import optimize_summary  # noqa: PLC0415 - per command: --help stays fast

    records, worst = optimize_model(source, out, target, precision, tuple(inputs), passes, tuple(feeds))
    optimize_summary(console, out, records, worst)


@click.command()
@json_option
def zoo(as_json):
    """List the zoo models and their inputs."""
    from engines.cli.present import zoo_table  # noqa: PLC0415 - per command: --help stays fast
    from exporter.zoo import ENTRIES  # noqa: PLC0415 - per command: --help stays fast

    if as_json:
        print_json([{"name": e.name, "task": e.task, "inputs": list(e.inputs), "outputs": list(e.outputs),
                     "description": e.description} for e in ENTRIES])
        return
    zoo_table(console, ENTRIES)


COMMANDS = (build, export, optimize, zoo)
