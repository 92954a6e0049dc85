"""The TensorRT backend of the runtime. Imported only when TensorRT is chosen.

CUDA binding: torch. A GPU machine that builds planforge engines has torch with CUDA already
(the exporter needs it), its tensors give device pointers and streams (``data_ptr()``,
``torch.cuda.Stream().cuda_stream``), and callers that hold CUDA tensors can pass them in without
a copy. cuda-python or CuPy would add a dependency for the same three calls.

With ``cuda_graphs=True`` (static-shape engines), each context's first call at a shape runs
normally, the second captures ``execute_async_v3`` into a CUDA graph on that context's stream, and
later calls with the same shapes copy their inputs into the captured buffers and replay the graph;
a new shape drops the graph (reference: run once, capture, re-capture when shapes change).

Per call: the profile is chosen by the input shapes; an execution context bound to that profile is
taken from a pool (one context per concurrent call, so threads never share one), each with its own
non-default stream and output buffers that are reused while shapes repeat. Data-dependent output
shapes (a -1 after the inputs are set) need an output allocator and are refused with a clear error.
Every name used here is checked against the TensorRT 11.4 bindings (tests/test_trt_names.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import numpy as np

from engines.bundle import Manifest, verified_path
from engines.profiles import select
from engines.runtime.base import Runner
from engines.runtime.trt_status import tensorrt_status
from foundation.errors import BundleError, InferenceError, IntegrityError

logger = logging.getLogger(__name__)


def unavailable(bundle: Path, manifest: Manifest) -> str | None:
    """Why this bundle cannot run on TensorRT here (None when it can). Cheapest checks first."""
    entry = manifest.backends.trt
    if not entry.plan:
        return f"the bundle has no TensorRT plan ({entry.skipped or 'not built'})"
    try:
        verified_path(bundle, manifest, entry.plan)
    except IntegrityError:
        raise  # tampered or truncated: refused, not a reason to try the next backend
    except BundleError as exc:
        return str(exc)
    available, reason = tensorrt_status()
    if not available:
        return reason
    import tensorrt as trt  # noqa: PLC0415 - only where TensorRT is installed
    import torch  # noqa: PLC0415 - imports torch

    env, options = manifest.environment, entry.options or {}
    if env.tensorrt != trt.__version__ and not options.get("version_compatible"):
        return f"the plan was built with TensorRT {env.tensorrt}, this machine has {trt.__version__}"
    major, minor = torch.cuda.get_device_capability()
    compat = options.get("hardware_compatibility", "none")
    if env.compute_capability != f"{major}.{minor}" and compat == "none":
        return f"the plan was built for compute capability {env.compute_capability}, this GPU is {major}.{minor}"
    return None


class TrtRunner(Runner):
    backend = "trt"
    takes_device_tensors = True

    def __init__(self, bundle: Path, manifest: Manifest, spec, outputs, device: int = 0, cuda_graphs: bool = False):
        super().__init__(spec, outputs, manifest)
        self.cuda_graphs = cuda_graphs
        import tensorrt as trt  # noqa: PLC0415 - only where TensorRT is installed
        import torch  # noqa: PLC0415 - imports torch

        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        entry = manifest.backends.trt
        plan = verified_path(bundle, manifest, entry.plan).read_bytes()
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.trt_logger)
        if (entry.options or {}).get("version_compatible"):
            runtime.engine_host_code_allowed = True
        with torch.cuda.device(self.device):
            engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BundleError("TensorRT could not deserialize the plan (another TensorRT version or GPU?); rebuild it")
        self.runtime, self.engine = runtime, engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profile_objects = list(manifest.profiles)
        self._pools: dict[int, queue.SimpleQueue] = {}
        self._pool_lock = threading.Lock()

    def _acquire(self, profile_index: int) -> dict:
        with self._pool_lock:
            pool = self._pools.setdefault(profile_index, queue.SimpleQueue())
        try:
            return pool.get_nowait()
        except queue.Empty:
            engine = self.engine
            context = engine.create_execution_context()
            stream = self.torch.cuda.Stream(device=self.device)
            if self.profile_objects:
                context.set_optimization_profile_async(profile_index, stream.cuda_stream)
            return {"context": context, "stream": stream, "buffers": {}, "profile": profile_index,
                    "graph": None, "graph_shapes": None, "inputs": {}, "runs": 0}

    def _release(self, slot: dict) -> None:
        self._pools[slot["profile"]].put(slot)

    def _run(self, feeds: dict) -> dict:
        torch = self.torch
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        index = select(self.profile_objects, shapes) if self.profile_objects else 0
        slot = self._acquire(index or 0)
        device_inputs = all(isinstance(v, torch.Tensor) and v.is_cuda for v in feeds.values())
        try:
            stream = slot["stream"]
            with torch.cuda.stream(stream):
                if self.cuda_graphs and slot["graph"] is not None and slot["graph_shapes"] == shapes:
                    for name in self.inputs:  # the captured graph reads these addresses
                        slot["inputs"][name].copy_(self._to_device(feeds[name]), non_blocking=True)
                    slot["graph"].replay()
                else:
                    self._bind_and_execute(slot, feeds, shapes)
                stream.synchronize()
                buffers = slot["buffers"]
                if device_inputs:
                    return {n: buffers[n].clone() for n in self.outputs}
                return {n: buffers[n].cpu().numpy() for n in self.outputs}
        finally:
            self._release(slot)

    def _to_device(self, value):
        torch = self.torch
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        return tensor.to(self.device, non_blocking=True).contiguous()

    def _bind_and_execute(self, slot: dict, feeds: dict, shapes: dict) -> None:
        torch, trt = self.torch, self.trt
        context, stream, buffers = slot["context"], slot["stream"], slot["buffers"]
        engine = self.engine
        if slot["graph_shapes"] != shapes:
            slot["graph"], slot["runs"] = None, 0
        for name in self.inputs:
            slot["inputs"][name] = self._to_device(feeds[name])
            context.set_input_shape(name, tuple(slot["inputs"][name].shape))
            context.set_tensor_address(name, slot["inputs"][name].data_ptr())
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InferenceError(f"output {name!r} has a data-dependent shape {list(shape)}, which this "
                                     "runtime does not allocate; use the ONNX Runtime backend")
            dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            if name not in buffers or tuple(buffers[name].shape) != shape or buffers[name].dtype != dtype:
                buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            context.set_tensor_address(name, buffers[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise InferenceError("TensorRT execute_async_v3 returned False (see the TensorRT log)")
        slot["graph_shapes"], slot["runs"] = shapes, slot["runs"] + 1
        if self.cuda_graphs and slot["runs"] == 2:  # warmed up at these shapes: capture for the next calls
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                context.execute_async_v3(stream.cuda_stream)
            slot["graph"] = graph

    def close(self) -> None:
        super().close()
        self._pools.clear()
        self.engine = None
