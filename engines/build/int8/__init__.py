"""INT8 with an accuracy budget: calibration data (``data``), ONNX Runtime forms per CPU class
(``forms``), the budget's sensitivity-driven float fallback (``sensitivity``), and the build stage
that runs them per target (``stage``). The budget itself is ``foundation.numerics.Budget``."""

from engines.build.int8.sensitivity import EMULATED, Int8Result, judged_by, quantize_target, run_target
from engines.build.int8.stage import Int8Stage

__all__ = ["EMULATED", "Int8Result", "Int8Stage", "judged_by", "quantize_target", "run_target"]
