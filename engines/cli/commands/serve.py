"""``planforge serve BUNDLE...``: the HTTP server (``engines.serve``) over one or more bundles."""

from __future__ import annotations

import click

from engines.cli.console import err_console


@click.command()
@click.argument("bundles", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface; "
              "only behind a firewall or with --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--api-key", envvar="PLANFORGE_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but "
              "the health probes [env PLANFORGE_API_KEY].")
@click.option("--max-sequences", type=click.IntRange(1), default=8, show_default=True,
              help="Decoders: sequences generated at once (KV slots).")
@click.option("--max-length", type=click.IntRange(2), help="Decoders: prompt plus new tokens per sequence "
              "[the bundle's].")
@click.option("--kv-mb", type=click.IntRange(1), help="Decoders: memory budget for the KV slots, in MiB.")
@click.option("--prefill-chunk", type=click.IntRange(1), default=256, show_default=True,
              help="Decoders: prompt tokens computed between two decode steps.")
@click.option("--prefix-cache-mb", type=click.IntRange(0), default=256, show_default=True,
              help="Decoders: prefix cache size in MiB (0: off).")
@click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
              help="Requests waiting beyond this are refused with 429.")
@click.option("--timeout-ms", type=click.FloatRange(0, min_open=True), help="A request still waiting after this is "
              "refused with 504.")
@click.option("--max-delay-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Other models: how long a forming batch may wait for more requests under load.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=64, show_default=True,
              help="Largest request body accepted (413 above).")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads per model [all cores].")
@click.option("--drain-timeout", type=click.FloatRange(0), default=120.0, show_default=True,
              help="Seconds SIGTERM waits for in-flight requests.")
def serve(bundles, host, port, api_key, max_sequences, max_length, kv_mb, prefill_chunk, prefix_cache_mb, max_queue,
          timeout_ms, max_delay_ms, max_body_mb, threads, drain_timeout):
    """Serve BUNDLEs over HTTP: decoders as OpenAI's /v1 (completions, chat, streaming), the rest as the Open
    Inference Protocol /v2 (KServe, Triton's clients); /metrics for Prometheus. A BUNDLE may be NAME=PATH."""
    from engines.runtime import Batching, ContinuousBatching  # noqa: PLC0415 - per command: --help stays fast
    from foundation.errors import UsageError  # noqa: PLC0415

    try:
        from engines.serve.app import create_app  # noqa: PLC0415
        from engines.serve.models import open_models  # noqa: PLC0415
        from engines.serve.run import run  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(f"planforge serve needs the serve extra ({exc.name} is missing): pip install "
                         "'planforge[serve]'") from exc
    generation = ContinuousBatching(max_sequences=max_sequences, max_length=max_length,
                                    kv_bytes=kv_mb << 20 if kv_mb else None, prefill_chunk=prefill_chunk,
                                    max_queue=max_queue, timeout_ms=timeout_ms,
                                    prefix_cache_bytes=prefix_cache_mb << 20)
    batching = Batching(max_delay_ms=max_delay_ms, max_queue=max_queue, timeout_ms=timeout_ms)
    models = open_models(list(bundles), generation, batching, threads)
    app = create_app(models, api_key, int(max_body_mb * (1 << 20)))
    names = ", ".join(f"{m.name} ({'/v1' if m.decoder else '/v2'})" for m in models.values())
    err_console.print(f"serving {names} on http://{host}:{port}" + (" (API key required)" if api_key else ""))
    try:
        run(app, host, port, drain_timeout)
    finally:
        for model in models.values():
            model.close(drain=False)
    err_console.print("stopped")


COMMANDS = [serve]
