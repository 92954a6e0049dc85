"""ONNX -> ONNX graph passes. Imports onnx, onnx-graphsurgeon and onnxruntime; never torch.

``PIPELINES`` is the one reviewed order of passes per (target, precision). A pass that needs
another first declares it in ``requires``; the ``PassManager`` enforces it.
"""

from __future__ import annotations

from passes.base import Pass, PassManager, PassRecord, PassResult
from passes.cleanup import Cleanup
from passes.fold_constants import FoldConstants
from passes.infer_shapes import InferShapes

TARGETS = ("trt", "ort")

PIPELINES: dict[tuple[str, str], tuple[type[Pass], ...]] = {
    ("trt", "fp32"): (InferShapes, FoldConstants, Cleanup),
    ("ort", "fp32"): (InferShapes, FoldConstants, Cleanup),
}


def pipeline(target: str, precision: str) -> list[Pass]:
    """Fresh pass instances for ``target`` and ``precision``."""
    from exporter.errors import UsageError  # noqa: PLC0415

    key = (target, precision)
    if key not in PIPELINES:
        supported = ", ".join(f"{t}/{p}" for t, p in PIPELINES)
        raise UsageError(f"no pass pipeline for target {target!r} at precision {precision!r}; supported: {supported}")
    return [cls() for cls in PIPELINES[key]]


__all__ = ["PIPELINES", "TARGETS", "Pass", "PassManager", "PassRecord", "PassResult", "pipeline",
           "Cleanup", "FoldConstants", "InferShapes"]
