"""``planforge bench-llm BUNDLE...``: decoder bundles against the tools people would otherwise pick, on the
same weights and token ids, each in its own process (and the peers in their own venvs).

Backends: every bundle (``planforge``, its precision), ``transformers`` eager FP32 on the Hugging Face
directory the bundle was built from (for a GGUF, the directory planforge wrote from it), each
``onnxruntime-genai`` model directory given (its builder's output, int4 and fp32), and ``llama.cpp`` on a
GGUF file (llama-cpp-python). One process per backend and batch (``llm_worker.py``), so peak RSS is that
backend's alone; the backends' order rotates per round (``rounds``) so drift in a shared machine's speed hits
all alike (docs/decisions/006-bench-interleaving.md); a row is the median over rounds.

Token ids: the prompts are slices of the held-out text (``engines.runtime.generate.perplexity``), BOS
first, ``prompt_tokens`` long, one per row of the batch; perplexity is scored on the first
``perplexity_tokens`` of the same text (the prompts come after them). Greedy, exactly ``new_tokens`` new
tokens. ``bench-llm.json`` holds the rows (backend, precision, batch, prompt_tokens, new_tokens, ttft_ms,
prompt_tok_per_s, decode_tok_per_s, p50_ms, p99_ms, peak_rss_mb, perplexity) and where they ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from engines.bundle import read_manifest
from engines.evaluate.bench.environment import LoadWatch, worker_failure
from engines.runtime.generate.perplexity import held_out_text, text_source
from engines.runtime.generate.text import Tokenizer
from foundation.errors import UsageError

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("llm_worker.py")
NUMBERS = ("ttft_ms", "prompt_tok_per_s", "decode_tok_per_s", "p50_ms", "p99_ms", "peak_rss_mb")


@dataclasses.dataclass(frozen=True)
class Peer:
    backend: str  # transformers | onnxruntime-genai | llama.cpp
    model: Path
    python: Path = Path(sys.executable)  # the peer's own venv


@dataclasses.dataclass(frozen=True)
class LlmBenchRequest:
    bundles: tuple[Path, ...]
    peers: tuple[Peer, ...] = ()
    batches: tuple[int, ...] = (1, 4)
    prompt_tokens: int = 128
    new_tokens: int = 128
    perplexity_tokens: int = 512
    threads: int = 2
    rounds: int = 1
    timeout_s: float = 1800.0


def token_ids(bundle: Path, request: LlmBenchRequest) -> tuple[list[list[int]], list[int]]:
    """(prompts, held-out ids) from the first bundle's tokenizer (module docstring)."""
    decoder = read_manifest(bundle).decoder
    ids = Tokenizer(bundle).encode(held_out_text())
    if decoder.bos is not None and ids[:1] == [decoder.bos]:
        ids = ids[1:]
    bos = [decoder.bos] if decoder.bos is not None else []
    body = request.prompt_tokens - len(bos)
    held_out = (bos + ids)[:request.perplexity_tokens]
    start = request.perplexity_tokens
    prompts = [bos + ids[start + k * body:start + (k + 1) * body] for k in range(max(request.batches))]
    if any(len(p) != request.prompt_tokens for p in prompts):
        raise UsageError(f"the held-out text gives too few tokens for {max(request.batches)} prompts of "
                         f"{request.prompt_tokens}")
    return prompts, held_out


def bench_llm(request: LlmBenchRequest, on_row=lambda row: None) -> dict:
    if not request.bundles:
        raise UsageError("bench-llm needs at least one decoder bundle")
    for bundle in request.bundles:
        manifest = read_manifest(bundle)
        if manifest.decoder is None:
            raise UsageError(f"{bundle} is not a decoder bundle: bench-llm measures language-model decoders")
    prompts, held_out = token_ids(request.bundles[0], request)
    runs = [("planforge", Path(b), Path(sys.executable)) for b in request.bundles]
    runs += [(p.backend, p.model, p.python) for p in request.peers]
    samples: dict[tuple, list[dict]] = {}
    with LoadWatch() as watch, tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        for round_ in range(request.rounds):
            order = runs[round_ % len(runs):] + runs[:round_ % len(runs)]
            for backend, model, python in order:
                for batch in request.batches:
                    doc = {"prompts": prompts[:batch], "batches": [batch], "new_tokens": request.new_tokens,
                           "threads": request.threads, "context": request.prompt_tokens + request.new_tokens,
                           "held_out": held_out if batch == request.batches[0] and round_ == 0 else None}
                    path = Path(tmp) / "request.json"
                    path.write_text(json.dumps(doc))
                    for row in _run(python, backend, model, path, request, batch):
                        row["model"] = str(model)
                        samples.setdefault((backend, str(model), batch), []).append(row)
                        on_row(row)
        environment = watch.environment()
    rows = [_median(group) for group in samples.values()]
    return {"request": {"bundles": [str(b) for b in request.bundles], "batches": list(request.batches),
                        "prompt_tokens": request.prompt_tokens, "new_tokens": request.new_tokens,
                        "threads": request.threads, "rounds": request.rounds,
                        "perplexity_text": text_source(), "perplexity_tokens": len(held_out)},
            "rows": rows, "environment": environment}


def _run(python: Path, backend: str, model: Path, request_path: Path, request: LlmBenchRequest,
         batch: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(request.threads), PYTHONWARNINGS="ignore")
    cmd = [str(python), str(WORKER), backend, str(model), str(request_path)]
    logger.info("bench-llm: %s %s", backend, model)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=request.timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return [{"backend": backend, "batch": batch, "skipped": f"timed out after {request.timeout_s:.0f} s"}]
    if done.returncode != 0:
        last = worker_failure(done)
        logger.warning("bench-llm: %s on %s failed: %s", backend, model, last)
        return [{"backend": backend, "batch": batch, "skipped": last}]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(group: list[dict]) -> dict:
    row = dict(group[0])
    for key in NUMBERS:
        values = [r[key] for r in group if r.get(key) is not None]
        if values:
            row[key] = statistics.median(values)
    row["rounds"] = len(group)
    return row


def plot(doc: dict, target) -> None:
    """Decode and prompt tokens/s per backend and batch, as PNG into ``target``."""
    import matplotlib  # noqa: PLC0415 - only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in doc["rows"] if "decode_tok_per_s" in r]
    labels = [f"{r['backend']} {r['precision']}\n{Path(r.get('model', '')).name}, batch {r['batch']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows)), 4.5))
    for ax, key, title in ((axes[0], "decode_tok_per_s", "decode tokens/s"),
                           (axes[1], "prompt_tok_per_s", "prompt tokens/s")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="#4c72b0")
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
    env = doc["environment"]
    fig.suptitle(f"bench-llm: prompt {doc['request']['prompt_tokens']}, {doc['request']['new_tokens']} new, "
                 f"{doc['request']['threads']} threads, ISA {env.get('isa')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=110)
    plt.close(fig)
