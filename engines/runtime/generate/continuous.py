"""Continuous batching: many generations share one decoder session, scheduled at every token (after vLLM,
TGI and llama.cpp's server), with a prefix cache (``prefix``).

    with engines.runtime.load("build/gemma3-int4", batching=ContinuousBatching(max_sequences=8)) as server:
        stream = server.submit(prompt_ids, max_new_tokens=128)
        for token in stream:          # as each is chosen; or stream.result(), or async for in stream.tokens_async()
            ...

One worker thread runs the loop. Each iteration it admits queued requests while a KV slot is free, computes
at most ``prefill_chunk`` prompt tokens (a chunk of one long prompt, or several short prompts that arrived
together, one call each: a token budget per step, as vLLM's), then one decode step for every running
sequence: a sequence joins the running batch at the step after its prefill ends and leaves
it the moment it finishes (a stop token, ``max_new_tokens``, cancelled), so short answers never wait for
long ones, and a long prompt's prefill is cut in chunks between decode steps so running sequences keep
their per-token latency.

The cache is the graph's shared form (``DecoderInfo.cache == "shared"``: GroupQueryAttention writes each
step's keys and values in place, at each row's own length): one ``[slots, kv_heads, max_length, head_dim]``
array per past tensor, allocated once (``max_sequences`` slots, fewer if ``kv_bytes`` says so), of which
the running sequences hold rows ``0..n-1``. The decode step binds the first ``n`` rows (a view, no copy)
as both past and present; a finishing sequence's row is filled by moving the last row's used positions
into it, so the batch stays contiguous. A prefill runs in a one-row staging buffer, starts from the
prefix cache's blocks when the prompt's start is held there, gives the first token, and its used
positions are then copied into the next free row. Copies are of used positions only, once per sequence
(milliseconds); nothing of the cache is allocated or copied per token.

Admission control as the scheduler's (``engines.runtime.scheduler``): past ``max_queue`` waiting requests a
submission is refused (``Overloaded``); a request still waiting past its deadline (``timeout_ms``) is
refused (``DeadlineExceeded``); a cancelled request (``GenerationStream.cancel()``, a disconnected client)
leaves the queue, or frees its slot at the next step. Greedy outputs equal one-at-a-time generation
(``Generator.generate`` of one prompt) up to the rounding of batched kernels; each sequence samples with
its own seeded generator, so a seed gives the same text whoever shares the batch.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from engines.runtime.generate.loop import GenerationError, Generator
from engines.runtime.generate.prefix import PrefixCache
from engines.runtime.generate.sampling import Sampling, next_tokens
from foundation.decoder import DecoderInfo
from foundation.errors import DeadlineExceeded, InferenceError, Overloaded, UsageError

logger = logging.getLogger(__name__)

# Latency buckets for time to first token and per output token, in milliseconds.
TOKEN_BUCKETS_MS = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this window


@dataclasses.dataclass(frozen=True)
class ContinuousBatching:
    """Options of the generation server. ``max_sequences``: sequences running at once (KV slots).
    ``max_length``: prompt plus new tokens of one sequence, the length of each slot (default: the bundle's).
    ``kv_bytes``: a memory budget for the KV slots (and the prefill's staging row); fewer slots when the
    budget holds fewer. ``prefill_chunk``: prompt tokens computed between two decode steps. ``max_queue``:
    requests waiting beyond it are refused. ``timeout_ms``: a request still waiting for a slot past it is
    refused. ``prefix_cache_bytes``: the prefix cache's size (0: off), in blocks of ``prefix_block`` tokens."""

    max_sequences: int = 8
    max_length: int | None = None
    kv_bytes: int | None = None
    prefill_chunk: int = 256
    max_queue: int = 256
    timeout_ms: float | None = None
    prefix_cache_bytes: int = 256 << 20
    prefix_block: int = 32

    def __post_init__(self):
        if self.max_sequences < 1 or self.prefill_chunk < 1 or self.max_queue < 1 or self.prefix_block < 1:
            raise UsageError(f"{self}: expected max_sequences, prefill_chunk, max_queue and prefix_block >= 1")
        if (self.timeout_ms is not None and self.timeout_ms <= 0) or self.prefix_cache_bytes < 0 \
                or (self.kv_bytes is not None and self.kv_bytes <= 0) \
                or (self.max_length is not None and self.max_length < 2):
            raise UsageError(f"{self}: expected timeout_ms > 0, kv_bytes > 0, max_length >= 2 (or None) and "
                             "prefix_cache_bytes >= 0")


class GenerationStream:
    """One request's generation as it goes: ``tokens`` so far, then ``finish_reason`` (``"stop"``: a stop
    token, ``"length"``: ``max_new_tokens`` or the slot's length, ``"cancelled"``, ``"error"``). Iterate it
    (blocking) or ``async for`` over ``tokens_async()`` to get tokens as they are chosen; ``result()`` waits
    for all. ``cancel()`` frees its slot at the next step. Times are ``time.monotonic()`` seconds."""

    def __init__(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, stop: frozenset[int],
                 deadline: float | None, server: GenerationServer):
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens, self.sampling, self.stop, self.deadline = max_new_tokens, sampling, stop, deadline
        self.tokens: list[int] = []
        self.times: list[float] = []  # when each token was handed over
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self._server = server
        self._cond = threading.Condition()
        self._wakers: list = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this generation: it leaves the queue, or frees its slot at the next step."""
        if not self.done:
            self.cancelled = True
            self._server._wake()

    def result(self, timeout: float | None = None) -> list[int]:
        """Every new token (a stop token ends the text and is not included); raises what failed it."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"generation not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    def __iter__(self):
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda count=seen: len(self.tokens) > count or self.done)
                new, finished = self.tokens[seen:], self.done
            yield from new
            seen += len(new)
            if finished and seen == len(self.tokens):
                if self.error is not None:
                    raise self.error
                return

    async def tokens_async(self):
        """The tokens as they are chosen, for an asyncio caller (the worker wakes its loop thread-safely)."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            loop.call_soon_threadsafe(event.set)

        with self._cond:
            self._wakers.append(wake)
        seen = 0
        try:
            while True:
                event.clear()
                with self._cond:
                    new, finished = self.tokens[seen:], self.done
                for token in new:
                    yield token
                seen += len(new)
                if finished and seen == len(self.tokens):
                    if self.error is not None:
                        raise self.error
                    return
                await event.wait()
        finally:
            with self._cond:
                self._wakers.remove(wake)

    # --- the worker's side ----------------------------------------------------------------------
    def _push(self, token: int) -> None:
        with self._cond:
            self.tokens.append(token)
            self.times.append(time.monotonic())
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _finish(self, reason: str, error: Exception | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self.finish_reason, self.error, self.finished_at = reason, error, time.monotonic()
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()


@dataclasses.dataclass(eq=False)
class _Sequence:
    stream: GenerationStream
    rng: np.random.Generator
    history: list[int]
    done: int = 0  # prompt tokens whose keys and values are in the cache
    length: int = 0  # tokens in the cache (after the prefill: the prompt)
    last: int = -1  # the token the next decode step feeds
    previous: float = 0.0  # when the last token was emitted


class _Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.rejected = self.deadline_exceeded = self.cancelled = self.failed = 0
        self.finished = self.prompt_tokens = self.generated_tokens = self.steps = self.prefill_chunks = 0
        self.ttft = [0] * (len(TOKEN_BUCKETS_MS) + 1)
        self.tpot = [0] * (len(TOKEN_BUCKETS_MS) + 1)
        self.ttft_sum_ms = self.tpot_sum_ms = 0.0
        self.recent: collections.deque = collections.deque()  # (time, tokens) of the last RATE_WINDOW_S

    def observe(self, buckets: list[int], ms: float) -> None:
        buckets[bisect.bisect_left(TOKEN_BUCKETS_MS, ms)] += 1


class GenerationServer:
    """Continuous batching over one ONNX Runtime session of a decoder graph (module docstring)."""

    def __init__(self, session: ort.InferenceSession, info: DecoderInfo, options: ContinuousBatching | None = None,
                 owned=(), name: str = "decoder"):
        self.options, self.info, self.name = options or ContinuousBatching(), info, name
        if info.cache != "shared":
            raise UsageError(f"{name}: continuous batching needs the decoder graph's shared KV cache "
                             "(GroupQueryAttention writing in place, the 'ort' target's graph for a supported "
                             f"family); this graph keeps cache form {info.cache!r}: rebuild the bundle with "
                             "--target ort, or generate one request at a time with runtime.load(bundle).generate")
        self.generator = Generator(session, info, self.options.max_length)
        self.max_length = self.generator.max_length
        shape = (info.kv_heads, self.max_length, info.head_dim)
        self.slot_bytes = len(info.past_names) * int(np.prod(shape)) * 4
        slots = self.options.max_sequences
        if self.options.kv_bytes is not None:
            slots = min(slots, self.options.kv_bytes // self.slot_bytes - 1)  # one row is the prefill's staging
            if slots < 1:
                raise UsageError(f"kv_bytes {self.options.kv_bytes} holds no sequence: one KV slot of "
                                 f"{self.max_length} tokens takes {self.slot_bytes} bytes, and the prefill's "
                                 "staging row as much again; raise kv_bytes or lower max_length")
        self.slots = slots
        # np.zeros maps untouched pages lazily: memory grows with the positions sequences really use.
        self._kv = {name: np.zeros((slots, *shape), np.float32) for name in info.past_names}
        self._stage = {name: np.zeros((1, *shape), np.float32) for name in info.past_names}
        self._stage_values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self._stage.items()}
        self._views: dict[int, dict[str, ort.OrtValue]] = {}
        self.prefix = PrefixCache(self.options.prefix_cache_bytes, self.options.prefix_block) \
            if self.options.prefix_cache_bytes else None
        self._owned = owned
        self._queue: collections.deque[GenerationStream] = collections.deque()
        self._running: list[_Sequence] = []
        self._prefilling: _Sequence | None = None
        self._cond = threading.Condition()
        self._closing = self._closed = False
        self._counters = _Counters()
        self._worker = threading.Thread(target=self._loop, name="planforge-generation", daemon=True)
        self._worker.start()

    # --- callers --------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
               stop: Sequence[int] = (), ignore_eos: bool = False, timeout_ms: float | None = None
               ) -> GenerationStream:
        """Queue one generation; its ``GenerationStream`` gives the tokens as they come. Raises
        ``GenerationError`` for a bad request, ``Overloaded`` when the queue is full."""
        if self._closing:
            raise UsageError("this generation server is closed (close() was called or its with-block ended)")
        self.generator.check([prompt], max_new_tokens)
        stops = frozenset(int(t) for t in (*stop, *(() if ignore_eos else self.info.eos)))
        timeout = self.options.timeout_ms if timeout_ms is None else timeout_ms
        now = time.monotonic()
        stream = GenerationStream(prompt, int(max_new_tokens), sampling or Sampling(), stops,
                                  now + timeout / 1000 if timeout else None, self)
        with self._cond:
            full = len(self._queue) >= self.options.max_queue
            if not full and not self._closing:
                self._queue.append(stream)
                self._cond.notify()
        with self._counters.lock:
            self._counters.requests += 1
            self._counters.rejected += full
        if full:
            raise Overloaded(f"the generation queue is full ({self.options.max_queue} requests waiting for "
                             f"{self.slots} slots); retry later, add capacity or raise max_queue")
        if self._closing:
            raise UsageError("this generation server is closed")
        return stream

    def generate(self, prompt: Sequence[int], max_new_tokens: int = 64, **kwargs) -> list[int]:
        """The new tokens of one prompt (``submit(...).result()``)."""
        return self.submit(prompt, max_new_tokens, **kwargs).result()

    # --- the worker -----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._running or self._prefilling or self._closing):
                    self._cond.wait()
                if self._closing and not (self._queue or self._running or self._prefilling):
                    return
            try:
                self._admit()
                self._release()
                self._prefill()
                if self._running:
                    self._decode()
                elif self._prefilling is None:
                    with self._cond:  # nothing to run: wait for a request (or a cancel, or close)
                        if not self._queue and not self._closing:
                            self._cond.wait(0.05)
            except Exception as exc:  # the worker must outlive any failure: its callers would hang
                logger.exception("generation worker: a step failed")
                error = InferenceError(f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
                for seq in [*self._running, *([self._prefilling] if self._prefilling else [])]:
                    seq.stream._finish("error", error)
                with self._counters.lock:
                    self._counters.failed += len(self._running) + (self._prefilling is not None)
                self._running, self._prefilling = [], None

    def _admit(self, fits: int | None = None) -> None:
        """The oldest waiting request starts its prefill when a slot is free (one prefill at a time: the staging
        row) and, with ``fits``, when its prompt is at most that many tokens; cancelled and expired requests leave
        the queue."""
        now = time.monotonic()
        with self._cond:
            waiting = list(self._queue)
        for stream in waiting:
            if stream.cancelled:
                self._dequeue(stream)
                stream._finish("cancelled")
                with self._counters.lock:
                    self._counters.cancelled += 1
            elif stream.deadline is not None and now > stream.deadline:
                self._dequeue(stream)
                stream._finish("error", DeadlineExceeded(
                    f"the request waited {(now - stream.submitted) * 1000:.0f} ms for a slot, past its "
                    f"{(stream.deadline - stream.submitted) * 1000:.0f} ms deadline; it was not run"))
                with self._counters.lock:
                    self._counters.deadline_exceeded += 1
        if self._prefilling is not None or len(self._running) >= self.slots:
            return
        with self._cond:
            if not self._queue or (fits is not None and len(self._queue[0].prompt) > fits):
                return
            stream = self._queue.popleft()
        stream.admitted = time.monotonic()
        seq = _Sequence(stream, stream.sampling.rng(), list(stream.prompt))
        if self.prefix is not None:
            blocks = self.prefix.lookup(stream.prompt)
            block = self.prefix.block
            for k, entry in enumerate(blocks):
                for j, name in enumerate(self.info.past_names):
                    self._stage[name][0, :, k * block:(k + 1) * block] = entry[j]
            seq.done = stream.cached_tokens = len(blocks) * block
        self._prefilling = seq

    def _dequeue(self, stream: GenerationStream) -> None:
        with self._cond:
            try:
                self._queue.remove(stream)
            except ValueError:
                pass

    def _release(self) -> None:
        """Cancelled sequences leave: their rows are filled by moving the last rows in (module docstring)."""
        if self._prefilling is not None and self._prefilling.stream.cancelled:
            self._prefilling.stream._finish("cancelled")
            self._prefilling = None
            with self._counters.lock:
                self._counters.cancelled += 1
        gone = [row for row, seq in enumerate(self._running) if seq.stream.cancelled]
        for row in gone:
            self._running[row].stream._finish("cancelled")
        with self._counters.lock:
            self._counters.cancelled += len(gone)
        self._remove(gone)

    def _remove(self, rows: list[int]) -> None:
        for row in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if row != last:
                moved = self._running[last]
                for array in self._kv.values():
                    array[row, :, :moved.length] = array[last, :, :moved.length]
                self._running[row] = moved
            self._running.pop()

    def _prefill(self) -> None:
        """Prompt tokens between two decode steps: at most ``prefill_chunk`` of them, over as many waiting
        sequences as they reach (vLLM's token budget per step). Prompts arriving together each get their first
        token before the next decode step instead of one per step; a long prompt is cut at the budget, and a
        next prompt starts in the same step only when it fits in what is left (no fragment calls)."""
        budget = self.options.prefill_chunk
        while self._prefilling is not None:
            budget -= self._prefill_chunk(budget)
            if self._prefilling is not None or budget <= 0:
                return
            self._admit(fits=budget)

    def _prefill_chunk(self, budget: int) -> int:
        """One call over at most ``budget`` of the prefilling sequence's prompt tokens; the tokens computed."""
        seq = self._prefilling
        prompt = seq.stream.prompt
        start, stop = seq.done, min(len(prompt), seq.done + budget)
        feeds = {"input_ids": np.asarray(prompt[start:stop], np.int64)[None],
                 "attention_mask": np.ones((1, stop), np.int64),
                 "position_ids": np.arange(start, stop, dtype=np.int64)[None]}
        logits, _ = self.generator.forward(feeds, self._stage_values, np.array([stop - start - 1]), True)
        seq.done = seq.length = stop
        with self._counters.lock:
            self._counters.prefill_chunks += 1
        if stop < len(prompt):
            return stop - start
        self._prefilling = None
        if self.prefix is not None:
            self.prefix.insert(prompt, lambda a, b: np.stack([self._stage[n][0, :, a:b] for n in self.info.past_names]))
        with self._counters.lock:
            self._counters.prompt_tokens += len(prompt)
        if not self._emit(seq, int(self._choose(logits, [seq])[0])):  # it runs on: its used positions to a row
            row = len(self._running)
            for name, array in self._kv.items():
                array[row, :, :seq.length] = self._stage[name][0, :, :seq.length]
            self._running.append(seq)
        return stop - start

    def _decode(self) -> None:
        n = len(self._running)
        lengths = np.array([s.length for s in self._running], np.int64)
        feeds = {"input_ids": np.array([[s.last] for s in self._running], np.int64),
                 "attention_mask": (np.arange(lengths.max() + 1) < (lengths + 1)[:, None]).astype(np.int64),
                 "position_ids": lengths[:, None]}
        logits, _ = self.generator.forward(feeds, self._view(n), np.zeros(n, np.int64), True)
        tokens = self._choose(logits, self._running)
        finished = []
        for row, (seq, token) in enumerate(zip(self._running, tokens)):
            seq.length += 1
            if self._emit(seq, int(token)):
                finished.append(row)
        with self._counters.lock:
            self._counters.steps += 1
        self._remove(finished)

    def _view(self, n: int) -> dict[str, ort.OrtValue]:
        """The first ``n`` rows of every cache array as OrtValues over the same memory (made once per n)."""
        if n not in self._views:
            self._views[n] = {name: ort.OrtValue.ortvalue_from_numpy(array[:n]) for name, array in self._kv.items()}
        return self._views[n]

    def _choose(self, logits: np.ndarray, seqs: list[_Sequence]) -> np.ndarray:
        """The next token of each sequence: one argmax for the greedy rows, each sampled row with its own
        generator and history."""
        tokens = np.asarray(logits).argmax(-1).astype(np.int64)
        for row, seq in enumerate(seqs):
            s = seq.stream.sampling
            if s.temperature != 0 or s.repetition_penalty != 1.0:
                tokens[row] = next_tokens(logits[row:row + 1], s, seq.rng, [np.asarray(seq.history)])[0]
        return tokens

    def _emit(self, seq: _Sequence, token: int) -> bool:
        """Hands ``token`` to the stream; True when the sequence is finished (its slot is free)."""
        stream, now = seq.stream, time.monotonic()
        c = self._counters
        if stream.first_token_at is None:
            stream.first_token_at = now
            with c.lock:
                ms = (now - stream.submitted) * 1000
                c.observe(c.ttft, ms)
                c.ttft_sum_ms += ms
        else:
            with c.lock:
                ms = (now - seq.previous) * 1000
                c.observe(c.tpot, ms)
                c.tpot_sum_ms += ms
        seq.previous = now
        if token in stream.stop:
            reason = "stop"
        else:
            seq.history.append(token)
            seq.last = token
            stream._push(token)
            with c.lock:
                c.generated_tokens += 1
                c.recent.append((now, 1))
            reason = "length" if len(stream.tokens) >= stream.max_new_tokens or seq.length >= self.max_length \
                else None
        if reason is None:
            return False
        stream._finish(reason)
        with c.lock:
            c.finished += 1
        return True

    # --- monitoring and lifetime ----------------------------------------------------------------
    def stats(self) -> dict:
        c = self._counters
        with self._cond:
            depth = len(self._queue)
        now = time.monotonic()
        edges = [*map(str, TOKEN_BUCKETS_MS), "inf"]
        with c.lock:
            while c.recent and c.recent[0][0] < now - RATE_WINDOW_S:
                c.recent.popleft()
            doc = {"queue_depth": depth, "slots": self.slots,
                   "slots_in_use": len(self._running) + (self._prefilling is not None),
                   "requests": c.requests, "rejected": c.rejected, "deadline_exceeded": c.deadline_exceeded,
                   "cancelled": c.cancelled, "failed": c.failed, "finished": c.finished,
                   "prompt_tokens": c.prompt_tokens, "generated_tokens": c.generated_tokens, "steps": c.steps,
                   "prefill_chunks": c.prefill_chunks,
                   "tokens_per_s": sum(k for _, k in c.recent) / RATE_WINDOW_S,
                   "ttft_ms": {"sum": c.ttft_sum_ms, "buckets": dict(zip(edges, c.ttft))},
                   "tpot_ms": {"sum": c.tpot_sum_ms, "buckets": dict(zip(edges, c.tpot))}}
        doc["prefix_cache"] = self.prefix.stats() if self.prefix is not None else None
        return doc

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; ``drain``: finish what is queued and running first, else cancel it."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            if not drain:
                for stream in [*self._queue, *(s.stream for s in self._running)]:
                    stream.cancelled = True
                if self._prefilling is not None:
                    self._prefilling.stream.cancelled = True
            self._cond.notify_all()
        self._worker.join()
        self._closed = True
        for owned in self._owned:
            owned.close()

    def __enter__(self) -> GenerationServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<GenerationServer {self.name} slots={self.slots} max_length={self.max_length}>"


__all__ = ["ContinuousBatching", "GenerationError", "GenerationServer", "GenerationStream", "TOKEN_BUCKETS_MS"]
