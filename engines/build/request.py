"""What a build is asked for (``BuildRequest``, and the key that decides when a bundle is reused)
and what it returns."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from engines import __version__
from engines.bundle import SCHEMA_VERSION, Manifest
from engines.trt_build.builder import TrtOptions
from foundation.spec import InputSpec

PRECISIONS = ("fp32", "fp16", "int8")


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    model: str
    out: Path | None = None
    inputs: tuple[str, ...] = ()
    precision: str = "fp32"
    force: bool = False
    opset: int = 18
    exporter: str = "auto"
    parity_atol: float = 1e-4
    parity_rtol: float = 1e-3
    verify_passes: bool = True
    build_root: Path = Path("build")
    keep_fp32: tuple[str, ...] = ()
    skip_passes: tuple[str, ...] = ()  # pass names left out of both pipelines (--skip-pass)
    calib: str | None = None
    calib_method: str = "max"
    allow_random_calibration: bool = False
    budget: str | None = None
    state: tuple[str, ...] = ()  # --state OUT:IN: the INT8 budget runs its batches as a sequence
    metric_hook: str | None = None  # --metric file.py:function (an absolute path): a user metric as the budget
    ort_int8_form: str = "auto"  # auto: measured among this CPU class's non-saturating forms
    require_int8: tuple[str, ...] = ()  # trt, ort or all: a target that cannot be INT8 is an error, not float
    int8_time_limit: float | None = 900.0  # seconds for each target's fallback search (None: no limit)
    profiles: tuple[str, ...] = ()
    profiles_auto: str | None = None
    static: bool = False
    require_trt: bool = False
    trt: TrtOptions = TrtOptions()

    def key(self, source_sha256: str, spec: InputSpec) -> str:
        """What makes two builds the same: reuse a bundle only when this matches."""
        fields = {"model": self.model, "source_sha256": source_sha256, "inputs": str(spec), "precision": self.precision,
                  "opset": self.opset, "exporter": self.exporter, "atol": self.parity_atol, "rtol": self.parity_rtol,
                  "keep_fp32": sorted(self.keep_fp32), "skip_passes": sorted(self.skip_passes), "calib": self.calib, "calib_method": self.calib_method,
                  "random_calibration": self.allow_random_calibration, "budget": self.budget,
                  "metric_hook": self.metric_hook, "state": list(self.state),
                  "ort_int8_form": self.ort_int8_form, "require_int8": sorted(self.require_int8),
                  "profiles": list(self.profiles), "profiles_auto": self.profiles_auto, "static": self.static,
                  "trt": self.trt.to_json(),
                  "planforge": __version__, "schema": SCHEMA_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    reused: bool
    seconds: float


def default_out(name: str, precision: str, root: Path = Path("build")) -> Path:
    return Path(root) / (name if precision == "fp32" else f"{name}-{precision}")


def target_precisions(precision: str) -> dict[str, str]:
    """FP16 is for TensorRT; the ONNX Runtime CPU fallback keeps FP32 (no fast FP16 CPU kernels)."""
    return {"trt": precision, "ort": "fp32" if precision == "fp16" else precision}
