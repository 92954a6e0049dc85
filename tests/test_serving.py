"""The serving layer (``engines.runtime.scheduler``): dynamic batching that splits results back exactly,
padding by sequence length, admission control, degradation, the circuit breaker, the response cache,
``close()`` and the async API. Real bundles and real ONNX Runtime throughout."""

import asyncio
import json
import shutil
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.build import BuildRequest, ProfileOptions, build
from engines.runtime import Batching, load, schedule
from engines.runtime.cache import ResponseCache
from foundation.errors import DeadlineExceeded, InferenceError, Overloaded, RuntimeInputError, UsageError

pytestmark = pytest.mark.xdist_group("serving")  # one worker builds the module's bundles (--dist loadgroup)

BERT = ("input_ids:int64:[batch=1..8@2,seq=2..24@8]:1..30522", "attention_mask:int64:[batch,seq]:1..2")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def mlp(root):
    return build(
        BuildRequest(
            "mlp", out=root / "mlp", build_root=root, shapes=ProfileOptions(profiles=("batch=1..4@2", "batch=5..16@8"))
        )
    ).out


@pytest.fixture(scope="module")
def slow(root):
    """resnet18 at 128x128: batch 8 takes tens of milliseconds on these CPUs, long enough to queue behind."""
    return build(BuildRequest("resnet18", out=root / "resnet", inputs=("x:float32:[batch=1..8@1,3,128,128]",),
                              build_root=root)).out


def _running(server, batches=1):
    """Wait until the worker has started ``batches`` batches (the queue is then empty again)."""
    deadline = time.monotonic() + 30
    while server.stats()["batches"] < batches and time.monotonic() < deadline:
        time.sleep(0.0005)


def _hold_next_batch(server, until=lambda: False) -> threading.Event:
    """The runner's next batch waits inside its ``infer`` until the returned event is set (or ``until()``): the
    requests a test queues behind it meet a busy worker however late the test's thread is scheduled (a batch of 8
    at 128 x 128 takes ~0.1 s; a loaded 2-core machine can be that late). The real ``infer`` runs it after."""
    release, real = threading.Event(), server.runner.infer

    def infer(feeds):
        server.runner.infer = real
        end = time.monotonic() + 60
        while not (release.is_set() or until()) and time.monotonic() < end:
            time.sleep(0.001)
        return real(feeds)

    server.runner.infer = infer
    return release


def _x(seed, batch=1, width=64):
    return np.random.default_rng(seed).standard_normal((batch, width)).astype(np.float32)


def test_many_threads_each_get_exactly_the_unbatched_result_for_their_own_input(mlp):
    plain = load(mlp)
    expected = {i: plain.infer({"x": _x(i, 1 + i % 3)})["logits"] for i in range(96)}
    got = {}
    with schedule(mlp, batching=Batching(max_delay_ms=5)) as server:
        def worker(t):
            for i in range(t, 96, 8):
                got[i] = server.infer({"x": _x(i, 1 + i % 3)})["logits"]

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        stats = server.stats()
    assert set(got) == set(expected)
    for i in expected:
        np.testing.assert_allclose(got[i], expected[i], rtol=1e-5, atol=1e-6)
    assert stats["requests"] == 96 and stats["mean_batch"] > 1  # batches really formed
    assert max(stats["batch_sizes"]) <= 16 and sum(k * v for k, v in stats["batch_sizes"].items()) == \
        sum(1 + i % 3 for i in range(96))


def test_batches_never_exceed_max_batch_or_leave_the_profiles(mlp):
    with schedule(mlp, batching=Batching(max_batch=4, max_delay_ms=5)) as server:
        threads = [threading.Thread(target=lambda i=i: server.infer({"x": _x(i, 1 + i % 4)})) for i in range(40)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        sizes = server.stats()["batch_sizes"]
    assert sizes and max(sizes) <= 4
    with schedule(mlp, batching=Batching()) as server:
        assert server.layout.max_batch == 16  # the largest batch a profile takes
        with pytest.raises(RuntimeInputError, match="allowed 1..16"):
            server.infer({"x": _x(0, 17)})


def test_requests_of_different_lengths_share_a_batch_by_padding_and_get_their_own_outputs_back(root):
    bundle = build(BuildRequest("bert_tiny", out=root / "bert", inputs=BERT, build_root=root)).out
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(12):
        n = int(rng.integers(2, 25))
        requests.append({"input_ids": rng.integers(1, 30522, (1, n)).astype(np.int64),
                         "attention_mask": np.ones((1, n), np.int64)})
    plain = load(bundle)
    expected = [plain.infer(r) for r in requests]
    with schedule(bundle, batching=Batching(max_delay_ms=20)) as server:
        assert server.layout.pad == {"seq": {"input_ids": 0, "attention_mask": 0}}

        async def all_at_once():
            return await asyncio.gather(*(server.infer_async(r) for r in requests))

        got = asyncio.run(all_at_once())
        assert server.stats()["mean_batch"] > 1
    for r, e, g in zip(requests, expected, got):
        assert g["last_hidden_state"].shape == e["last_hidden_state"].shape == (1, r["input_ids"].shape[1], 128)
        np.testing.assert_allclose(g["pooler_output"], e["pooler_output"], atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(g["last_hidden_state"], e["last_hidden_state"], atol=1e-4, rtol=1e-3)


def test_bundles_without_a_dynamic_batch_dim_are_refused(root):
    static = build(BuildRequest("mlp", out=root / "static", build_root=root, shapes=ProfileOptions(static=True))).out
    with pytest.raises(UsageError, match="no dynamic leading"):
        schedule(static, batching=Batching())


def test_a_full_queue_refuses_and_a_late_request_misses_its_deadline(slow):
    big = np.random.default_rng(0).standard_normal((8, 3, 128, 128)).astype(np.float32)
    one = big[:1]
    with schedule(slow, batching=Batching(max_queue=1, max_delay_ms=0)) as server:
        release = _hold_next_batch(server)
        first = server.submit({"x": big})
        _running(server)  # the worker runs it (a full batch of 8): the queue is empty again
        late = server.submit({"x": one}, timeout_ms=1)
        with pytest.raises(Overloaded, match="queue is full"):
            server.submit({"x": one})
        time.sleep(0.01)
        release.set()
        first.result()
        with pytest.raises(DeadlineExceeded, match="deadline"):
            late.result()
        stats = server.stats()
    assert stats["rejected"] == 1 and stats["deadline_exceeded"] == 1


def test_overload_degrades_to_a_lighter_bundle_of_the_same_model(slow, root, mlp):
    # a copy of the bundle stands in for a lighter build of the same model (its INT8 bundle in production)
    lighter = root / "resnet-copy"
    shutil.copytree(slow, lighter)
    big = np.random.default_rng(0).standard_normal((8, 3, 128, 128)).astype(np.float32)
    with schedule(slow, batching=Batching(max_queue=1, max_delay_ms=0), degrade_to=lighter) as server:
        release = _hold_next_batch(server)
        server.submit({"x": big})
        _running(server)
        server.submit({"x": big[:1]})
        degraded = server.infer({"x": big[1:2]})  # the queue is full: the lighter bundle answers at once
        assert server.stats()["degraded"] == 1
        release.set()
    np.testing.assert_array_equal(degraded["logits"], load(lighter).infer({"x": big[1:2]})["logits"])
    with pytest.raises(UsageError, match="same tensors"):
        schedule(slow, batching=Batching(), degrade_to=mlp)


def _table_bundle(root, name, rows):
    """y = Gather(table, idx) + x: ONNX Runtime raises for an index past the table (the marked input)."""
    table = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["g"], axis=0), helper.make_node("Add", ["g", "x"], ["y"])],
        "t",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ("batch", 4)),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ("batch",)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("batch", 4))],
        [numpy_helper.from_array(table, "table")],
    )
    path = root / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return build(BuildRequest(str(path), out=root / name, inputs=("x:float32:[batch=1..8@2,4]",
                                                                 "idx:int64:[batch]:0..8"), build_root=root)).out


def test_the_circuit_breaker_routes_to_the_fallback_during_its_cooldown_and_one_bad_input_fails_alone(root):
    primary, spare = _table_bundle(root, "table8", 8), _table_bundle(root, "table128", 128)
    x = np.ones((1, 4), np.float32)
    good, bad = np.array([3], np.int64), np.array([100], np.int64)
    options = Batching(breaker_failures=2, breaker_cooldown_s=2.0, max_delay_ms=5)  # room for a slow machine
    with schedule(primary, check_values=False, batching=options, degrade_to=spare) as server:
        results = {}

        def call(i):
            try:
                results[i] = server.infer({"x": x, "idx": bad if i == 0 else good})["y"]
            except InferenceError as exc:
                results[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert isinstance(results[0], InferenceError) and all(np.array_equal(results[i], [[13, 14, 15, 16]])
                                                              for i in range(1, 6))
        server.infer({"x": x, "idx": good})  # a success: no failures in a row
        for _ in range(2):  # the second failure in a row opens the breaker
            with pytest.raises(InferenceError):
                server.infer({"x": x, "idx": bad})
        assert server.stats()["breaker"]["open"]
        np.testing.assert_array_equal(server.infer({"x": x, "idx": bad})["y"], [[401, 402, 403, 404]])  # the spare
        time.sleep(2.1)
        with pytest.raises(InferenceError):
            server.infer({"x": x, "idx": bad})  # cooled down: the primary again
        stats = server.stats()
    assert stats["breaker"]["opened"] == 1 and stats["breaker"]["fallback_batches"] == 1


def test_the_cache_returns_copies_keys_on_dtype_and_shape_and_evicts_by_bytes(mlp):
    with schedule(mlp, batching=Batching(), cache_bytes=1 << 20) as server:
        a = server.infer({"x": _x(1)})
        a["logits"][:] = 1e9  # what a caller does with its result cannot reach the cache
        b = server.infer({"x": _x(1)})
        assert not np.any(b["logits"] == 1e9)
        np.testing.assert_array_equal(b["logits"], load(mlp).infer({"x": _x(1)})["logits"])
        stats = server.stats()["cache"]
    assert stats["hits"] == 1 and stats["misses"] == 1
    cache = ResponseCache(max_bytes=300, model_sha256="m")
    x = np.zeros((2, 4), np.float32)
    assert cache.key({"x": x}) != cache.key({"x": x.reshape(4, 2)}) != cache.key({"x": x.view(np.int32)})
    assert cache.key({"x": x}) != ResponseCache(300, "other").key({"x": x})
    for i in range(5):
        cache.put(bytes([i]) * 32, {"y": np.zeros(16, np.float32)})  # 96 bytes each
    assert cache.stats()["evictions"] == 2 and cache.stats()["bytes"] <= 300


def test_close_drains_or_fails_pending_requests_and_leaves_no_thread(slow):
    big = np.random.default_rng(0).standard_normal((8, 3, 128, 128)).astype(np.float32)
    server = schedule(slow, batching=Batching(max_delay_ms=0))
    _hold_next_batch(server, until=lambda: server._closing)  # runs once close() has failed the queue
    first = server.submit({"x": big})
    _running(server)
    pending = [server.submit({"x": big[i:i + 1]}) for i in range(3)]
    server.close(drain=False)
    assert first.result()["logits"].shape == (8, 1000)
    for f in pending:
        with pytest.raises(InferenceError, match="closed with 3 request"):
            f.result()
    assert not any(t.name == "planforge-batcher" and t.is_alive() for t in threading.enumerate() if t is server._worker)
    with pytest.raises(UsageError, match="closed"):
        server.infer({"x": big[:1]})
    drained = schedule(slow, batching=Batching(max_delay_ms=0))
    futures = [drained.submit({"x": big[i:i + 1]}) for i in range(4)]
    drained.close()
    assert all(f.result()["logits"].shape == (1, 1000) for f in futures) and not drained._worker.is_alive()


def test_queue_batch_and_cache_metrics_reach_prometheus_with_the_bundle_label(mlp):
    prometheus_client = pytest.importorskip("prometheus_client")
    labels = {"bundle": "mlp"}

    def value(name):
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    before = {n: value(n) for n in ("planforge_batch_size_count", "planforge_cache_hits_total",
                                    "planforge_cache_misses_total", "planforge_queue_wait_seconds_count")}
    with schedule(mlp, batching=Batching(), cache_bytes=1 << 20) as server:
        for _ in range(3):
            server.infer({"x": _x(7)})
        stats = server.stats()
    assert value("planforge_cache_misses_total") == before["planforge_cache_misses_total"] + 1
    assert value("planforge_cache_hits_total") == before["planforge_cache_hits_total"] + 2
    assert value("planforge_batch_size_count") == before["planforge_batch_size_count"] + 1
    assert value("planforge_queue_wait_seconds_count") == before["planforge_queue_wait_seconds_count"] + 1
    assert stats["cache"]["hit_ratio"] == pytest.approx(2 / 3) and stats["queue_depth"] == 0
    assert prometheus_client.REGISTRY.get_sample_value("planforge_queue_depth", labels) == 0


def test_bench_serve_writes_rows_for_every_mode_and_level_with_the_machine(mlp, tmp_path, run_cli):
    code, out, err = run_cli("bench-serve", mlp, "--concurrency", "1,4", "--duration", "0.3", "-o", tmp_path / "b",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    modes = {(r["mode"], r["transport"], r["concurrency"]) for r in doc["rows"]}
    assert modes == {(m, t, c) for m, t in (("unbatched", "in-process"), ("batched", "in-process"),
                                            ("batched+cache", "in-process"), ("ceiling", "in-process"),
                                            ("batched", "http")) for c in (1, 4)}  # http: planforge serve, /v2
    for r in doc["rows"]:
        assert r["requests"] > 0 and r["throughput_per_s"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert all(r["mean_batch"] == 16 for r in doc["rows"] if r["mode"] == "ceiling")  # the largest batch it takes
    assert any(r["cache_hit_ratio"] > 0.5 for r in doc["rows"] if r["mode"] == "batched+cache")  # Zipf repeats
    env = doc["environment"]
    assert env["cpu_isa"] and env["cpu_model"] and doc["threads"] >= 1 and "start" in env["load_1min"]
    assert (tmp_path / "b" / "bench-serve.json").is_file() and (tmp_path / "b" / "bench-serve.png").stat().st_size > 0
    open_loop = json.loads(run_cli("bench-serve", mlp, "--concurrency", "2", "--duration", "0.3", "--rate", "200",
                                   "--no-http", "-o", tmp_path / "o", "--json")[1])
    assert open_loop["open_loop_rate"] == 200 and 20 <= next(r for r in open_loop["rows"]
                                                             if r["mode"] == "batched")["requests"] <= 120
    code, _, err = run_cli("bench-serve", mlp, "--concurrency", "1,x")
    assert code == 2 and "--concurrency" in err


def test_a_dim_that_stands_twice_in_an_output_is_padded_and_trimmed_on_both_axes():
    """An attention map [batch, seq, seq] comes back [1, L, L] for each request, not [1, L, longest]."""
    from engines.runtime.batching import layout
    from foundation.spec import InputSpec, OutputSpec

    spec = InputSpec.parse(
        ["input_ids:int64:[batch=1..8@2,seq=1..16@8]:0..100", "attention_mask:int64:[batch,seq]:0..2"]
    )
    outputs = [OutputSpec("attn", "float32", ("batch", "seq", "seq")), OutputSpec("pooled", "float32", ("batch", 4))]
    plan = layout(spec, outputs, Batching(), None)
    requests = [
        {"input_ids": np.full((1, n), 7, np.int64), "attention_mask": np.ones((1, n), np.int64)} for n in (3, 5)
    ]
    merged = plan.merge(requests)
    assert merged["input_ids"].shape == (2, 5) and merged["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    attn = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)
    parts = plan.split({"attn": attn, "pooled": np.zeros((2, 4), np.float32)}, [1, 1],
                       [plan.lengths(r) for r in requests])
    assert parts[0]["attn"].shape == (1, 3, 3) and parts[1]["attn"].shape == (1, 5, 5)
    np.testing.assert_array_equal(parts[0]["attn"][0], attn[0, :3, :3])
    assert plan.key(requests[0]) == plan.key({k: np.ones((1, 4), np.int64) for k in requests[0]})  # one bucket: 3..4
    assert plan.key(requests[0]) != plan.key(requests[1])  # 5 is in the next power-of-two bucket


def test_a_request_no_profile_takes_is_refused_at_submit_and_a_cancelled_one_does_not_disturb_its_batch(mlp, slow):
    with schedule(mlp, batching=Batching()) as server:
        with pytest.raises(RuntimeInputError):
            server.infer({"x": _x(0, 17)})
    big = np.random.default_rng(0).standard_normal((8, 3, 128, 128)).astype(np.float32)
    with schedule(slow, batching=Batching(max_delay_ms=0)) as server:
        release = _hold_next_batch(server)
        server.submit({"x": big})
        _running(server)
        cancelled = server.submit({"x": big[:1]})
        kept = server.submit({"x": big[1:2]})
        assert cancelled.cancel()
        release.set()
        assert kept.result()["logits"].shape == (1, 1000) and cancelled.cancelled()


def test_trailing_padding_every_row_masks_is_cut_before_running_and_comes_back_as_zeros(root):
    """A batch of short sentences padded to 24 runs at its longest real length (9); valid positions get
    what the model gives the sentence alone, masked positions zeros; trim_padding=False changes nothing."""
    bundle = build(BuildRequest("bert_tiny", out=root / "bert-pad", build_root=root,
                                inputs=("input_ids:int64:[batch=1..8@2,seq=2..24@8]:0..30522",
                                        "attention_mask:int64:[batch,seq]:0..2"))).out
    rng = np.random.default_rng(1)
    lengths = (5, 9, 3)
    mask = np.zeros((3, 24), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    feeds = {"input_ids": rng.integers(1, 30522, (3, 24)).astype(np.int64) * mask, "attention_mask": mask}
    plain = load(bundle)
    padded = plain.infer(feeds)
    with schedule(bundle, batching=Batching()) as server:
        trimmed, before = server.layout.trim(feeds)
        assert {k: v.shape for k, v in trimmed.items()} == {"input_ids": (3, 9), "attention_mask": (3, 9)}
        assert before == {"seq": 24}
        out = server.infer(feeds)
    assert out["last_hidden_state"].shape == (3, 24, 128) and out["pooler_output"].shape == (3, 128)
    for i, n in enumerate(lengths):
        alone = plain.infer({k: v[i:i + 1, :n] for k, v in feeds.items()})
        np.testing.assert_allclose(out["last_hidden_state"][i, :n], alone["last_hidden_state"][0], atol=1e-5)
        np.testing.assert_allclose(out["last_hidden_state"][i, :n], padded["last_hidden_state"][i, :n], atol=1e-5)
        assert not np.any(out["last_hidden_state"][i, 9:])
    np.testing.assert_allclose(out["pooler_output"], padded["pooler_output"], atol=1e-5)
    with schedule(bundle, batching=Batching(trim_padding=False)) as server:
        np.testing.assert_array_equal(server.infer(feeds)["last_hidden_state"], padded["last_hidden_state"])
    left = {k: v[:, ::-1].copy() for k, v in feeds.items()}  # left padding: nothing trailing to cut
    assert server.layout.trim(left)[0]["input_ids"].shape == (3, 24)
    one = {"input_ids": feeds["input_ids"][:1] * 0 + 7, "attention_mask": np.eye(1, 24, dtype=np.int64)}
    with schedule(bundle, batching=Batching()) as server:  # trimmed to 1 the request would be below the spec's seq=2..
        assert server._trimmed(one)[1] is None
        np.testing.assert_array_equal(server.infer(one)["last_hidden_state"], plain.infer(one)["last_hidden_state"])
