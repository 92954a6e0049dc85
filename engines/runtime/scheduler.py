"""Serving many callers in one process: dynamic batching, a response cache, admission control with
graceful degradation, a circuit breaker, and the statistics to watch them (after Triton's scheduler).

    with engines.runtime.schedule("build/resnet18", batching=Batching(max_delay_ms=2)) as scheduler:
        outputs = scheduler.infer({"x": image})          # from many threads
        outputs = await scheduler.infer_async({"x": image})

One worker thread forms batches of queued requests with the same key (``engines.runtime.batching``)
while the batch fits the bundle's profiles and ``max_batch``; a lone caller never waits, and the worker
waits up to ``max_delay_ms`` only while the load says more requests are coming
(docs/decisions/005-scheduler-batching.md). A batch that fails is re-run request by request, so one
bad input fails alone. Past ``max_queue`` a request is refused at once
(``Overloaded``) and past its deadline it is not run (``DeadlineExceeded``), unless a lighter bundle
of the same model is configured (``degrade_to``), which then serves it. After ``breaker_failures``
consecutive failed runs the circuit breaker sends batches to the fallback runner (the next backend,
else the lighter bundle) for ``breaker_cooldown_s``, then tries the primary again. ``close()`` drains
the queue (or, with ``drain=False``, fails what is pending) and joins the worker.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping

import numpy as np

from engines.profiles import select
from engines.runtime.base import LATENCY_BUCKETS_MS, Runner
from engines.runtime.batching import Batching, Layout, layout
from engines.runtime.cache import ResponseCache
from foundation.errors import DeadlineExceeded, InferenceError, Overloaded, RuntimeInputError, UsageError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)  # identity: the queue removes this request, not an equal one
class _Request:
    feeds: dict
    size: int
    key: tuple
    lengths: dict
    future: concurrent.futures.Future
    enqueued: float
    deadline: float | None
    cache_key: bytes | None
    before: dict | None = None  # the lengths before trim_padding cut the request


class _Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.batches = self.rejected = self.deadline_exceeded = self.degraded = 0
        self.failed = self.breaker_opened = self.fallback_batches = 0
        self.batch_sizes: collections.Counter = collections.Counter()
        self.wait_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.wait_sum_ms = 0.0

    def waited(self, ms: float) -> None:
        self.wait_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.wait_sum_ms += ms


class Scheduler:
    """Thread-safe ``infer`` and ``infer_async`` for many callers over one runner (module docstring)."""

    def __init__(self, runner: Runner, options: Batching | None = None, cache: ResponseCache | None = None,
                 degrade: Runner | None = None, fallback: Runner | None = None, owned: tuple[Runner, ...] = ()):
        self.runner, self.options, self.cache, self.degrade = runner, options or Batching(), cache, degrade
        self.fallback = fallback if fallback is not None else degrade
        self.input_spec, self.output_specs, self.manifest = runner.input_spec, runner.output_specs, runner.manifest
        self.backend = runner.backend
        self._profiles = list(runner.manifest.profiles) if runner.manifest else []
        self.layout: Layout = layout(
            runner.input_spec, runner.output_specs, self.options, profile_batch(self._profiles)
        )
        if degrade is not None:
            check_compatible(runner, degrade)
        self._owned = owned
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = self._closed = False
        self._busy = False  # requests were queueing behind the last batch: worth waiting to fill the next
        self._recent = 2  # the samples in and behind the last batch: how far the next is worth filling
        self._failures, self._open_until = 0, 0.0
        self._counters = _Counters()
        self._metrics = _metrics(self)
        self._worker = threading.Thread(target=self._loop, name="planforge-batcher", daemon=True)
        self._worker.start()

    # --- callers --------------------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray], timeout_ms: float | None = None) -> dict[str, np.ndarray]:
        """Outputs for ``feeds`` (one request of any batch size the bundle takes)."""
        result = self.submit(feeds, timeout_ms)
        return result.result() if isinstance(result, concurrent.futures.Future) else result

    async def infer_async(self, feeds: Mapping[str, np.ndarray], timeout_ms: float | None = None) -> dict:
        result = self.submit(feeds, timeout_ms)
        return await asyncio.wrap_future(result) if isinstance(result, concurrent.futures.Future) else result

    def submit(self, feeds: Mapping[str, np.ndarray], timeout_ms: float | None = None):
        """A Future of the outputs, or the outputs at once (a cache hit, a degraded request)."""
        if self._closing:
            raise UsageError(
                "this server is closed (close() was called or its with-block ended); load the bundle again"
            )
        if not isinstance(feeds, Mapping) and len(self.input_spec) == 1:
            feeds = {self.input_spec.names[0]: feeds}
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self.input_spec.check_feeds(feeds, values=self.runner.check_values)  # a bad request fails alone, here
        sizes = {v.shape[0] for v in feeds.values()}
        if len(sizes) != 1 or next(iter(sizes)) > self.layout.max_batch:
            raise UsageError(f"a request's inputs must share one batch size of at most {self.layout.max_batch}; "
                             f"found {sorted(sizes)}")
        if self._profiles and select(self._profiles, {k: v.shape for k, v in feeds.items()}) is None:
            raise RuntimeInputError(
                f"no optimization profile accepts shapes { {k: list(v.shape) for k, v in feeds.items()} }"
                f"; the bundle's profiles are {[p.to_json() for p in self._profiles]}"
            )
        cache_key = None
        if self.cache is not None:
            cache_key = self.cache.key(feeds)
            hit = self.cache.get(cache_key)
            if hit is not None:
                self._metrics.cache(True)
                return hit
            self._metrics.cache(False)
        timeout = self.options.timeout_ms if timeout_ms is None else timeout_ms
        now = time.monotonic()
        before = None
        if self.options.trim_padding and self.layout.pad:
            feeds, before = self._trimmed(feeds)
        request = _Request(feeds, next(iter(sizes)), self.layout.key(feeds), self.layout.lengths(feeds),
                           concurrent.futures.Future(), now, now + timeout / 1000 if timeout else None, cache_key,
                           before)
        with self._cond:
            if self._closing:  # close() may have begun since the check above
                raise UsageError("this server is closed (close() was called or its with-block ended)")
            full = len(self._queue) >= self.options.max_queue
            if not full:
                self._queue.append(request)
                self._cond.notify()
        with self._counters.lock:
            self._counters.requests += not full
            self._counters.rejected += full
        if not full:
            return request.future
        self._metrics.rejected()
        if self.degrade is not None:  # outside the lock: the worker and other callers go on meanwhile
            return self._degraded(request, "the queue is full")
        raise Overloaded(f"the serving queue is full ({self.options.max_queue} requests waiting); retry "
                         "later, add capacity, raise max_queue or configure degrade_to")

    def _trimmed(self, feeds: dict) -> tuple[dict, dict | None]:
        """(feeds without trailing padding, the lengths before) when the shorter request still fits the
        input spec and a profile (a spec's minimum length may exceed the real one); else (feeds, None)."""
        trimmed, before = self.layout.trim(feeds)
        if all(trimmed[k].shape == feeds[k].shape for k in feeds):
            return feeds, None
        shapes = {k: v.shape for k, v in trimmed.items()}
        try:
            self.input_spec.check_feeds(trimmed, values=False)
        except RuntimeInputError:
            return feeds, None
        if self._profiles and select(self._profiles, shapes) is None:
            return feeds, None
        return trimmed, before

    def _degraded(self, request: _Request, why: str) -> dict:
        with self._counters.lock:
            self._counters.degraded += 1
        self._metrics.degraded()
        logger.debug("degraded a request to %s: %s", self.degrade, why)
        outputs = self.degrade.infer(request.feeds)
        return self.layout.restore(outputs, request.before) if request.before else outputs

    # --- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
                # wait for more only under load, and only up to the size batches had lately (closed-loop
                # callers cannot send more than that; waiting for max_batch would tax every batch)
                goal = min(self.layout.max_batch, self._recent)
                if self._busy and self.options.max_delay_ms > 0 and sum(r.size for r in batch) < goal:
                    # from when this batch starts forming: callers served by the last batch are about to send
                    # again (closed loop), and the oldest request may have waited through that whole batch
                    until = time.monotonic() + self.options.max_delay_ms / 1000
                    while (left := until - time.monotonic()) > 0 and not self._closing:
                        self._cond.wait(left)
                        batch += self._take(batch)
                        if sum(r.size for r in batch) >= goal:
                            break
                self._busy = bool(self._queue) or len(batch) > 1
                self._recent = max(sum(r.size for r in batch) + sum(r.size for r in self._queue), 2)
                depth = len(self._queue)
            self._metrics.depth(depth)
            try:
                self._run(self._expire(batch))
            except Exception as exc:  # the worker must outlive any bug: its callers would hang
                logger.exception("serving worker: a batch failed outside the backend")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(InferenceError(f"the serving worker failed: {exc!r}"))

    def _take(self, batch: list[_Request] | None = None) -> list[_Request]:
        """Queued requests that join ``batch`` (or start one with the oldest), in order, while they fit."""
        taken, batch = [], list(batch or [])
        key = batch[0].key if batch else self._queue[0].key
        total = sum(r.size for r in batch)
        check = len(self._profiles) > 1  # one profile is the spec's envelope: every request fits it
        for request in list(self._queue):
            if request.key != key or total + request.size > self.layout.max_batch:
                continue
            if check and (batch or taken) and not self._fits([*batch, *taken, request]):
                continue  # the head always goes: submit() checked that a profile takes it alone
            self._queue.remove(request)
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller cancelled it (asyncio.wait_for, Future.cancel)
            taken.append(request)
            total += request.size
        return taken

    def _fits(self, requests: list[_Request]) -> bool:
        total = sum(r.size for r in requests)
        longest = {dim: max(r.lengths[dim] for r in requests) for dim in self.layout.pad}
        shapes = {}
        for name in self.layout.inputs:
            shape = list(requests[0].feeds[name].shape)
            shape[0] = total
            for dim, axes in self.layout.axes.items():
                if dim in longest and name in axes:
                    for axis in axes[name]:
                        shape[axis] = longest[dim]
            shapes[name] = tuple(shape)
        return select(self._profiles, shapes) is not None

    def _expire(self, batch: list[_Request]) -> list[_Request]:
        now, live = time.monotonic(), []
        for request in batch:
            with self._counters.lock:
                self._counters.waited((now - request.enqueued) * 1000)
            self._metrics.waited(now - request.enqueued)
            if request.deadline is None or now <= request.deadline:
                live.append(request)
                continue
            with self._counters.lock:
                self._counters.deadline_exceeded += 1
            if self.degrade is not None:
                _settle(request.future, lambda r=request: self._degraded(r, "its deadline passed"))
            else:
                request.future.set_exception(DeadlineExceeded(
                    f"the request waited {(now - request.enqueued) * 1000:.1f} ms in the queue, past its "
                    f"{(request.deadline - request.enqueued) * 1000:.0f} ms deadline; it was not run"))
        return live

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        with self._counters.lock:
            self._counters.batches += 1
            self._counters.batch_sizes[sum(r.size for r in batch)] += 1
        self._metrics.batch(sum(r.size for r in batch))
        runner = self._route()
        try:
            outputs = runner.infer(self.layout.merge([r.feeds for r in batch]))
        except Exception as exc:  # noqa: BLE001 - any backend failure: isolate it
            if len(batch) == 1:
                self._failed(runner)  # a batch's failure counts through its requests, run alone next
                with self._counters.lock:
                    self._counters.failed += 1
                batch[0].future.set_exception(exc)
                return
            for request in batch:  # one bad input must not fail the others
                self._run([request])
            return
        self._succeeded(runner)
        parts = self.layout.split(outputs, [r.size for r in batch], [r.lengths for r in batch])
        for request, part in zip(batch, parts):
            if request.before:
                part = self.layout.restore(part, request.before)
            if self.cache is not None and request.cache_key is not None and runner is self.runner:
                self.cache.put(request.cache_key, part)  # never a fallback's or lighter bundle's outputs
            request.future.set_result(part)

    # --- the circuit breaker --------------------------------------------------------------------
    def _route(self) -> Runner:
        if self.fallback is not None and time.monotonic() < self._open_until:
            with self._counters.lock:
                self._counters.fallback_batches += 1
            return self.fallback
        return self.runner

    def _failed(self, runner: Runner) -> None:
        if runner is not self.runner:
            return
        self._failures += 1
        if self.fallback is not None and self._failures >= self.options.breaker_failures:
            self._open_until = time.monotonic() + self.options.breaker_cooldown_s
            self._failures = 0
            with self._counters.lock:
                self._counters.breaker_opened += 1
            logger.warning("%s failed %d times in a row: sending batches to %s for %.1f s", self.runner.backend,
                           self.options.breaker_failures, self.fallback.backend, self.options.breaker_cooldown_s)

    def _succeeded(self, runner: Runner) -> None:
        if runner is self.runner:
            self._failures = 0

    # --- monitoring and lifetime ----------------------------------------------------------------
    def stats(self) -> dict:
        c = self._counters
        with self._cond:
            depth = len(self._queue)
        with c.lock:
            edges = [*map(str, LATENCY_BUCKETS_MS), "inf"]
            served = sum(c.batch_sizes.values())
            doc = {"queue_depth": depth, "requests": c.requests, "batches": c.batches, "rejected": c.rejected,
                   "deadline_exceeded": c.deadline_exceeded, "degraded": c.degraded, "failed": c.failed,
                   "batch_sizes": dict(sorted(c.batch_sizes.items())),
                   "mean_batch": sum(k * v for k, v in c.batch_sizes.items()) / served if served else 0.0,
                   "queue_wait_ms": {"sum": c.wait_sum_ms, "buckets": dict(zip(edges, c.wait_buckets))},
                   "breaker": {"open": time.monotonic() < self._open_until, "opened": c.breaker_opened,
                               "fallback_batches": c.fallback_batches}}
        doc["cache"] = self.cache.stats() if self.cache is not None else None
        doc["runner"] = self.runner.stats()
        return doc

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; ``drain``: run what is queued first, else fail it. No thread outlives it."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            pending = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        for request in pending:
            request.future.set_exception(
                InferenceError(
                    f"the scheduler was closed with {len(pending)} request(s) pending (close(drain=False)); they were "
                    "not run"
                )
            )
        self._worker.join()
        self._closed = True
        for runner in self._owned:
            runner.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Scheduler backend={self.backend} max_batch={self.layout.max_batch} inputs={self.input_spec}>"


def _settle(future: concurrent.futures.Future, compute) -> None:
    try:
        future.set_result(compute())
    except Exception as exc:  # noqa: BLE001 - handed to the caller
        future.set_exception(exc)


def profile_batch(profiles) -> int | None:
    """The largest batch some profile takes for every input at once."""
    if not profiles:
        return None
    return max(min(shape[0] for shape in p.max.values() if shape) for p in profiles)


def check_compatible(primary: Runner, lighter: Runner) -> None:
    """A degraded bundle must take the same inputs and give the same outputs."""
    a = [(t.name, t.dtype, len(t.dims)) for t in primary.input_spec]
    b = [(t.name, t.dtype, len(t.dims)) for t in lighter.input_spec]
    oa = [(o.name, o.dtype, len(o.shape)) for o in primary.output_specs]
    ob = [(o.name, o.dtype, len(o.shape)) for o in lighter.output_specs]
    if a != b or oa != ob:
        raise UsageError(f"degrade_to: the lighter bundle must take and give the same tensors; inputs {a} vs {b}, "
                         f"outputs {oa} vs {ob}")


def _metrics(server: Scheduler):
    try:  # prometheus-client is optional
        from engines.runtime.prometheus import ServerMetrics  # noqa: PLC0415
    except ImportError:
        return _NoMetrics()
    return ServerMetrics.create(server)


class _NoMetrics:
    def __getattr__(self, name):
        return lambda *args: None
