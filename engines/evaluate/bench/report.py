"""What ``planforge bench`` writes: ``bench.json``, ``bench.png`` and the zoo summary (Markdown).

The plot has two panels sharing the batch axis: p50 latency (a bar to p90) and throughput, one
line per backend. matplotlib runs with the Agg backend (no display) and is imported only here.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from engines.bundle import read_manifest, update_report, write_atomic
from foundation.errors import BundleError, UsageError

logger = logging.getLogger(__name__)


def write_results(doc: dict, out: Path, name: str = "bench", draw=None) -> tuple[Path, Path]:
    """``out/<name>.json`` and ``out/<name>.png`` (drawn by ``draw``, default ``plot``), each written to a
    temporary name and renamed."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    write_atomic(json_path, (json.dumps(doc, indent=2) + "\n").encode())
    png = io.BytesIO()
    (draw or plot)(doc, png)
    write_atomic(png_path, png.getvalue())
    return json_path, png_path


def plot(doc: dict, target) -> None:
    """Draw the two panels as PNG into ``target`` (a path or a binary file object)."""
    import matplotlib  # noqa: PLC0415 - matplotlib is heavy; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - matplotlib is heavy; only the plot needs it

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend in doc["backends"]:
        batches = [p["batch"] for p in backend["points"]]
        p50 = [p["p50_ms"] for p in backend["points"]]
        p90 = [p["p90_ms"] - p["p50_ms"] for p in backend["points"]]
        lat.errorbar(batches, p50, yerr=[[0] * len(p50), p90], marker="o", capsize=3, label=backend["name"])
        thr.plot(batches, [p["throughput"] for p in backend["points"]], marker="o", label=backend["name"])
    env = doc["environment"]
    title = f"{doc['model']}: {doc['threads']} thread(s), {env.get('cpu_model') or env.get('machine')} " \
            f"({env.get('cpu_isa', '?')})"
    lat.set(title=f"{title}\nlatency p50 (bar to p90)", xlabel=_batch_label(doc),
            ylabel="ms", xscale="log", yscale="log")
    thr.set(title="throughput", xlabel=_batch_label(doc), ylabel="samples/s",
            xscale="log", yscale="log")
    for ax in (lat, thr):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(doc["batches"], [str(b) for b in doc["batches"]])
    thr.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=100)
    plt.close(fig)


def summary_markdown(docs: list[dict]) -> str:
    """One table for the README: per model, the largest batch, every backend against PyTorch eager."""
    lines = ["| model | batch | backend | p50 ms | p99 ms | samples/s | vs eager | peak MiB | build s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for doc in docs:
        for backend in doc["backends"]:
            point = max(backend["points"], key=lambda p: p["batch"])
            lines.append(
                f"| {doc['model']} | {point['batch']} | {backend['name']} | {point['p50_ms']:.2f} | "
                f"{point['p99_ms']:.2f} | {point['throughput']:.0f} | "
                f"{_ratio(point['speedup'])} | {_opt(backend['peak_memory_mib'], '.0f')} | "
                f"{_opt(backend['build_seconds'], '.1f')} |")
    lines.append("")
    for where in dict.fromkeys(_where(doc) for doc in docs):
        lines.append(where)
    loads = [doc["environment"].get("load_1min") or {} for doc in docs]
    values = [v for load in loads for v in (load.get("start"), load.get("end")) if v is not None]
    lines.append(f"{docs[0]['iterations'] if docs else '?'} timed runs per point after warm-up"
                 + (f"; 1-minute load average {min(values):.2f}..{max(values):.2f} during the runs" if values else "")
                 + ". 'vs eager' is PyTorch eager p50 / backend p50.")
    return "\n".join(lines) + "\n"


def _where(doc: dict) -> str:
    env = doc["environment"]
    return (f"{env.get('cpus')} CPU(s) {env.get('cpu_model') or env.get('machine')}, ISA class "
            f"{env.get('cpu_isa', 'unrecorded')}, ONNX Runtime {env.get('onnxruntime')}, {doc['threads']} thread(s).")


def check_comparable(docs: list[dict], allow_mixed: bool = False) -> None:
    """Refuse to put runs with different thread counts or CPU ISA classes in one table unless told."""

    kinds = {(doc["threads"], doc["environment"].get("cpu_isa")) for doc in docs}
    if len(kinds) > 1 and not allow_mixed:
        found = ", ".join(f"{t} thread(s) on {isa or 'an unrecorded ISA class'}" for t, isa in sorted(kinds, key=str))
        raise UsageError(f"these bench.json files ran with different thread counts or CPU ISA classes ({found}); "
                         "their timings do not compare. Rerun them alike, or pass --allow-mixed")
    for doc in docs:
        if doc["environment"].get("loaded"):
            logger.warning("%s (%s) ran on a loaded machine (1-minute load average %s); its timings are suspect",
                           doc["model"], ", ".join(doc.get("bundles", [])), doc["environment"].get("load_1min"))


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _opt(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def load_results(paths) -> list[dict]:
    """bench.json documents, refusing files that are not one."""

    docs = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable bench.json ({exc})") from None
        if not isinstance(doc, dict) or doc.get("kind") != "bench":
            raise UsageError(f"{path}: not a bench.json written by 'planforge bench BUNDLE'")
        docs.append(doc)
    return docs


def _batch_label(doc: dict) -> str:
    dim = doc["batch_dim"]
    return "batch size" if dim in (None, "batch") else f"batch size ({dim})"


def record_in_bundles(doc: dict, json_path: Path) -> list[Path]:
    """Each benchmarked bundle's ``report.json`` gains a ``bench`` section: its own backends and the
    references (PyTorch eager, ONNX Runtime on the exported graph), re-hashed into its manifest."""

    written = []
    for bundle in map(Path, doc["bundles"]):
        own = f"planforge {read_manifest(bundle).precision} "
        rows = [b for b in doc["backends"] if b["name"].startswith(own)
                or b["name"] in ("pytorch eager", "onnxruntime exported")]
        section = {"results": str(json_path), "batches": doc["batches"], "threads": doc["threads"],
                   "iterations": doc["iterations"], "environment": doc["environment"], "backends": rows}
        try:
            written.append(update_report(bundle, "bench", section))
        except BundleError as exc:
            logger.warning("bench results not recorded in %s: %s", bundle, exc)
    return written


def save(doc: dict, request) -> tuple[Path, Path, list[Path]]:
    """bench.json and bench.png in ``request.out`` (default: ``bench/<model>`` beside the first bundle),
    and the bench section of each bundle's report.json."""
    out = request.out or Path(request.bundles[0]).parent / "bench" / doc["model"]
    json_path, png_path = write_results(doc, out)
    return json_path, png_path, record_in_bundles(doc, json_path)
