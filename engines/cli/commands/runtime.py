"""``planforge run``: one inference on a bundle through the production runtime."""

from __future__ import annotations

from pathlib import Path

import click

from engines.cli.console import console, print_json
from engines.cli.options import json_option


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--feed", "inputs", multiple=True, metavar="[NAME=]FILE",
              help="Inputs from files: NAME=FILE.npy, FILE.npz (arrays named after the inputs), or FILE.npy alone "
                   "for a single-input model (repeat). (--input is the input spec everywhere else.)")
@click.option("--random", "random_point", type=click.Choice(["min", "opt", "max"]),
              help="Feed seeded random inputs at this shape point instead of files.")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort-cuda", "ort-cpu"]), default="auto", show_default=True,
              help="auto: TensorRT, then ONNX Runtime CUDA, then CPU, the first this machine can run.")
@click.option("--save-outputs", type=click.Path(path_type=Path), help="Write the outputs to this .npz file.")
@json_option
def run(bundle, inputs, random_point, backend, save_outputs, as_json):
    """Run one inference on BUNDLE and print output summaries."""
    from engines.cli.actions import run_bundle, summarize_outputs  # noqa: PLC0415 - per command: --help stays fast
    from engines.cli.present import output_summary  # noqa: PLC0415 - per command: --help stays fast

    used, outputs = run_bundle(bundle, inputs, random_point, backend, save_outputs)
    if as_json:
        print_json({"backend": used, "outputs": summarize_outputs(outputs),
                     "saved": str(save_outputs) if save_outputs else None})
        return
    output_summary(console, used, outputs)
    if save_outputs:
        console.print(f"wrote {save_outputs}")


COMMANDS = (run,)
