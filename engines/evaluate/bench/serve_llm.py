"""``planforge bench-serve DECODER_BUNDLE``: generation under load, after vLLM's ``benchmark_serving``.

The workload: ``requests`` per level, arriving open loop (Poisson) at ``concurrency`` x the rate one stream
sustains (one over a lone request's latency, measured first), with at most ``concurrency`` in flight: the
level's number of concurrent streams. A request arriving while all streams are busy waits for one, as in
vLLM's ``benchmark_serving`` with ``--max-concurrency``, and its times count from when it is sent (the
server's queueing counts, the load generator's backlog does not). Prompt and output
lengths are uniform in ``n * (1 +- spread)`` around ``prompt_tokens`` and ``new_tokens``; prompts are windows
of the held-out English text the decoder budget uses (``pydoc_data.topics``), after the BOS token, the same
for every mode; ``shared_prefix`` N puts the text's first N tokens on every prompt. Outputs run to their
drawn length (``ignore_eos``).

Rows (``mode`` x ``transport``), each at every level, interleaved so the machine's drift hits them alike:

- ``continuous``: the ``GenerationServer`` (continuous batching, prefix cache) in this process
  (``in-process``), and ``planforge serve`` in a subprocess on a loopback port, streamed over OpenAI's
  ``/v1/completions`` (``http``);
- ``one-at-a-time``: the same server with one slot: each request generated alone, in arrival order;
- ``llama.cpp-server``: llama.cpp's own ``llama-server`` (continuous batching, ``-np`` slots = the largest
  level, the same GGUF file), under the same client and workload (``http``).

Per row: time to first token and time per output token (p50, p99), aggregate generated tokens/s (all tokens
over the time from the first arrival to the last token), requests refused, and, with a shared prefix, the
time to first token of prefix-cache hits and misses. The machine (CPU model, ISA class, threads, load) is
recorded with the results; JSON and a plot.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from engines.bundle import read_manifest
from engines.evaluate.bench.environment import LoadWatch
from engines.evaluate.bench.remote import free_port, start_planforge, stop, wait_ready
from engines.evaluate.bench.report import write_results
from engines.runtime import ContinuousBatching, load
from engines.runtime.generate.perplexity import held_out_text
from engines.runtime.generate.text import Tokenizer
from foundation.errors import Overloaded, UsageError

logger = logging.getLogger(__name__)

MODES = ("continuous", "one-at-a-time", "llama.cpp-server")


@dataclasses.dataclass(frozen=True)
class LlmServeBenchRequest:
    bundle: Path
    concurrency: tuple[int, ...] = (1, 4, 8)
    requests: int | None = None  # per level; default max(8, 3 x concurrency)
    prompt_tokens: int = 128
    new_tokens: int = 128
    spread: float = 0.5
    shared_prefix: int = 0
    transports: tuple[str, ...] = ("in-process", "http")
    one_at_a_time: bool = True
    threads: int | None = None
    llama_server: Path | None = None
    gguf: Path | None = None
    seed: int = 0
    out: Path | None = None


def check_request(request: LlmServeBenchRequest) -> None:
    manifest = read_manifest(request.bundle)
    if manifest.decoder is None:
        raise UsageError(f"{request.bundle} is not a decoder bundle")
    if not 0 <= request.spread < 1:
        raise UsageError(f"--spread {request.spread}: expected 0 <= spread < 1")
    if (request.llama_server is None) != (request.gguf is None):
        raise UsageError("--llama-server and --gguf go together: the peer serves the same GGUF file")
    for path in (request.llama_server, request.gguf):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path} does not exist")
    longest = request.shared_prefix + 1 + _high(request.prompt_tokens, request.spread) + \
        _high(request.new_tokens, request.spread)
    if longest > manifest.decoder.max_length:
        raise UsageError(f"the longest request ({longest} tokens) is longer than the bundle's max length "
                         f"{manifest.decoder.max_length}: shorten the lengths or rebuild with a larger --max-length")


def _high(n: int, spread: float) -> int:
    return int(round(n * (1 + spread)))


@dataclasses.dataclass(frozen=True)
class _Job:
    arrival: float  # seconds after the level's start
    prompt: list[int]
    new: int


@dataclasses.dataclass
class _Result:
    ttft: float | None = None  # seconds from the send
    tpot: float | None = None
    tokens: int = 0
    end: float = 0.0
    cached: int = 0
    status: int = 200


def workload(request: LlmServeBenchRequest, concurrency: int, rate: float, ids: list[int], bos: int) -> list[_Job]:
    """The level's requests (module docstring): the same draws for every mode at this level."""
    rng = np.random.default_rng(request.seed + concurrency)
    count = request.requests or max(8, 3 * concurrency)
    prefix = ids[:request.shared_prefix]
    body = ids[request.shared_prefix:]
    jobs, clock = [], 0.0
    for _ in range(count):
        p = int(rng.integers(_low(request.prompt_tokens, request.spread), _high(request.prompt_tokens,
                                                                                  request.spread) + 1))
        n = int(rng.integers(_low(request.new_tokens, request.spread), _high(request.new_tokens, request.spread) + 1))
        start = int(rng.integers(0, len(body) - p))
        jobs.append(_Job(clock, [bos, *prefix, *body[start:start + p]], n))
        clock += float(rng.exponential(1.0 / rate))
    return jobs


def _low(n: int, spread: float) -> int:
    return max(1, int(round(n * (1 - spread))))


def bench_serve_llm(request: LlmServeBenchRequest, on_step=lambda s: None) -> dict:
    bundle = Path(request.bundle)
    manifest = read_manifest(bundle)
    info = manifest.decoder
    ids = Tokenizer(bundle).encode(held_out_text(), special=False)
    longest = request.shared_prefix + 1 + _high(request.prompt_tokens, request.spread) + \
        _high(request.new_tokens, request.spread)
    slots = max(request.concurrency)
    options = ContinuousBatching(max_sequences=slots, max_length=longest, max_queue=4096)
    rows = []
    with LoadWatch() as watch, _Targets(bundle, request, options, longest) as targets:
        lone = targets.lone_latency(ids, info.bos)
        for c in request.concurrency:
            rate = c / lone
            jobs = workload(request, c, rate, ids, info.bos)
            for mode, transport, run in targets.each():
                on_step(f"{mode} ({transport}) x{c}")
                rows.append(_row(mode, transport, c, rate, run(jobs, c)))
            if request.shared_prefix and c == request.concurrency[0]:
                on_step(f"continuous without prefix cache x{c}")
                rows.append(dict(_row("continuous", "in-process", c, rate, targets.no_prefix(jobs, c)),
                                 prefix_cache=False))
    doc = {"model": manifest.model.name, "bundle": str(bundle), "precision": manifest.precision,
           "threads": request.threads or watch.cpu.cores, "prompt_tokens": request.prompt_tokens,
           "new_tokens": request.new_tokens, "spread": request.spread, "shared_prefix": request.shared_prefix,
           "slots": slots, "lone_latency_s": lone, "peer": targets.peer_label, "rows": rows,
           "environment": watch.environment()}
    doc["targets"] = targets_met(doc)
    if request.out is not None:
        write_results(doc, Path(request.out), "bench-serve", plot)
    return doc


def _row(mode: str, transport: str, concurrency: int, rate: float, results: tuple[list[_Result], float]) -> dict:
    done, wall = results
    ok = [r for r in done if r.status == 200 and r.ttft is not None]
    ttft = np.array([r.ttft for r in ok]) * 1000
    tpot = np.array([r.tpot for r in ok if r.tpot is not None]) * 1000
    hits = np.array([r.ttft for r in ok if r.cached]) * 1000
    misses = np.array([r.ttft for r in ok if not r.cached]) * 1000

    def pct(values, q):
        return round(float(np.percentile(values, q)), 2) if len(values) else None
    return {"mode": mode, "transport": transport, "concurrency": concurrency, "rate_per_s": round(rate, 3),
            "requests": len(done), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 2) if wall > 0 else None,
            "rejected": sum(r.status == 429 for r in done), "failed": sum(r.status not in (200, 429) for r in done),
            "prefix_hits": int(len(hits)), "ttft_hit_p50_ms": pct(hits, 50), "ttft_miss_p50_ms": pct(misses, 50)}


def targets_met(doc: dict) -> dict:
    """The issue's targets from the rows: aggregate tokens/s at the largest level over one stream's decode rate
    (1000 / time per output token of a lone stream), against llama.cpp's at that level; time to first token p99
    at the largest level over a lone request's; a prefix hit's time to first token over a miss's."""
    rows = doc["rows"]

    def find(mode, transport, c, **extra):
        return next((r for r in rows if r["mode"] == mode and r["transport"] == transport and r["concurrency"] == c
                     and all(r.get(k, True) == v for k, v in extra.items())), None)
    levels = sorted({r["concurrency"] for r in rows})
    top, out = levels[-1], {}
    for transport in ("in-process", "http"):
        lone, busy = find("continuous", transport, levels[0]), find("continuous", transport, top)
        if lone and busy and lone["tpot_p50_ms"] and busy["tokens_per_s"]:
            out[f"{transport}: x{top} tokens/s over one stream's"] = round(
                busy["tokens_per_s"] / (1000 / lone["tpot_p50_ms"]), 2)
            out[f"{transport}: x{top} ttft p99 over a lone request's"] = round(
                busy["ttft_p99_ms"] / lone["ttft_p50_ms"], 2)
    peer, ours = find("llama.cpp-server", "http", top), find("continuous", "http", top)
    if peer and ours and peer["tokens_per_s"]:
        out[f"x{top} tokens/s over llama.cpp-server's"] = round(ours["tokens_per_s"] / peer["tokens_per_s"], 2)
    cached = [r for r in rows if r["mode"] == "continuous" and r["ttft_hit_p50_ms"] and r["prefix_hits"]]
    cold = find("continuous", "in-process", levels[0], prefix_cache=False)
    if cached and cold:
        hit = find("continuous", "in-process", levels[0]) or cached[0]
        if hit["ttft_hit_p50_ms"]:
            out["prefix hit: ttft of a miss over a hit's"] = round(cold["ttft_p50_ms"] / hit["ttft_hit_p50_ms"], 2)
    return out


class _Targets:
    """What each mode runs on: in-process servers, a ``planforge serve`` process, a ``llama-server`` process."""

    def __init__(self, bundle: Path, request: LlmServeBenchRequest, options: ContinuousBatching, longest: int):
        self.bundle, self.request, self.options, self.longest = bundle, request, options, longest
        self.servers, self.processes = {}, []
        self.peer_label = None

    def __enter__(self) -> _Targets:
        threads = self.request.threads
        try:
            if "in-process" in self.request.transports:
                self.servers["continuous"] = load(self.bundle, backend="ort-cpu", threads=threads,
                                                  batching=self.options)
                if self.request.one_at_a_time:
                    self.servers["one-at-a-time"] = load(self.bundle, backend="ort-cpu", threads=threads,
                                                         batching=dataclasses.replace(self.options, max_sequences=1))
            if "http" in self.request.transports:
                self.planforge = self._start_planforge()
            if self.request.llama_server is not None:
                self.llama = self._start_llama()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers.values():
            server.close(drain=False)
        for process in self.processes:
            stop(process)

    def each(self):
        if "continuous" in self.servers:
            yield "continuous", "in-process", lambda jobs, c: _drive(jobs, c, self._in_process("continuous"))
        if "one-at-a-time" in self.servers:
            yield "one-at-a-time", "in-process", lambda jobs, c: _drive(jobs, c, self._in_process("one-at-a-time"))
        if "http" in self.request.transports:
            yield "continuous", "http", lambda jobs, c: _drive(jobs, c, _sse(self.planforge, "bench"))
        if self.request.llama_server is not None:
            yield "llama.cpp-server", "http", lambda jobs, c: _drive(jobs, c, _sse(self.llama, None))

    def lone_latency(self, ids: list[int], bos: int) -> float:
        """Seconds one request of the middle lengths takes alone (after a warm-up run)."""
        server = self.servers.get("continuous") or load(self.bundle, backend="ort-cpu", threads=self.request.threads,
                                                        batching=self.options)
        prompt = [bos, *ids[:self.request.shared_prefix + self.request.prompt_tokens]]
        server.submit(prompt[:16], 4, ignore_eos=True).result()
        start = time.perf_counter()
        server.submit(prompt, self.request.new_tokens, ignore_eos=True).result()
        elapsed = time.perf_counter() - start
        if server is not self.servers.get("continuous"):
            server.close()
        return elapsed

    def no_prefix(self, jobs: list[_Job], concurrency: int):
        options = dataclasses.replace(self.options, prefix_cache_bytes=0)
        with load(self.bundle, backend="ort-cpu", threads=self.request.threads, batching=options) as server:
            self.servers["no-prefix"] = server
            try:
                return _drive(jobs, concurrency, self._in_process("no-prefix"))
            finally:
                self.servers.pop("no-prefix")

    def _in_process(self, name: str):
        server = self.servers[name]

        def call(job: _Job) -> _Result:
            try:
                stream = server.submit(job.prompt, job.new, ignore_eos=True)
            except Overloaded:
                return _Result(status=429, end=time.perf_counter())
            stream.result()
            # the stream's times are monotonic; this harness keeps perf_counter: convert by the offset now
            offset = time.perf_counter() - time.monotonic()
            n = len(stream.tokens)
            return _Result(stream.first_token_at - stream.submitted,
                           (stream.times[-1] - stream.times[0]) / (n - 1) if n > 1 else None, n,
                           stream.finished_at + offset, stream.cached_tokens)
        return call

    def _start_planforge(self) -> tuple[str, int]:
        o = self.options
        threads = ["--threads", str(self.request.threads)] if self.request.threads else []
        args = ["--max-sequences", str(o.max_sequences), "--max-length", str(o.max_length),
                "--max-queue", str(o.max_queue), *threads]
        process, port = start_planforge([f"bench={self.bundle}"], *args)
        self.processes.append(process)
        return "127.0.0.1", port

    def _start_llama(self) -> tuple[str, int]:
        port, slots = free_port(), self.options.max_sequences
        threads = self.request.threads or os.cpu_count()
        args = [str(self.request.llama_server), "-m", str(self.request.gguf), "--host", "127.0.0.1", "--port",
                str(port), "-np", str(slots), "-c", str(slots * self.longest), "-t", str(threads), "-tb", str(threads),
                "--cont-batching", "-b", "512", "-ub", "512", "--no-warmup"]
        self.peer_label = f"llama-server (llama.cpp vendored by llama-cpp-python), -np {slots}, -t {threads}"
        self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        wait_ready(self.processes[-1], port, "/health", "llama-server")
        return "127.0.0.1", port


def _drive(jobs: list[_Job], concurrency: int, call) -> tuple[list[_Result], float]:
    """Open-loop arrivals with at most ``concurrency`` in flight (module docstring): (results, seconds from the
    first arrival to the last token)."""
    start = time.perf_counter() + 0.05
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for job in jobs:
            scheduled = start + job.arrival
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(call, job))
        results = [f.result() for f in futures]
    end = max((r.end for r in results), default=start)
    return results, end - start


def _sse(address: tuple[str, int], model: str | None):
    """A streaming ``/v1/completions`` call with the prompt as token ids: times of the first and last text chunk,
    tokens from the final usage (else the chunks), cached prompt tokens."""
    host, port = address

    def call(job: _Job) -> _Result:
        sent = time.perf_counter()
        body = {"prompt": job.prompt, "max_tokens": job.new, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        connection = http.client.HTTPConnection(host, port, timeout=900)
        try:
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                response.read()
                return _Result(status=response.status, end=time.perf_counter())
            first = last = None
            chunks, usage = 0, None
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                doc = json.loads(data)
                usage = doc.get("usage") or usage
                choices = doc.get("choices") or []
                if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
        finally:
            connection.close()
        tokens = (usage or {}).get("completion_tokens") or chunks
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if first is None:
            return _Result(status=500, end=time.perf_counter())
        return _Result(first - sent, (last - first) / (tokens - 1) if tokens > 1 else None, tokens, last, cached)
    return call


def plot(doc: dict, target) -> None:
    """Aggregate tokens/s and time-to-first-token p99 against concurrency, one line per mode and transport."""
    import matplotlib  # noqa: PLC0415 - heavy; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["mode"], r["transport"]) for r in doc["rows"] if r.get("prefix_cache", True)})
    for mode, transport in series:
        rows = sorted((r for r in doc["rows"] if (r["mode"], r["transport"]) == (mode, transport)
                       and r.get("prefix_cache", True)), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=f"{mode} ({transport})")
        right.plot(xs, [r["ttft_p99_ms"] for r in rows], marker="o", label=f"{mode} ({transport})")
    left.set(xlabel="concurrent streams", ylabel="generated tokens/s", title=doc["model"])
    right.set(xlabel="concurrent streams", ylabel="time to first token p99 (ms)", yscale="log")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=110)
    plt.close(fig)


__all__ = ["MODES", "LlmServeBenchRequest", "bench_serve_llm", "check_request", "targets_met", "workload"]
