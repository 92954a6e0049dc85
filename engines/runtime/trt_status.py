"""TensorRT availability. The engine build itself lives in later issues' modules and stays thin.

TensorRT's native libraries cannot be installed from the registries these machines reach; the
bindings wheel alone cannot be imported. ``tensorrt_status`` says which piece is missing, so the
build can print one line and carry on with the ONNX Runtime bundle.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): reason names what is missing or the version found."""
    if importlib.util.find_spec("tensorrt") is None:
        if importlib.util.find_spec("tensorrt_bindings") is not None:  # found, deliberately not imported
            return False, ("only TensorRT's Python bindings are installed; its native libraries (libnvinfer.so.11) "
                           "are not, and cannot be installed from the registries this machine reaches")
        return False, "the tensorrt Python package is not installed"
    try:
        import tensorrt as trt  # noqa: PLC0415 - only where TensorRT is installed
    except (ImportError, OSError) as exc:
        return (
            False,
            f"tensorrt is installed but does not import ({str(exc).splitlines()[0][:160]}): its native libraries "
            "are missing",
        )
    if shutil.which("nvidia-smi") is None and not _cuda_device_present():
        return False, f"TensorRT {trt.__version__} imports, but no NVIDIA GPU is visible"
    return True, f"TensorRT {trt.__version__}"


def _cuda_device_present() -> bool:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
