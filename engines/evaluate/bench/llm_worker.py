"""One ``bench-llm`` measurement in its own process: ``python llm_worker.py BACKEND MODEL REQUEST.json``.

Runs under the main venv (``planforge``, ``transformers``) or a peer's own venv (``onnxruntime-genai``,
``llama.cpp``), so it imports nothing of planforge at module level and only the standard library, NumPy and
the one backend it measures. The request holds the token ids every backend gets (the prompts and the
held-out text, made by the parent with the bundle's tokenizer: every peer reads the same ids, BOS included),
the batch, the new-token count and the thread count. It prints one JSON row on stdout.

Timing: one untimed warm-up generation, then one timed: TTFT from the call to the first token chosen,
prompt tokens/s = batch * prompt length / TTFT, decode tokens/s = batch * (new tokens - 1) / the time from
the first token to the last, per-token latency p50/p99 over those steps. Greedy, exactly ``new_tokens``
tokens (stop tokens ignored), context = prompt + new tokens. Peak RSS (VmHWM) is read after the
generations and before scoring: scoring's logits are not part of serving. Perplexity: teacher-forced over
the held-out ids, exp of the mean negative log-likelihood of each next token.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return logits[np.arange(len(targets)), targets] - norm


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: a child started by fork + exec inherits
    the parent's peak there, and the parent is the benchmark driver."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the best there is


def _perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs)))


def _timed(steps) -> dict:
    """Times of each step of an iterator that yields once per generated token (all rows)."""
    start = time.perf_counter()
    stamps = []
    for _ in steps:
        stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "steps": np.diff(stamps)}


class Planforge:
    name = "planforge"

    def __init__(self, model: str, request: dict):
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from engines.runtime import load  # noqa: PLC0415 - the repository, put on the path above

        self.runner = load(model, threads=request["threads"])
        self.precision = self.runner.manifest.precision
        self.generator = self.runner.generator(max_length=request["context"])

    def generate(self, prompts: list[list[int]], new: int):
        return self.generator.stream(prompts, new, stop=(), ignore_eos=True)

    def score(self, ids: list[int]) -> float:
        logprobs, _ = self.runner.generator(max_length=max(len(ids), self.generator.max_length)).score(ids)
        return _perplexity(logprobs)


class Transformers:
    name = "transformers"
    precision = "fp32"

    def __init__(self, model: str, request: dict):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        torch.set_num_threads(request["threads"])
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def generate(self, prompts, new: int):
        import queue  # noqa: PLC0415
        import threading  # noqa: PLC0415

        from transformers.generation.streamers import BaseStreamer  # noqa: PLC0415

        ticks: queue.Queue = queue.Queue()

        class Ticks(BaseStreamer):
            def __init__(self):
                self.first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                else:
                    ticks.put(1)

            def end(self):
                ticks.put(None)

        ids = self.torch.tensor(prompts)

        def run():
            with self.torch.no_grad():
                self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, streamer=Ticks(), pad_token_id=0)

        thread = threading.Thread(target=run)
        thread.start()
        while ticks.get() is not None:
            yield
        thread.join()

    def score(self, ids: list[int]) -> float:
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0, :-1].numpy()
        return _perplexity(_log_softmax_at(logits, np.asarray(ids[1:])))


class OnnxruntimeGenai:
    name = "onnxruntime-genai"

    def __init__(self, model: str, request: dict):
        import onnxruntime_genai as og  # noqa: PLC0415

        self.og = og
        config = og.Config(model)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": request["threads"], "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.precision = json.loads((Path(model) / "planforge_peer.json").read_text())["precision"]
        decoder = json.loads((Path(model) / "genai_config.json").read_text())["model"]["decoder"]
        self.window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)

    def _generator(self, batch: int, length: int):
        # Its sliding-window layers keep a window-sized cache and refuse a max length below the window (512).
        length = max(length, self.window)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, batch_size=batch, do_sample=False, min_length=length)
        return self.og.Generator(self.model, params)

    def generate(self, prompts, new: int):
        generator = self._generator(len(prompts), len(prompts[0]) + new)
        generator.append_tokens(np.asarray(prompts, np.int32))
        for _ in range(new):
            generator.generate_next_token()
            generator.get_next_tokens()
            yield

    def score(self, ids: list[int], chunk: int = 128) -> float:
        generator = self._generator(1, len(ids) + 1)
        logprobs = []
        for start in range(0, len(ids) - 1, chunk):
            piece = np.asarray(ids[start:min(start + chunk, len(ids) - 1)], np.int32)
            generator.append_tokens(piece[None])
            logits = np.asarray(generator.get_output("logits"))[0]
            logprobs.append(_log_softmax_at(logits[-len(piece):], np.asarray(ids[start + 1:start + 1 + len(piece)])))
        return _perplexity(np.concatenate(logprobs))


class LlamaCpp:
    name = "llama.cpp"
    precision = "gguf"

    def __init__(self, model: str, request: dict):
        import llama_cpp  # noqa: PLC0415

        self.model_path, self.threads, self.llama_cpp = model, request["threads"], llama_cpp
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=request["context"], n_threads=request["threads"],
                                   n_threads_batch=request["threads"], n_batch=512, verbose=False)
        self.precision = Path(model).name

    def generate(self, prompts, new: int):
        if len(prompts) != 1:
            raise ValueError("llama-cpp-python runs one sequence per context")
        self.llm.reset()
        self.llm.eval(prompts[0])
        for _ in range(new):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            yield
            self.llm.eval([token])

    def score(self, ids: list[int]) -> float:
        llm = self.llama_cpp.Llama(model_path=self.model_path, n_ctx=len(ids) + 8, n_threads=self.threads,
                                   n_threads_batch=self.threads, n_batch=512, logits_all=True, verbose=False)
        llm.eval(ids[:-1])
        logits = np.asarray(llm.scores[:len(ids) - 1])
        return _perplexity(_log_softmax_at(logits, np.asarray(ids[1:])))


BACKENDS = {b.name: b for b in (Planforge, Transformers, OnnxruntimeGenai, LlamaCpp)}


def main(argv: list[str]) -> int:
    backend, model, request_path = argv
    request = json.loads(Path(request_path).read_text())
    runner = BACKENDS[backend](model, request)
    new, rows = request["new_tokens"], []
    for batch in request["batches"]:
        prompts = request["prompts"][:batch]
        try:
            for _ in runner.generate(prompts, 4):  # warm-up: allocations, thread pools, caches
                pass
            timed = _timed(runner.generate(prompts, new))
        except ValueError as exc:  # a batch this backend does not serve
            rows.append({"backend": backend, "batch": batch, "skipped": str(exc)})
            continue
        steps = timed["steps"]
        rows.append({"backend": backend, "precision": runner.precision, "batch": batch,
                     "prompt_tokens": len(prompts[0]), "new_tokens": new, "threads": request["threads"],
                     "ttft_ms": timed["ttft"] * 1e3, "prompt_tok_per_s": batch * len(prompts[0]) / timed["ttft"],
                     "decode_tok_per_s": batch * len(steps) / float(np.sum(steps)),
                     "p50_ms": float(np.percentile(steps, 50) * 1e3), "p99_ms": float(np.percentile(steps, 99) * 1e3)})
    peak = _peak_rss_mb()
    perplexity = runner.score(request["held_out"]) if request.get("held_out") else None
    for row in rows:
        row.update(peak_rss_mb=peak, perplexity=perplexity, perplexity_tokens=len(request.get("held_out") or ()))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
