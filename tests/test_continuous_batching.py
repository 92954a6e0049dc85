"""Continuous batching (``engines.runtime.generate.continuous``) and its prefix cache (``prefix``) on the
seeded decoder families' ``ort`` graphs (GroupQueryAttention over a shared cache): what each request gets
equals one-at-a-time generation whoever shares its batch and whatever the prefix cache held; a cancelled
request frees its slot; the queue and the deadline refuse as the scheduler does; bad requests fail alone."""

import threading
import time

import numpy as np
import pytest

pytest.importorskip("transformers")

from decoders import FAMILIES, family_ort

from engines.runtime import ContinuousBatching
from engines.runtime.generate import GenerationError, GenerationServer, Generator, PrefixCache, Sampling
from foundation.errors import DeadlineExceeded, Overloaded, UsageError
from foundation.ort_session import create_session

MAX_LENGTH = 64


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    info, _, _, path = family_ort(request.param)
    return request.param, info, create_session(path, 1, optimize=True)


def _requests(seed: int, count: int, vocab: int = 96):
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, vocab, size=int(n)).tolist() for n in rng.integers(1, 30, size=count)]
    return prompts, [int(n) for n in rng.integers(1, 30, size=count)]


def _alone(session, info, prompts, news):
    generator = Generator(session, info, MAX_LENGTH)
    return [generator.generate([p], n, ignore_eos=True)[0] for p, n in zip(prompts, news)]


def test_interleaved_arrivals_get_what_one_at_a_time_generation_gives(family):
    """Ten requests of different prompt and output lengths arrive while others run, in a server with 3 slots and
    7-token prefill chunks: every row joins and leaves the batch mid-way, prompts are prefilled in pieces between
    decode steps, rows move when others finish. Greedy outputs equal generating each prompt alone."""
    name, info, session = family
    prompts, news = _requests(0, 10)
    reference = _alone(session, info, prompts, news)
    options = ContinuousBatching(max_sequences=3, max_length=MAX_LENGTH, prefill_chunk=7, prefix_cache_bytes=0)
    with GenerationServer(session, info, options) as server:
        streams, resume = [], None
        for prompt, new in zip(prompts, news):  # each arrives while the one before is held at its first token
            stream, resume = _submit_held(server, prompt, new, release=resume)
            streams.append(stream)
        resume.set()
        outputs = [s.result(60) for s in streams]
        stats = server.stats()
    assert outputs == reference
    assert [len(o) for o in outputs] == news
    assert all(s.finish_reason == "length" for s in streams)
    # the batch really was shared: fewer decode steps than tokens, and prompts over 7 tokens took several chunks
    assert stats["steps"] < sum(news) - len(news)
    assert stats["prefill_chunks"] > len(prompts)
    assert stats["generated_tokens"] == sum(news) and stats["slots_in_use"] == 0


def test_the_prefix_cache_changes_nothing_but_the_work(family):
    """Prompts sharing a 24-token start: the second wave starts from cached blocks (cached_tokens, hits) and gives
    the same tokens as the server without a prefix cache."""
    name, info, session = family
    rng = np.random.default_rng(1)
    shared = [1] + rng.integers(3, 96, size=23).tolist()
    prompts = [shared + rng.integers(3, 96, size=int(n)).tolist() for n in (1, 5, 9, 3)]
    news = [12, 7, 15, 9]
    plain = ContinuousBatching(max_sequences=2, max_length=MAX_LENGTH, prefix_cache_bytes=0)
    cached = ContinuousBatching(max_sequences=2, max_length=MAX_LENGTH, prefix_block=8)
    with GenerationServer(session, info, plain) as server:
        reference = [server.submit(p, n, ignore_eos=True).result(60) for p, n in zip(prompts, news)]
    with GenerationServer(session, info, cached) as server:
        first = server.submit(prompts[0], news[0], ignore_eos=True)
        assert first.result(60) == reference[0] and first.cached_tokens == 0
        streams = [server.submit(p, n, ignore_eos=True) for p, n in zip(prompts, news)]
        outputs = [s.result(60) for s in streams]
        stats = server.stats()["prefix_cache"]
    assert outputs == reference
    assert [s.cached_tokens for s in streams] == [24, 24, 24, 24]  # the shared start's three 8-token blocks
    assert stats["lookups"] == 5 and stats["hits"] == 4 and stats["hit_tokens"] == 96
    assert stats["bytes"] <= stats["capacity"]


def test_the_prefix_cache_is_bounded_and_evicts_leaves_first():
    block, entry = 4, np.ones((2, 1, 4, 8), np.float32)  # 256 bytes per block
    cache = PrefixCache(capacity=3 * entry.nbytes, block=block)
    read = lambda a, b: entry  # noqa: E731 - the values do not matter here
    assert cache.insert(list(range(12)), read) == 3
    assert len(cache.lookup(list(range(13)))) == 3
    assert cache.insert([0, 1, 2, 3, 50, 51, 52, 53], read) == 1  # shares the first block: one new block
    assert cache.bytes <= cache.capacity and cache.stats()["evicted"] == 1
    assert len(cache.lookup(list(range(13)))) == 2  # the old chain lost its leaf, not its root
    assert len(cache.lookup([0, 1, 2, 3, 50, 51, 52, 53, 9])) == 2
    assert len(cache.lookup([7, 1, 2, 3, 4])) == 0  # another first token: another chain
    assert cache.insert([90, 91, 92, 93], lambda a, b: np.ones((2, 1, 4, 1000), np.float32)) == 0  # over capacity


def test_a_seeded_sampled_request_gives_the_same_text_alone_and_in_a_batch(family):
    name, info, session = family
    prompts, _ = _requests(2, 4)
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    generator = Generator(session, info, MAX_LENGTH)
    alone = generator.generate([prompts[0]], 20, sampling, ignore_eos=True)[0]
    with GenerationServer(session, info, ContinuousBatching(max_sequences=4, max_length=MAX_LENGTH)) as server:
        streams = [server.submit(p, 20, Sampling(temperature=0.9, top_k=20, top_p=0.95, seed=7 + k), ignore_eos=True)
                   for k, p in enumerate(prompts)]
        assert streams[0].result(60) == alone
        assert len({tuple(s.result(60)) for s in streams}) > 1  # other seeds, other texts


def test_a_cancelled_request_frees_its_slot_at_the_next_step(family):
    name, info, session = family
    prompts, _ = _requests(3, 2)
    with GenerationServer(session, info, ContinuousBatching(max_sequences=1, max_length=MAX_LENGTH)) as server:
        long, resume = _submit_held(server, prompts[0], MAX_LENGTH - len(prompts[0]))
        waiting = server.submit(prompts[1], 5, ignore_eos=True)
        long.cancel()
        resume.set()
        assert waiting.result(60) == _alone(session, info, prompts[1:], [5])[0]
        # the step that handed over the prompt's token also decodes one more; the next step frees the slot
        assert long.finish_reason == "cancelled" and len(long.tokens) == 2
        with server._cond:  # the worker cannot admit it in between
            queued = server.submit(prompts[1], 40, ignore_eos=True)
            queued.cancel()  # cancelled before it ran: it leaves the queue
        queued_done = _wait(lambda: queued.done and server.stats()["cancelled"] == 2)
        stats = server.stats()
    assert queued_done and queued.finish_reason == "cancelled"
    assert stats["cancelled"] == 2 and stats["slots_in_use"] == 0


def test_a_full_queue_refuses_and_a_request_past_its_deadline_is_not_run(family):
    name, info, session = family
    prompts, _ = _requests(4, 3)
    options = ContinuousBatching(max_sequences=1, max_length=MAX_LENGTH, max_queue=1, prefix_cache_bytes=0)
    with GenerationServer(session, info, options) as server:
        running, resume = _submit_held(server, prompts[0], MAX_LENGTH - len(prompts[0]))
        expires = server.submit(prompts[1], 5, timeout_ms=1)
        with pytest.raises(Overloaded, match="queue is full"):
            server.submit(prompts[2], 5)
        time.sleep(0.01)
        resume.set()
        with pytest.raises(DeadlineExceeded, match="deadline"):
            expires.result(60)
        running.result(60)
        stats = server.stats()
    assert stats["rejected"] == 1 and stats["deadline_exceeded"] == 1
    assert expires.tokens == [] and expires.first_token_at is None


@pytest.mark.parametrize("prompt, new, message", [
    ([], 5, "empty"), ([1, 500], 5, "outside the vocabulary"), ([1] * 60, 10, "longer than the max length"),
    ([1, 5], 0, "at least 1")])
def test_bad_requests_fail_alone_with_the_reason(family, prompt, new, message):
    name, info, session = family
    with GenerationServer(session, info, ContinuousBatching(max_length=MAX_LENGTH)) as server:
        good = server.submit([1, 5, 6], 4, ignore_eos=True)
        with pytest.raises(GenerationError, match=message):
            server.submit(prompt, new)
        assert len(good.result(60)) == 4


def test_the_kv_budget_sets_the_slots_and_a_budget_too_small_is_refused(family):
    name, info, session = family
    slot = len(info.past_names) * info.kv_heads * MAX_LENGTH * info.head_dim * 4
    server = GenerationServer(session, info, ContinuousBatching(max_length=MAX_LENGTH, kv_bytes=4 * slot))
    assert server.slots == 3  # one row is the prefill's staging
    server.close()
    with pytest.raises(UsageError, match="holds no sequence"):
        GenerationServer(session, info, ContinuousBatching(max_length=MAX_LENGTH, kv_bytes=slot))


def test_a_long_prefill_is_cut_between_the_running_sequences_steps():
    """While a 40-token prompt is prefilled in 4-token chunks, a running sequence keeps getting tokens: one per
    chunk, not none until the whole prompt is done."""
    info, _, _, path = family_ort("llama")
    session = create_session(path, 1, optimize=True)
    options = ContinuousBatching(max_sequences=2, max_length=MAX_LENGTH, prefill_chunk=4, prefix_cache_bytes=0)
    with GenerationServer(session, info, options) as server:
        running, resume = _submit_held(server, [1, 5, 6], 50)
        late = server.submit([1] + list(range(10, 49)), 5, ignore_eos=True)
        resume.set()
        late.result(60)
        during = [t for t in running.times if late.admitted <= t <= late.first_token_at]
        running.result(60)
    assert len(during) >= 8  # 10 chunks; a token after most of them


@pytest.mark.parametrize("chunk", [12, 8])
def test_prompts_arriving_together_share_one_steps_prefill_budget(chunk):
    """Three 4-token prompts queued at once: with a 12-token budget all three get their first token before any
    gets its second (one step's prefill); with 8 the third does not fit and waits for the step after, and no
    call computes a fragment of it. Their tokens are what each gives alone."""
    info, _, _, path = family_ort("llama")
    session = create_session(path, 1, optimize=True)
    prompts = [[1, 7, 8, 9], [1, 10, 11, 12], [1, 13, 14, 15]]
    alone = _alone(session, info, prompts, [6, 6, 6])
    options = ContinuousBatching(max_sequences=4, max_length=MAX_LENGTH, prefill_chunk=chunk, prefix_cache_bytes=0)
    with GenerationServer(session, info, options) as server:
        with server._cond:  # the worker sees all three in one look at the queue
            streams = [server.submit(p, 6, ignore_eos=True) for p in prompts]
        got = [s.result(60) for s in streams]
        chunks = server.stats()["prefill_chunks"]
    assert got == alone
    assert chunks == 3
    firsts, seconds = [s.times[0] for s in streams], [s.times[1] for s in streams]
    if chunk == 12:
        assert max(firsts) < min(seconds)
    else:
        assert max(firsts[:2]) < min(seconds) and firsts[2] > seconds[0]


def _submit_held(server: GenerationServer, prompt: list[int], new: int, release: threading.Event | None = None):
    """Submits ``prompt`` so that the worker, right after handing it its first token, waits until the returned
    event is set: what the test does next happens while that request runs, however late this thread is scheduled
    (a 2-core CI machine once let the worker finish a 40-token request before the test's thread woke up from
    reading its first token). The hook is the one ``tokens_async`` wakes its loop with; the server's lock is held
    until it is in place, so the worker cannot admit the request before. ``release``: the event of a request held
    before, set once this one is queued."""
    resume = threading.Event()
    with server._cond:
        stream = server.submit(prompt, new, ignore_eos=True)
        stream._wakers.append(lambda: len(stream.tokens) == 1 and resume.wait(20))
    if release is not None:
        release.set()
    assert _wait(lambda: stream.tokens)  # the worker is in the hook (or about to be) and stays there
    return stream, resume


def _wait(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_streams_iterate_tokens_as_they_come_from_threads_and_asyncio(family):
    import asyncio

    name, info, session = family
    with GenerationServer(session, info, ContinuousBatching(max_length=MAX_LENGTH)) as server:
        expected = server.submit([1, 5, 6, 7], 12, ignore_eos=True).result(60)
        got = {}

        def worker():
            got["thread"] = list(server.submit([1, 5, 6, 7], 12, ignore_eos=True))
        thread = threading.Thread(target=worker)
        thread.start()

        async def consume():
            return [t async for t in server.submit([1, 5, 6, 7], 12, ignore_eos=True).tokens_async()]
        got["async"] = asyncio.run(consume())
        thread.join(60)
    assert got == {"thread": expected, "async": expected}
