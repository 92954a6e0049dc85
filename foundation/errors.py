"""planforge's one error hierarchy.

Every error a user can cause is a ``PlanforgeError`` whose message says what was expected,
what was found and what to do. The CLI prints the message alone (``-v`` adds the traceback)
and exits with the class's ``exit_code``. This module is the shared foundation of the
packages: it imports nothing but the standard library.
"""

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without ANSI escape sequences (ONNX Runtime and the exporters colour some messages)."""
    return _ANSI.sub("", text)


class PlanforgeError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 1


class UsageError(PlanforgeError):
    """A command-line option or MODEL spec that planforge cannot use."""

    exit_code = 2


class ExportError(PlanforgeError):
    """Resolving the model or exporting it to ONNX failed."""

    exit_code = 3


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""

    exit_code = 4


class ComparisonFailed(PlanforgeError):
    """``planforge compare``: a bundle's artifact differs from its reference beyond its tolerance."""

    exit_code = 4


class PassError(PlanforgeError):
    """A graph pass failed or changed what the graph computes."""

    exit_code = 5


class CalibrationError(PlanforgeError):
    """Calibration data is missing, empty or does not fit the input spec."""

    exit_code = 6


class BuildError(PlanforgeError):
    """Building an engine or writing a bundle failed."""

    exit_code = 7


class TensorRTUnavailable(BuildError):
    """TensorRT was required (``--require-trt``) but cannot build here."""

    exit_code = 8


class BundleError(PlanforgeError):
    """A bundle is missing, corrupt, tampered with or from an unknown schema."""

    exit_code = 9


class IntegrityError(BundleError):
    """An artifact does not match the sha256 its manifest records: never skipped over, never loaded."""


class RuntimeInputError(PlanforgeError):
    """Feeds given to ``infer`` do not match the bundle's input spec."""

    exit_code = 10


class InferenceError(PlanforgeError):
    """A backend failed while running a call (TensorRT execution error, CUDA out of memory)."""

    exit_code = 11


class TensorRTRefusal(PlanforgeError):
    """The TensorRT compatibility check found nodes the TensorRT ONNX parser or builder refuses."""

    exit_code = 12


class Overloaded(InferenceError):
    """The serving queue is full: the request was refused at once (Triton's queue policy, REJECT)."""

    exit_code = 13


class DeadlineExceeded(InferenceError):
    """A request waited in the serving queue past its deadline and was not run."""

    exit_code = 14
