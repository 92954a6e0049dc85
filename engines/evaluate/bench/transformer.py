"""``planforge bench-transformer BUNDLE [INT8_BUNDLE]``: a transformer encoder against its anchors, on real text.

Rows, on the same inputs and thread count, in one interleaved run:

- ``pytorch eager``: the model the bundle was built from;
- ``onnxruntime exported``: the plain export under ONNX Runtime with its default session options;
- ``onnxruntime transformers optimizer (bert)``: the export after ONNX Runtime's own
  ``onnxruntime.transformers.optimizer`` (the anchor), default session options;
- ``planforge fp32 ort`` (and ``planforge int8 ort`` with an INT8 bundle): the bundle's ``ort`` graph as
  ``engines.runtime.load`` runs it;
- ``planforge fp32 ort, padding trimmed``: the same through the serving layer (``Batching``), which cuts
  the positions every row's attention mask zeroes before running (outputs padded back with zeros).

Inputs: English sentences (``engines.evaluate.text``) tokenized with the model directory's own tokenizer
and padded to the point's sequence length (``padding="max_length"``, truncated beyond it), as a client
that pads to a fixed length sends them: at 128 most of each row is padding. Points: every batch x
sequence pair asked (default 1 and 8 x 32 and 128). Interleaved: ``rounds`` rounds; in each, every
backend runs, after a 0.1 s pause and one untimed call, ``iterations`` timed calls at every point, the
backends' order rotating per round, so that drift in a shared machine's speed hits all alike
(docs/decisions/006-bench-interleaving.md). Per backend and point: the median ms and the ratios
against the plain export and against the optimizer's output (above 1: faster).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from engines.bundle import read_manifest, verified_path
from engines.evaluate.bench.bundles import (
    Backend,
    ort_backend,
    runtime_backend,
    source_module,
    torch_backend,
    transformers_optimizer_backend,
)
from engines.evaluate.bench.environment import LoadWatch
from engines.evaluate.text import sentences
from engines.runtime import Batching
from foundation.errors import UsageError

logger = logging.getLogger(__name__)

EXPORT = "onnxruntime exported"
OPTIMIZER = "onnxruntime transformers optimizer (bert)"
TRIMMED = "planforge fp32 ort, padding trimmed"
SETTLE_S = 0.1


@dataclasses.dataclass(frozen=True)
class TransformerBenchRequest:
    bundle: Path
    int8_bundle: Path | None = None
    batches: tuple[int, ...] = (1, 8)
    seqs: tuple[int, ...] = (32, 128)
    rounds: int = 5
    iterations: int = 4
    threads: int = 2
    cache_dir: Path = Path("build/cache")


def text_feeds(bundle: Path, batches, seqs) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Tokenized sentences per (batch, seq), padded to seq; a UsageError unless the bundle is a Hugging
    Face text model with a tokenizer and input_ids / attention_mask inputs."""
    from exporter.hf import load_tokenizer  # noqa: PLC0415 - imports transformers

    manifest = read_manifest(bundle)
    names = manifest.inputs.names
    if manifest.model.kind != "hf" or "input_ids" not in names:
        raise UsageError(f"{bundle}: bench-transformer needs a bundle built from a Hugging Face text model "
                         f"directory (input_ids, attention_mask); this one is {manifest.model.kind} with inputs "
                         f"{', '.join(names)}. Use planforge bench for other models")
    source = Path(manifest.model.source)
    if not source.is_dir() and manifest.model.relative:
        source = bundle / manifest.model.relative
    tokenizer = load_tokenizer(source)
    texts = sentences()
    feeds = {}
    for b in batches:
        chosen = [texts[(2 * k + 1) * len(texts) // (2 * b)] for k in range(b)]  # spread over the set
        for s in seqs:
            encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=s, return_tensors="np")
            feeds[(b, s)] = {n: encoded[n].astype(np.int64) for n in names}
    return feeds


def backends(request: TransformerBenchRequest, tmp: Path, skipped: dict) -> list[Backend]:
    manifest = read_manifest(request.bundle)
    out = []
    module = source_module(manifest, request.cache_dir, skipped, request.bundle)
    if module is not None:
        out.append(torch_backend(module, manifest.inputs, request.threads))
    exported = verified_path(request.bundle, manifest, "model.onnx")
    out.append(ort_backend(EXPORT, "fp32", exported, request.threads, manifest.export.seconds))
    optimized = transformers_optimizer_backend(exported, request.threads, tmp, skipped)
    if optimized is not None:
        out.append(optimized)
    out.append(runtime_backend("planforge fp32 ort", "fp32", request.bundle, "ort-cpu", request.threads, None))
    if request.int8_bundle is not None:
        out.append(runtime_backend("planforge int8 ort", "int8", request.int8_bundle, "ort-cpu", request.threads, None))
    out.append(runtime_backend(TRIMMED, "fp32", request.bundle, "ort-cpu", request.threads, None,
                               batching=Batching(trim_padding=True)))
    return out


def bench_transformer(request: TransformerBenchRequest) -> dict:
    """Run the benchmark (module docstring); the results document."""
    feeds = text_feeds(request.bundle, request.batches, request.seqs)
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="planforge-bench-tf-") as tmp, LoadWatch() as watch:
        runs = backends(request, Path(tmp), skipped)
        loaded = [(b, b.load()) for b in runs]
        try:
            times = _interleaved(loaded, feeds, request)
        finally:
            for b, _ in loaded:
                b.close()
    rows = []
    for (b, _) in loaded:
        for point, data in feeds.items():
            median = statistics.median(times[(b.name, point)])
            rows.append({"backend": b.name, "precision": b.precision, "batch": point[0], "seq": point[1],
                         "median_ms": round(median, 3),
                         "padding": round(1 - float(data["attention_mask"].mean()), 3)})
    _ratios(rows)
    return {"kind": "bench-transformer", "schema": 1, "model": read_manifest(request.bundle).model.name,
            "bundles": [str(p) for p in (request.bundle, request.int8_bundle) if p], "threads": request.threads,
            "rounds": request.rounds, "iterations": request.iterations, "environment": watch.environment(),
            "skipped": skipped, "rows": rows, "targets": targets(rows)}


def _interleaved(loaded, feeds, request: TransformerBenchRequest) -> dict:
    times: dict = {(b.name, p): [] for b, _ in loaded for p in feeds}
    for _, run in loaded:  # warm-up: every backend once per point
        for data in feeds.values():
            run(data)
    for r in range(request.rounds):
        order = loaded[r % len(loaded):] + loaded[:r % len(loaded)]
        for point, data in feeds.items():
            for b, run in order:
                time.sleep(SETTLE_S)  # let the previous backend's thread pool stop spinning
                run(data)
                for _ in range(request.iterations):
                    start = time.perf_counter()
                    run(data)
                    times[(b.name, point)].append((time.perf_counter() - start) * 1000)
        logger.info("round %d of %d done", r + 1, request.rounds)
    return times


def _ratios(rows: list[dict]) -> None:
    by = {(r["backend"], r["batch"], r["seq"]): r["median_ms"] for r in rows}
    for row in rows:
        for key, anchor in (("vs_export", EXPORT), ("vs_optimizer", OPTIMIZER)):
            base = by.get((anchor, row["batch"], row["seq"]))
            row[key] = round(base / row["median_ms"], 3) if base else None


def targets(rows: list[dict]) -> dict:
    """The issue's targets, at the largest point measured (batch 8 x 128 by default): planforge FP32 at
    least 1.15x the plain export and 1.10x the optimizer's output; INT8 faster than FP32."""
    point = max(((r["batch"], r["seq"]) for r in rows), key=lambda p: (p[0] * p[1], p))
    at = f"at {point[0]} x {point[1]}"

    def ms(name):
        return next((r["median_ms"] for r in rows if r["backend"] == name and (r["batch"], r["seq"]) == point), None)

    fp32, int8 = ms("planforge fp32 ort"), ms("planforge int8 ort")
    found = {}
    if fp32 and ms(EXPORT):
        found[f"fp32 vs export {at} (>= 1.15)"] = round(ms(EXPORT) / fp32, 3)
    if fp32 and ms(OPTIMIZER):
        found[f"fp32 vs optimizer {at} (>= 1.10)"] = round(ms(OPTIMIZER) / fp32, 3)
    if fp32 and int8:
        found[f"int8 vs fp32 {at} (> 1)"] = round(fp32 / int8, 3)
    return found


def markdown(doc: dict) -> str:
    """The README table: one row per backend, one column per point (median ms, and x the export)."""
    env = doc["environment"]
    points = sorted({(r["batch"], r["seq"]) for r in doc["rows"]})
    head = "| backend | " + " | ".join(f"{b} x {s}" for b, s in points) + " |"
    lines = [f"{doc['model']}: {env.get('cpu_model')} ({env.get('cpu_isa')}), {doc['threads']} thread(s), "
             f"{doc['rounds']} interleaved rounds x {doc['iterations']} runs; median ms (x the plain export). "
             "Padding per point: " + ", ".join(
                 f"{b} x {s}: {next(r['padding'] for r in doc['rows'] if (r['batch'], r['seq']) == (b, s)):.0%}"
                 for b, s in points), "", head, "|---|" + "---:|" * len(points)]
    for name in dict.fromkeys(r["backend"] for r in doc["rows"]):
        cells = []
        for point in points:
            row = next(r for r in doc["rows"] if r["backend"] == name and (r["batch"], r["seq"]) == point)
            ratio = f" ({row['vs_export']:.2f}x)" if row.get("vs_export") else ""
            cells.append(f"{row['median_ms']:.2f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save(doc: dict, out: Path) -> tuple[Path, Path]:
    """``out/bench-transformer.json`` and ``.md``, each written to a temporary name and renamed."""
    import json  # noqa: PLC0415

    from foundation.files import write_atomic  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench-transformer.json", out / "bench-transformer.md"
    write_atomic(json_path, (json.dumps(doc, indent=2) + "\n").encode())
    write_atomic(md_path, markdown(doc).encode())
    return json_path, md_path
