"""Export a torch module to ONNX: the dynamo exporter first, TorchScript when it fails.

Dynamic dims come from the input spec: each named symbolic dim becomes one
``torch.export.Dim`` shared by every input that uses it (dynamo) or one ``dynamic_axes`` name
(TorchScript). The result is checked with ``onnx.checker`` (full check), saved with weights
inline when it fits the 2 GB protobuf limit and as external data beside it otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from foundation.errors import ExportError
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2**31 - 1
IR_VERSION = 10  # ONNX Runtime 1.31 reads IR <= 13; onnx 1.23's make_model would write 14.


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str  # "dynamo" | "torchscript"
    fallback_reason: str | None
    seconds: float
    opset: int
    external_data: bool


def example_inputs(spec: InputSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs at the opt point, with every dynamic dim at least 2 (torch.export specializes 0 and 1)."""
    feeds = spec.random_feeds("opt", seed)
    tensors = []
    for tensor in spec:
        value = feeds[tensor.name]
        if any(d.is_dynamic and value.shape[i] < 2 <= d.max for i, d in enumerate(tensor.dims)):
            shape = tuple(max(2, s) if d.is_dynamic and d.max >= 2 else s for s, d in zip(value.shape, tensor.dims))
            value = InputSpec((tensor,)).random_feeds("max", seed)[tensor.name][tuple(slice(0, s) for s in shape)]
        tensors.append(torch.from_numpy(value.copy()))
    return tuple(tensors)


def _dynamo_shapes(module: torch.nn.Module, spec: InputSpec) -> dict | None:
    """``dynamic_shapes`` shaped like ``forward``'s signature (varargs grouped as a tuple)."""
    if not spec.is_dynamic:
        return None
    dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in spec.symbols().items()}
    per_input = [{i: dims[d.name] for i, d in enumerate(t.dims) if d.is_dynamic} or None for t in spec]
    shapes, rest = {}, list(per_input)
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind == param.VAR_POSITIONAL:
            shapes[param.name], rest = tuple(rest), []
        elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and rest:
            shapes[param.name] = rest.pop(0)
    if rest:
        raise ExportError(
            f"the input spec has {len(spec)} inputs, but {type(module).__name__}.forward takes fewer "
            "positional arguments; make the spec match forward()'s parameters"
        )
    return shapes


@contextlib.contextmanager
def quiet_exporters():
    """The exporters print progress and warnings; their own logging shows only where every library's debug
    logging is on (the CLI's -vv); their stdout and warnings come back as planforge DEBUG lines (-v)."""
    out = io.StringIO()
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in chatty]
    quiet_level = logging.DEBUG if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.ERROR
    for lg in chatty:
        lg.setLevel(quiet_level)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level in zip(chatty, levels):
            lg.setLevel(level)
    for w in caught:
        logger.debug("exporter warning: %s", w.message)
    if out.getvalue().strip():
        logger.debug("exporter output:\n%s", out.getvalue().strip())


def _export_dynamo(module, args, spec, output_names, path: Path, opset: int) -> None:
    with quiet_exporters():
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=spec.names, output_names=list(output_names),
            dynamic_shapes=_dynamo_shapes(module, spec), opset_version=opset,
        )
        program.save(str(path))


def _export_torchscript(module, args, spec, output_names, path: Path, opset: int) -> None:
    axes = {t.name: {i: d.name for i, d in enumerate(t.dims) if d.is_dynamic} for t in spec}
    with quiet_exporters():
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=spec.names, output_names=list(output_names),
            dynamic_axes={k: v for k, v in axes.items() if v}, opset_version=opset,
        )


def _first_line(exc: BaseException) -> str:
    """The exporters' messages are pages long; the summary line is what a log needs."""
    text = str(exc).replace("\x1b[96m", "").replace("\x1b[0m", "")
    for marker in ("## Exception summary", "Exception summary"):
        if marker in text:
            text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def export_onnx(
    module: torch.nn.Module,
    spec: InputSpec,
    output_names: tuple[str, ...] | list[str],
    path: Path,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> ExportResult:
    """Export ``module`` to ``path``; ``exporter`` is ``auto`` (dynamo, then TorchScript), ``dynamo`` or
    ``torchscript``."""
    path = Path(path)
    args = example_inputs(spec)
    start = time.perf_counter()
    fallback_reason = None
    with tempfile.TemporaryDirectory(prefix="planforge-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        used = "torchscript" if exporter == "torchscript" else "dynamo"
        try:
            if used == "dynamo":
                _export_dynamo(module, args, spec, output_names, raw, opset)
            else:
                _export_torchscript(module, args, spec, output_names, raw, opset)
        except Exception as exc:  # exporter failures come in many types
            if exporter != "auto":
                raise ExportError(f"the {used} exporter failed: {_first_line(exc)}") from exc
            fallback_reason = _first_line(exc)
            logger.warning("dynamo export failed (%s); trying the TorchScript exporter", fallback_reason)
            used = "torchscript"
            try:
                _export_torchscript(module, args, spec, output_names, raw, opset)
            except Exception as exc2:
                raise ExportError(
                    f"both exporters failed. dynamo: {fallback_reason}. TorchScript: {_first_line(exc2)}. "
                    "Rewrite the unsupported part of the model with standard torch ops, or export "
                    "it yourself and pass the .onnx file as MODEL"
                ) from exc2
        external = save_checked(onnx.load(str(raw)), path)
    _check_io_names(path, spec, output_names)
    seconds = time.perf_counter() - start
    logger.info("exported with %s exporter in %.1f s (opset %d)", used, seconds, opset)
    return ExportResult(path, used, fallback_reason, seconds, opset, external)


def save_checked(model: onnx.ModelProto, path: Path) -> bool:
    """Save with weights inline, or as ``<name>.data`` beside it over 2 GB; full checker. Returns external."""
    model.ir_version = min(model.ir_version, IR_VERSION)
    external = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data" if external else None)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # checker raises several types
        raise ExportError(f"the exported graph fails onnx.checker: {_first_line(exc)}") from exc
    return external


def _check_io_names(path: Path, spec: InputSpec, output_names) -> None:
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != spec.names:
        raise ExportError(
            f"the exported graph takes inputs {inputs}, the input spec names {spec.names}; "
            "an input the model ignores is dropped by the exporter: remove it from the spec"
        )
    if list(output_names) and outputs != list(output_names):
        raise ExportError(f"the exported graph returns {outputs}, expected {list(output_names)}")
