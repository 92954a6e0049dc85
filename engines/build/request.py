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

PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How a PyTorch model becomes ONNX, and how closely ONNX Runtime must match it (``build``, ``export``)."""

    opset: int = 18
    exporter: str = "auto"  # auto | dynamo | torchscript
    parity_atol: float = 1e-4
    parity_rtol: float = 1e-3
    max_length: int | None = None  # a decoder's longest sequence, prompt and new tokens [2048, or the model's]


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """What the pass pipelines leave out or keep (``build``, ``optimize``)."""

    verify_passes: bool = True  # check numbers under ONNX Runtime after every pass
    keep_fp32: tuple[str, ...] = ()  # node names or op types kept in FP32 by the FP16 conversion
    skip_passes: tuple[str, ...] = ()  # pass names left out of both pipelines (--skip-pass)


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """INT8: calibration, the accuracy budget and its fallback search (``build --precision int8``)."""

    calib: str | None = None
    calib_method: str = "max"
    allow_random_calibration: bool = False
    budget: str | None = None
    metric_hook: str | None = None  # --metric file.py:function (an absolute path): a user metric as the budget
    state: tuple[str, ...] = ()  # --state OUT:IN: the INT8 budget runs its batches as a sequence
    ort_form: str = "auto"  # auto: measured among this CPU class's non-saturating forms
    require: tuple[str, ...] = ()  # trt, ort or all: a target that cannot be INT8 is an error, not float
    time_limit: float | None = 900.0  # seconds for each target's fallback search (None: no limit)


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """The shapes the graphs and the TensorRT engine accept (``--profile``, ``--profiles``, ``--static``)."""

    profiles: tuple[str, ...] = ()
    profiles_auto: str | None = None
    static: bool = False


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """One build: the model, where the bundle goes, and the option groups the CLI parses one-to-one."""

    model: str
    out: Path | None = None
    inputs: tuple[str, ...] = ()
    precision: str = "fp32"
    force: bool = False
    build_root: Path = Path("build")
    export: ExportOptions = ExportOptions()
    passes: PassOptions = PassOptions()
    int8: Int8Options = Int8Options()
    shapes: ProfileOptions = ProfileOptions()
    require_trt: bool = False
    trt: TrtOptions = TrtOptions()
    prune: str | None = None  # --prune auto|RATIO: MLP hidden units removed under the budget (engines/build/prune.py)
    sparsity: str | None = None  # --sparsity 2:4: the trt graph's weights (engines/build/sparsity.py)

    def key(self, source_sha256: str, spec: InputSpec) -> str:
        """What makes two builds the same: reuse a bundle only when this matches."""
        export, passes, int8, shapes = self.export, self.passes, self.int8, self.shapes
        fields = {"model": self.model, "source_sha256": source_sha256, "inputs": str(spec), "precision": self.precision,
                  "opset": export.opset, "exporter": export.exporter, "atol": export.parity_atol,
                  "rtol": export.parity_rtol, "keep_fp32": sorted(passes.keep_fp32),
                  "skip_passes": sorted(passes.skip_passes), "calib": int8.calib, "calib_method": int8.calib_method,
                  "random_calibration": int8.allow_random_calibration, "budget": int8.budget,
                  "metric_hook": int8.metric_hook, "state": list(int8.state),
                  "ort_int8_form": int8.ort_form, "require_int8": sorted(int8.require),
                  "profiles": list(shapes.profiles), "profiles_auto": shapes.profiles_auto, "static": shapes.static,
                  "trt": self.trt.to_json(),
                  "planforge": __version__, "schema": SCHEMA_VERSION}
        if export.max_length is not None:  # only decoders have it; every other key stays as it was
            fields["max_length"] = export.max_length
        if self.prune is not None:  # likewise: an unpruned build's key is unchanged
            fields["prune"] = self.prune
        if self.sparsity is not None:
            fields["sparsity"] = self.sparsity
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
    """FP16 is for TensorRT; the ONNX Runtime CPU fallback keeps FP32 (no fast FP16 CPU kernels). 4-bit
    weights (a decoder's): MatMulNBits for ONNX Runtime, blocked DequantizeLinear + MatMul for TensorRT."""
    return {"trt": precision, "ort": "fp32" if precision == "fp16" else precision}
