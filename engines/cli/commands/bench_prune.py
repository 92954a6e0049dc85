"""``planforge bench-prune BUNDLE...``: planforge's pruning against Torch-Pruning and NNCF, same units and data."""

from __future__ import annotations

from pathlib import Path

import click

from engines.cli.console import console, print_json
from engines.cli.options import json_option

COLUMNS = ("model", "method", "ratio", "params", "zero_params", "latency_ms", "speedup", "metric", "passed")


def _ratios(ctx, param, values):
    out = []
    for value in values:
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not 0 < ratio < 1:
            raise click.BadParameter(f"expected a ratio of units above 0 and below 1 (e.g. 0.3); found {value}")
        out.append(ratio)
    return tuple(out)


@click.command("bench-prune")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--ratio", "ratios", multiple=True, callback=_ratios, metavar="R",
              help="A ratio of units to prune with every method, besides each bundle's own (repeat).")
@click.option("--method", "methods", multiple=True, type=click.Choice(["planforge", "torch-pruning", "nncf"]),
              help="Methods to run [all].")
@click.option("--peers-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Where torch-pruning and nncf are installed (PYTHONPATH of their process; make bench-prune "
                   "uses build/peers/prune).")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="ONNX Runtime CPU threads.")
@click.option("--runs", type=click.IntRange(1), default=10, show_default=True, help="Timed runs per round.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("build/bench-prune"), show_default=True,
              help="Directory for bench-prune.json and bench-prune.png.")
@json_option
def bench_prune(bundles, ratios, methods, peers_path, threads, runs, out, as_json):
    """Prune the models of BUNDLES (built with --prune) with planforge, Torch-Pruning and NNCF at the same ratios
    of the same units; the budget's metric on the held-out batches, parameters, ONNX Runtime CPU latency."""
    from engines.evaluate.bench.prune import METHODS, PruneBenchRequest, bench_prune, plot  # noqa: PLC0415
    from engines.evaluate.bench.report import write_results  # noqa: PLC0415

    request = PruneBenchRequest(tuple(bundles), ratios, tuple(methods) or METHODS, peers_path, threads, runs)
    doc = bench_prune(request, on_row=lambda row: None if as_json else console.print(
        f"  {row['model']} {row['method']} {row['ratio']}: "
        + (f"metric {row['metric']}, {row.get('speedup', 0):.2f}x" if "metric" in row else row.get("skipped", ""))))
    json_path, png_path = write_results(doc, out, "bench-prune", plot)
    if as_json:
        print_json(doc["rows"])
        return
    from engines.cli.present import rows_table  # noqa: PLC0415 - per command: --help stays fast

    rows_table(console, doc["rows"], COLUMNS, (json_path, png_path))


COMMANDS = (bench_prune,)
