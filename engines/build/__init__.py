"""``planforge build``: the request (``request``), its stages (``stages``: export, reference outputs,
passes and precision per target, TensorRT, manifest), shape checks (``shapes``), INT8 (``int8/``),
and the pipeline that runs them (``pipeline``)."""

from engines.build.pipeline import build
from engines.build.request import (
    BuildRequest,
    BuildResult,
    ExportOptions,
    Int8Options,
    PassOptions,
    ProfileOptions,
    default_out,
    target_precisions,
)

__all__ = ["BuildRequest", "BuildResult", "ExportOptions", "Int8Options", "PassOptions", "ProfileOptions", "build",
           "default_out", "target_precisions"]
