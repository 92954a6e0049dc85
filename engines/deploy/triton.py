"""``planforge triton-repo BUNDLE -o model_repository/``: hand a bundle to NVIDIA Triton.

Writes one model per backend the bundle has: ``<name>_<precision>_trt`` (``tensorrt_plan``, the engine)
when a plan was built, and ``<name>_<precision>_ort`` (``onnxruntime_onnx``, the ``ort`` graph), as
version ``<version>/`` (1 by default); ``name`` defaults to the model's. An existing model version is
refused unless ``force``. Each ``config.pbtxt`` lists inputs and outputs with Triton data types and
dims (-1 for dynamic). When every input and output starts with the same symbolic dim (the batch),
Triton batches: ``max_batch_size`` is the largest batch any profile accepts, the batch dim is left out
of ``dims``, and dynamic batching prefers the profiles' opt batch sizes above 1 (none listed when no
opt exceeds 1). Instance groups: for a plan, one GPU group whose ``profile`` lists every optimization
profile: Triton's ``model_config.proto`` says the field is the set of profiles available to the
group and the server picks the one that fits each request's shapes (one group pinned per profile
would send a batch of 40 to an instance whose profile stops at 4). The ONNX Runtime graph gets a CPU
group, or a GPU group when the bundle's ``ort`` graph is FP16 (CUDA's; the CPU fallback never runs
FP16). Artifacts are checked against the manifest's sha256 before they are copied. The files are
staged and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engines.bundle import Manifest, read_manifest, verified_path
from engines.runtime.batching import Batching
from foundation.errors import BundleError, UsageError
from foundation.files import write_atomic
from foundation.spec import batch_dim

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL"}


def _tensor(kind: str, name: str, dtype: str, dims: list) -> str:
    if dtype not in TRITON_TYPES:
        raise BundleError(f"{kind} {name!r} has dtype {dtype}, which Triton has no type for")
    dims_text = ", ".join(str(d) for d in dims)
    return f'{kind} {{\n  name: "{name}"\n  data_type: {TRITON_TYPES[dtype]}\n  dims: [ {dims_text} ]\n}}\n'


def config_text(manifest: Manifest, model_name: str, platform: str, batching: Batching | None = None,
                cache: bool = False) -> str:
    """config.pbtxt; the dynamic batcher gets the in-process batcher's delay and queue policy (``batching``,
    ``engines.runtime.batching``: max_delay_ms, max_queue, timeout_ms with REJECT, as the runtime refuses),
    so moving to Triton keeps the behaviour; ``cache``: Triton's response cache for the model."""
    batching = batching or Batching()
    batch, _ = batch_dim(manifest.inputs, list(manifest.outputs))
    profiles = manifest.profiles
    first = manifest.inputs.tensors[0] if manifest.inputs.tensors else None
    lines = [f'name: "{model_name}"\n', f'platform: "{platform}"\n']
    if batch:
        max_batch = max((p.max[first.name][0] for p in profiles), default=first.dims[0].max)
        lines.append(f"max_batch_size: {max_batch}\n")
    else:
        lines.append("max_batch_size: 0\n")
    skip = 1 if batch else 0
    for tensor in manifest.inputs:
        dims = [-1 if d.is_dynamic else d.min for d in tensor.dims][skip:]
        lines.append(_tensor("input", tensor.name, tensor.dtype, dims))
    for output in manifest.outputs:
        dims = [d if isinstance(d, int) else -1 for d in output.shape][skip:]
        lines.append(_tensor("output", output.name, output.dtype, dims))
    if batch:
        opts = sorted({p.opt[first.name][0] for p in profiles}) or [first.dims[0].opt]
        preferred = [b for b in opts if b > 1]
        policy = f"    max_queue_size: {batching.max_queue}\n    timeout_action: REJECT\n" + (
            f"    default_timeout_microseconds: {round(batching.timeout_ms * 1000)}\n" if batching.timeout_ms else "")
        lines.append("dynamic_batching {\n" + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                                              if preferred else "")
                     + f"  max_queue_delay_microseconds: {round(batching.max_delay_ms * 1000)}\n"
                     + "  default_queue_policy {\n" + policy + "  }\n}\n")
    if cache:
        lines.append("response_cache {\n  enable: true\n}\n")
    if platform == "tensorrt_plan":
        listed = "".join(f'\n  profile: [ {", ".join(chr(34) + str(i) + chr(34) for i in range(len(profiles)))} ]'
                         if len(profiles) > 1 else "")
        lines.append(f"instance_group {{\n  count: 1\n  kind: KIND_GPU{listed}\n}}\n")
    else:
        kind = "KIND_GPU" if manifest.backends.ort.precision == "fp16" else "KIND_CPU"
        lines.append(f"instance_group {{\n  count: 1\n  kind: {kind}\n}}\n")
    return "".join(lines)


def write_repository(bundle: Path, out: Path, name: str | None = None, version: int = 1,
                     force: bool = False, batching: Batching | None = None, cache: bool = False) -> list[str]:
    """Write the models of ``bundle`` into the Triton repository ``out`` as ``version``; return their names.
    An existing version of one of them is refused unless ``force`` (then replaced)."""
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    if version < 1:
        raise UsageError(f"--version {version}: Triton model versions are positive integers")
    base = (name or f"{manifest.model.name}_{manifest.precision}").replace("-", "_")
    if not all(c.isalnum() or c in "_." for c in base):
        raise UsageError(f"--name {base!r}: use letters, digits, '_' and '.' (it is a directory and a Triton name)")
    models = []
    if manifest.backends.trt.plan:
        plan = verified_path(bundle, manifest, manifest.backends.trt.plan)
        models.append((f"{base}_trt", "tensorrt_plan", plan, "model.plan"))
    ort_graph = verified_path(bundle, manifest, manifest.backends.ort.graph)
    models.append((f"{base}_ort", "onnxruntime_onnx", ort_graph, "model.onnx"))
    existing = [m[0] for m in models if (out / m[0] / str(version)).exists()]
    if existing and not force:
        raise UsageError(f"{out}: {', '.join(existing)} already have version {version}; pass --force to replace it, "
                         "--version N for another version, or --name for another model name")
    out.mkdir(parents=True, exist_ok=True)
    for model_name, platform, source, filename in models:
        target = out / model_name
        target.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=target))
        try:
            shutil.copyfile(source, staging / filename)
            weights = f"{source.name}.data"  # a graph's external weights, under the name its tensors give
            if weights in manifest.artifacts:
                shutil.copyfile(verified_path(bundle, manifest, weights), staging / weights)
            if (target / str(version)).exists():
                shutil.rmtree(target / str(version))
            os.replace(staging, target / str(version))
            write_atomic(target / "config.pbtxt", config_text(manifest, model_name, platform, batching, cache).encode())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [m[0] for m in models]
