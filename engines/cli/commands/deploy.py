"""``planforge triton-repo`` and ``pack``: bundles out to where they are served."""

from __future__ import annotations

from pathlib import Path

import click

from engines.cli.console import console


@click.command("triton-repo")
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


@click.command()
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


COMMANDS = (triton_repo, pack)
