"""Activation ranges for INT8, from calibration data, with ONNX Runtime's calibrators.

Methods: ``max`` (min-max), ``percentile`` (99.99th of |x|), ``entropy`` (KL) are ONNX Runtime's
``MinMaxCalibrater``, ``PercentileCalibrater`` and ``EntropyCalibrater``. ``mse`` is written here
(ONNX Runtime has no MSE calibrator): it reuses the percentile calibrator's histograms of |x| and
picks the symmetric INT8 threshold t that minimizes the expected squared error of
``clip(round(x / s), -127, 127) * s`` with ``s = t / 127`` over the histogram.

ONNX Runtime's calibrators write an augmented model to disk; that happens in a temporary
directory, never in the working directory. Ranges are plain ``{tensor: (lo, hi)}`` dicts, saved
with the hashes of the graph and the data so a later build reuses them only when both match.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import calibrate as ort_calibrate

from foundation.errors import CalibrationError

logger = logging.getLogger(__name__)

METHODS = ("max", "percentile", "entropy", "mse")
PERCENTILE = 99.99
CACHE_VERSION = 1


class _Reader(ort_calibrate.CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def data_sha256(batches: Iterable[dict[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = np.ascontiguousarray(batch[name])
            digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def graph_sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _make_calibrator(path: Path, augmented: Path, method: str, op_types):
    kinds = {
        "max": ort_calibrate.CalibrationMethod.MinMax,
        "entropy": ort_calibrate.CalibrationMethod.Entropy,
        "percentile": ort_calibrate.CalibrationMethod.Percentile,
        "mse": ort_calibrate.CalibrationMethod.Percentile,
    }
    options = {"percentile": PERCENTILE, "symmetric": True} if method in ("percentile", "mse") else {}
    return ort_calibrate.create_calibrator(path, op_types, augmented_model_path=str(augmented),
                                           calibrate_method=kinds[method], extra_options=options)


def calibrate(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], method: str = "max",
              op_types: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Ranges of every float activation read by ``op_types`` (all nodes when None)."""
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if not batches:
        raise CalibrationError("no calibration batches: give at least one sample")
    with tempfile.TemporaryDirectory(prefix="planforge-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path))
        calibrator = _make_calibrator(path, Path(tmp) / "augmented.onnx", method, op_types)
        for batch in batches:  # one call per batch: the collectors stack a call's arrays, so shapes must agree
            calibrator.collect_data(_Reader([batch]))
        if method == "mse":
            histograms = calibrator.collector.histogram_dict
            return {name: mse_range(*histograms[name]) for name in histograms}
        data = calibrator.compute_data()
    ranges = {}
    for name, tensor in data.data.items():
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in tensor.range_value)
        ranges[name] = (lo, hi)
    return ranges


def mse_range(hist: np.ndarray, edges: np.ndarray, lo, hi) -> tuple[float, float]:
    """The symmetric range [-t, t] (cut to the observed [lo, hi]) that minimizes INT8 MSE."""
    centers = (edges[:-1] + edges[1:]).astype(np.float64) / 2
    counts = hist.astype(np.float64)
    if counts.sum() == 0 or centers[-1] <= 0:
        return float(lo), float(hi)
    best_t, best_err = float(edges[-1]), np.inf
    for t in np.linspace(edges[-1] / 64, edges[-1], 128):
        s = t / 127.0
        q = np.clip(np.round(centers / s), 0, 127) * s
        err = float((counts * (q - centers) ** 2).sum())
        if err < best_err:
            best_t, best_err = float(t), err
    return max(float(lo), -best_t), min(float(hi), best_t)


def save_ranges(path: Path, ranges_by_target: dict[str, dict], method: str, data_hash: str, samples: int) -> None:
    """calibration.json: reusable ranges per target graph."""
    payload = {"version": CACHE_VERSION, "method": method, "data_sha256": data_hash, "samples": samples,
               "targets": ranges_by_target}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def load_ranges(path: Path, target: str, graph_hash: str, data_hash: str, method: str) -> dict | None:
    """Cached ranges for ``target`` when the graph, the data and the method all match, else None."""
    try:
        payload = json.loads(Path(path).read_text())
        entry = payload["targets"][target]
        if (payload.get("version"), payload["method"], payload["data_sha256"], entry["graph_sha256"]) != (
                CACHE_VERSION, method, data_hash, graph_hash):
            return None
        return {name: (float(lo), float(hi)) for name, (lo, hi) in entry["ranges"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
