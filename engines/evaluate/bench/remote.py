"""What the serving benchmarks need to measure over HTTP: ``planforge serve`` (or a peer's server) started in a
subprocess on a free loopback port and waited for, and an Open Inference Protocol client speaking the binary
tensor extension as Triton's clients and ``perf_analyzer`` do (the JSON header, then raw tensors), on one
keep-alive connection per thread. Written on ``http.client`` rather than ``tritonclient``: the benchmark runs
where only planforge is installed, and one connection per client thread is what the measurement wants. (Not
named ``http``: ``llm_worker.py`` runs as a script from this folder, where that name would shadow the
standard library's.)"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from foundation.errors import Overloaded, UsageError

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(process: subprocess.Popen, port: int, path: str, name: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise UsageError(f"{name} exited with {process.returncode}: {process.stderr.read()[-600:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            status = connection.getresponse().status
            connection.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise UsageError(f"{name} did not answer {path} within {timeout:.0f} s")


def start_planforge(bundles: list[str], *options: str) -> tuple[subprocess.Popen, int]:
    """``planforge serve BUNDLES OPTIONS`` on a free port, ready; stop it with ``stop``."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "engines.cli", "serve", *bundles, "--port", str(port), *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_ready(process, port, "/v2/health/live", "planforge serve")
    except BaseException:
        stop(process)
        raise
    return process, port


def stop(process: subprocess.Popen, timeout: float = 60) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.returncode


class KserveClient:
    """``infer(feeds)`` over ``/v2/models/{name}/infer`` with binary inputs and outputs; 429 is ``Overloaded``."""

    def __init__(self, port: int, name: str):
        self.port, self.path = port, f"/v2/models/{name}/infer"
        self._local = threading.local()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64",
                 np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}
        arrays = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        header = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": names[v.dtype],
                                         "parameters": {"binary_data_size": v.nbytes}} for k, v in arrays.items()],
                             "parameters": {"binary_data_output": True}}).encode()
        body = header + b"".join(v.tobytes() for v in arrays.values())
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        connection.request("POST", self.path, body, {"Inference-Header-Content-Length": str(len(header)),
                                                     "Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        data = response.read()
        if response.status == 429:
            raise Overloaded("the server's queue is full")
        if response.status != 200:
            raise UsageError(f"the server answered {response.status}: {data[:300]!r}")
        size = int(response.getheader("Inference-Header-Content-Length") or len(data))
        doc, offset, out = json.loads(data[:size]), size, {}
        kinds = {v: k for k, v in names.items()}
        for item in doc["outputs"]:
            n = item["parameters"]["binary_data_size"]
            out[item["name"]] = np.frombuffer(data[offset:offset + n], kinds[item["datatype"]]).reshape(item["shape"])
            offset += n
        return out
