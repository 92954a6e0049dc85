"""Build a TensorRT 11 engine from the ``trt`` graph. Thin on purpose: every call here is in
``../shared/reference/tensorrt.md`` and its name is checked against the 11.4 bindings wheel by
``tests/test_trt_names.py`` (``trt.<chain>`` attributes and attributes of the variables named in
``TRT_OBJECTS``). Nothing here runs without TensorRT and a GPU; the callers skip with the reason.

Networks are strongly typed (TensorRT 11 has no precision flags): the graph's types decide.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from foundation.errors import BuildError

logger = logging.getLogger(__name__)

# Local names that hold TensorRT objects; the name check verifies every attribute used on them.
TRT_OBJECTS = ("builder", "network", "parser", "config", "profile", "runtime", "engine", "inspector", "cache",
               "trt_logger", "context")

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    workspace_gib: float = 4.0
    optimization_level: int = 3
    strict_fp32: bool = False  # clear TF32 so FP32 layers match ONNX Runtime's FP32
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    sparse_weights: bool = False
    refit: bool = False

    def __post_init__(self):
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise BuildError(f"hardware compatibility {self.hardware_compatibility!r} is not one of "
                             f"{', '.join(HARDWARE_COMPATIBILITY)}")
        if not 0 <= self.optimization_level <= 5:
            raise BuildError(f"builder optimization level {self.optimization_level} is outside 0..5")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _progress_monitor(trt, on_stage: Callable[[str], None]):
    class Monitor(trt.IProgressMonitor):
        """Feeds the CLI's progress line; returning False from step_complete cancels the build."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.cancelled = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            on_stage(f"tensorrt: {phase_name} (0/{num_steps})")

        def step_complete(self, phase_name, step):
            on_stage(f"tensorrt: {phase_name} ({step + 1})")
            return not self.cancelled

        def phase_finish(self, phase_name):
            on_stage(f"tensorrt: {phase_name} done")

    return Monitor()


def build_plan(onnx_path: Path, profiles: list, options: TrtOptions, timing_cache: Path,
               on_stage: Callable[[str], None] = lambda s: None) -> tuple[bytes, str]:
    """(serialized plan, engine-inspector layer JSON). Raises BuildError with the parser's errors."""
    import tensorrt as trt  # noqa: PLC0415 - only where TensorRT is installed

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # STRONGLY_TYPED is ignored (always on) in 11 and required in 10: portable across both.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data relative to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = _builder_config(trt, builder, options)
    _add_profiles(builder, config, profiles)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, on_stage)
    config.progress_monitor = monitor  # the config keeps no reference: `monitor` must stay alive
    previous = signal.signal(signal.SIGINT, lambda *_: setattr(monitor, "cancelled", True))
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        signal.signal(signal.SIGINT, previous)
    if monitor.cancelled:
        raise KeyboardInterrupt
    if serialized is None:
        raise BuildError("TensorRT could not build the engine (see the TensorRT warnings above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    plan = bytes(serialized)
    return plan, layer_information(trt, trt_logger, plan)


def _builder_config(trt, builder, options: TrtOptions):
    """The builder config for ``options`` (no precision flags: the network is strongly typed)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.hardware_compatibility_level = {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }[options.hardware_compatibility]
    if options.strict_fp32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    return config


def _add_profiles(builder, config, profiles: list) -> None:
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name in p.min:
            profile.set_shape(name, p.min[name], p.opt[name], p.max[name])
        for name, (lo, opt, hi) in p.shape_values.items():
            profile.set_shape_input(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"TensorRT rejected optimization profile {p.name}: {p.to_json()}")


def layer_information(trt, trt_logger, plan: bytes) -> str:
    """The engine inspector's layer JSON (names, precisions, fused layers)."""
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError("TensorRT built a plan it cannot deserialize on this GPU")
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def environment() -> dict:
    """TensorRT version, CUDA version, GPU name and compute capability of this machine."""
    import tensorrt as trt  # noqa: PLC0415 - only where TensorRT is installed
    import torch  # noqa: PLC0415 - the build environment has torch; the runtime does not need this

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt": trt.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}"}


def layer_summary(layer_json: str) -> dict:
    """Layer count from the inspector's JSON (kept small for the manifest)."""
    try:
        layers = json.loads(layer_json).get("Layers", [])
    except (ValueError, AttributeError):
        return {}
    return {"layer_count": len(layers)}
