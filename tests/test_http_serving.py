"""``planforge serve`` as a process on a free loopback port, talked to by clients nobody here wrote: the
``openai`` package against ``/v1`` (a seeded LLaMA-style decoder bundle with a tokenizer and a chat template)
and ``tritonclient.http`` against ``/v2`` (an MLP bundle). What they get equals the in-process runtime; bad
requests, a missing key, a full queue, a missed deadline and a body too large get their status codes and
one message; SIGTERM lets in-flight streams finish and exits 0."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
tritonclient_http = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.xdist_group("http")  # one worker builds the module's bundles (make test: --dist loadgroup)

from decoders import tiny_llama  # noqa: E402

from engines.runtime import ContinuousBatching, GenerationServer, load  # noqa: E402
from engines.runtime.generate.text import Tokenizer  # noqa: E402
from foundation.errors import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from engines.build import BuildRequest, build
    from engines.cli import main

    root = tmp_path_factory.mktemp("http")
    _, _, tokenizer = tiny_llama(root)
    llm = root / "tiny"
    assert main(["build", str(root / "tiny-llama"), "-o", str(llm), "--max-length", "256", "-q"]) == 0
    mlp = build(BuildRequest("mlp", out=root / "mlp", build_root=root)).out
    return llm, mlp, tokenizer


class Server:
    """``planforge serve ARGS`` on a free loopback port, ready when /v2/health/live answers."""

    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "engines.cli", "serve", *args, "--port", str(self.port),
                                      "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if self.get("/v2/health/live")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not come up in 120 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict | None = None):
        return self.request("GET", path, None, headers)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, response.read(), response.headers  # case-insensitive
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(bundles):
    llm, mlp, _ = bundles
    started = Server(f"tiny={llm}", str(mlp), "--api-key", KEY, "--max-body-mb", "1")
    yield started
    assert started.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _in_process(bundle, ids, new):
    with load(bundle) as runner:
        return runner.generator().generate([ids], new)[0]


def test_openai_completions_give_what_the_runtime_generates(client, bundles):
    llm, _, _ = bundles
    tokenizer = Tokenizer(llm)
    ids = tokenizer.encode("w5 w6 w7 w8")
    expected = _in_process(llm, ids, 20)
    result = client.completions.create(model="tiny", prompt="w5 w6 w7 w8", max_tokens=20, temperature=0)
    assert result.choices[0].text == tokenizer.decode(expected)
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == len(expected)
    assert result.choices[0].finish_reason == ("length" if len(expected) == 20 else "stop")
    streamed = client.completions.create(model="tiny", prompt="w5 w6 w7 w8", max_tokens=20, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == result.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_openai_chat_renders_the_models_template_as_transformers_does(client, bundles):
    llm, _, tokenizer = bundles
    messages = [{"role": "user", "content": "w5 w6 w7"}, {"role": "assistant", "content": "w8"},
                {"role": "user", "content": "w9 w10"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    expected = _in_process(llm, ids, 12)
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert result.usage.prompt_tokens == len(ids)
    assert result.choices[0].message.content == Tokenizer(llm).decode(expected)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == result.choices[0].message.content


def test_a_repeated_long_prompt_starts_from_the_prefix_cache(client, server):
    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(4, 96, size=99)]
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert first.choices[0].text == second.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens == 96  # three 32-token blocks; the last token is run
    metrics = server.get("/metrics", AUTH)[1].decode()
    assert 'planforge_prefix_cache_hits_total{model="tiny"}' in metrics
    assert 'planforge_time_to_first_token_seconds_bucket{le="+Inf",model="tiny"}' in metrics
    for family in ("planforge_time_per_output_token_seconds", "planforge_tokens_per_second",
                   "planforge_kv_slots_in_use", "planforge_queue_length", "planforge_requests_rejected_total"):
        assert family in metrics


def test_tritonclient_gets_what_the_runtime_computes_in_binary_and_json(server, bundles):
    _, mlp, _ = bundles
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with load(mlp) as runner:
        expected = runner.infer({"x": x})["logits"]
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_model_ready("mlp", headers=AUTH)
    meta = client.get_model_metadata("mlp", headers=AUTH)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    for binary in (True, False):
        tensor = tritonclient_http.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        # a fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given
        result = client.infer("mlp", [tensor], outputs=[tritonclient_http.InferRequestedOutput("logits", binary)],
                              headers=dict(AUTH))
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    client.close()


def test_bad_requests_get_400_naming_the_field_and_never_a_traceback(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="w5", temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="max length 256"):
        client.completions.create(model="tiny", prompt=[1] * 250, max_tokens=10)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="nope", prompt="w5")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    status, body, _ = server.request("POST", "/v1/completions", b"{not json", AUTH)
    assert status == 400 and b"not JSON" in body
    x = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64", "data": [0.0] * 64}]}
    status, body, _ = server.request("POST", "/v2/models/mlp/infer", x, AUTH)
    assert status == 400 and json.loads(body)["error"].startswith("inputs[0] (x).datatype = 'FP64': expected FP32")
    x = {"inputs": [{"name": "x", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}
    status, body, _ = server.request("POST", "/v2/models/mlp/infer", x, AUTH)
    assert status == 400 and b"x" in body
    status, body, _ = server.request("POST", "/v2/models/tiny/infer", x, AUTH)
    assert status == 404 and b"served at /v1" in body
    # a body over --max-body-mb is refused from its declared length, before it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                    b"\r\nContent-Length: 2097152\r\n\r\n")
        assert raw.recv(200).startswith(b"HTTP/1.1 413 ")
    status, _, _ = server.get("/v2/models/mlp")  # no key
    assert status == 401
    for status, body, _ in [server.request("POST", "/v1/completions", {"model": "tiny", "prompt": 5}, AUTH)]:
        assert status == 400 and json.loads(body)["error"]["param"] == "prompt" and b"Traceback" not in body


def test_the_server_binds_loopback_only_by_default(server):
    port = f"{server.port:04X}"
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[1].endswith(":" + port) and line.split()[3] == "0A"]
    assert listening == ["0100007F:" + port]


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 240, "ignore_eos": True, "stream": True}
    for _ in range(5):  # the 240 tokens take ~0.1 s: a loaded machine may finish them before it sees the hang-up
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(body), {**AUTH, "Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            metrics = server.get("/metrics", AUTH)[1].decode()
            if 'planforge_kv_slots_in_use{model="tiny"} 0.0' in metrics:
                break
            time.sleep(0.1)
        assert 'planforge_kv_slots_in_use{model="tiny"} 0.0' in metrics
        if 'planforge_requests_cancelled_total{model="tiny"} 0.0' not in metrics:
            break
    assert 'planforge_requests_cancelled_total{model="tiny"} 0.0' not in metrics


def test_overload_answers_429_with_retry_after_and_a_missed_deadline_504(bundles):
    llm, _, _ = bundles
    server = Server(str(llm), "--max-sequences", "1", "--max-queue", "1", "--timeout-ms", "10")
    try:
        body = {"prompt": "w5 w6", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
        for _ in range(5):  # a burst of 8: one runs (~0.1 s), one waits past its 10 ms, the rest find the queue full
            results, barrier = [], threading.Barrier(8)

            def call(barrier=barrier, results=results):
                barrier.wait()
                results.append(server.request("POST", "/v1/completions", body))
            threads = [threading.Thread(target=call) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            statuses = sorted(r[0] for r in results)
            assert len(statuses) == 8 and set(statuses) <= {200, 429, 504} and 200 in statuses, statuses
            if 429 in statuses and 504 in statuses:  # a client thread scheduled late may miss both: burst again
                break
        assert 429 in statuses and 504 in statuses, statuses
        for status, payload, headers in results:
            if status == 429:
                assert headers["Retry-After"] == "1" and "queue is full" in json.loads(payload)["error"]["message"]
            if status == 504:
                assert "deadline" in json.loads(payload)["error"]["message"]
            assert b"Traceback" not in payload
    finally:
        assert server.stop() == 0


def test_sigterm_lets_in_flight_streams_finish_and_exits_0(bundles):
    llm, _, _ = bundles
    server = Server(str(llm))
    counts, errors = [], []

    def stream(started: threading.Event):
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            chunks = client.completions.create(prompt="w5 w6", max_tokens=200, extra_body={"ignore_eos": True},
                                               model="tiny", stream=True, stream_options={"include_usage": True})
            got = []
            for chunk in chunks:
                started.set()
                got.append(chunk)
            counts.append(got[-1].usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            started.set()
    events = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(target=stream, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60)
    code = server.stop()
    for t in threads:
        t.join(60)
    assert errors == [] and counts == [200, 200, 200]
    assert code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)


def test_runtime_load_gives_a_generation_server_for_a_decoder_bundle_only(bundles):
    llm, mlp, _ = bundles
    with load(llm, batching=ContinuousBatching(max_sequences=2)) as server:
        assert isinstance(server, GenerationServer) and server.max_length == 256
        alone = _in_process(llm, [1, 7, 8, 9], 10)
        assert server.generate([1, 7, 8, 9], 10) == alone
    with pytest.raises(UsageError, match="continuous batching is for decoder bundles"):
        load(mlp, batching=ContinuousBatching())


def test_bench_serve_on_a_decoder_gives_every_row_the_issue_names(bundles, tmp_path):
    """``bench-serve`` on the tiny decoder: continuous in-process and over HTTP, one-at-a-time, and the same
    requests with the prefix cache off; every row has the fields the JSON promises, every request was served,
    and the 40-token shared prefix was a prefix-cache hit for all but the first requests."""
    from engines.evaluate.bench.serve_llm import LlmServeBenchRequest, bench_serve_llm, check_request

    llm, _, _ = bundles
    request = LlmServeBenchRequest(llm, concurrency=(1, 2), requests=4, prompt_tokens=8, new_tokens=8,
                                   shared_prefix=40, threads=1, out=tmp_path)
    check_request(request)
    doc = bench_serve_llm(request)
    rows = doc["rows"]
    assert {(r["mode"], r["transport"], r["concurrency"]) for r in rows} == {
        (m, t, c) for c in (1, 2) for m, t in (("continuous", "in-process"), ("one-at-a-time", "in-process"),
                                               ("continuous", "http"))} | {("continuous", "in-process", 1)}
    for row in rows:
        assert row["requests"] == 4 and row["rejected"] == 0 and row["failed"] == 0, row
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"]
        assert row["tokens_per_s"] > 0
        if row.get("prefix_cache", True):  # each server's first request may miss; every later one hits
            assert row["prefix_hits"] >= row["requests"] - 1 and row["ttft_hit_p50_ms"] > 0
        else:
            assert row["prefix_hits"] == 0
    assert json.loads((tmp_path / "bench-serve.json").read_text())["rows"] == rows
    assert (tmp_path / "bench-serve.png").stat().st_size > 0
    with pytest.raises(UsageError, match="max length"):
        check_request(LlmServeBenchRequest(llm, prompt_tokens=200, new_tokens=100))
