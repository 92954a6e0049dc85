"""``planforge triton-repo BUNDLE -o model_repository/``: hand a bundle to NVIDIA Triton.

Writes one model per backend the bundle has: ``<name>_trt`` (``tensorrt_plan``, the engine) when a
plan was built, and ``<name>_ort`` (``onnxruntime_onnx``, the ``ort`` graph). Each ``config.pbtxt``
lists inputs and outputs with Triton data types and dims (-1 for dynamic). When every input and
output starts with the same symbolic dim (the batch), Triton batches: ``max_batch_size`` is the
largest batch any profile accepts, the batch dim is left out of ``dims``, and dynamic batching
prefers the profiles' opt batch sizes. Instance groups: one GPU instance per TensorRT profile for
the plan, one CPU instance for the ONNX Runtime graph. Artifacts are checked against the manifest's
sha256 before they are copied. The files are staged and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engines.bundle import Manifest, read_manifest, verified_path
from exporter.core.errors import BundleError

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL"}


def _batch_dim(manifest: Manifest) -> str | None:
    """The symbolic dim every input and output starts with, if there is one."""
    firsts = {d.name if d.name is not None else ("fixed", d.min) for d in (t.dims[0] for t in manifest.inputs if t.rank)}
    outs = {o.shape[0] for o in manifest.outputs if o.shape}
    if len(firsts) != 1 or len(outs) != 1:
        return None
    name = firsts.pop()
    return name if isinstance(name, str) and outs.pop() == name else None


def _tensor(kind: str, name: str, dtype: str, dims: list) -> str:
    if dtype not in TRITON_TYPES:
        raise BundleError(f"{kind} {name!r} has dtype {dtype}, which Triton has no type for")
    dims_text = ", ".join(str(d) for d in dims)
    return f'{kind} {{\n  name: "{name}"\n  data_type: {TRITON_TYPES[dtype]}\n  dims: [ {dims_text} ]\n}}\n'


def config_text(manifest: Manifest, model_name: str, platform: str) -> str:
    batch = _batch_dim(manifest)
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
        preferred = sorted({p.opt[first.name][0] for p in profiles}) or [first.dims[0].opt]
        lines.append("dynamic_batching {\n  preferred_batch_size: [ " + ", ".join(map(str, preferred))
                     + " ]\n  max_queue_delay_microseconds: 100\n}\n")
    if platform == "tensorrt_plan" and len(profiles) > 1:
        for i in range(len(profiles)):
            lines.append(f'instance_group {{\n  count: 1\n  kind: KIND_GPU\n  profile: [ "{i}" ]\n}}\n')
    else:
        kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
        lines.append(f"instance_group {{\n  count: 1\n  kind: {kind}\n}}\n")
    return "".join(lines)


def write_repository(bundle: Path, out: Path) -> list[str]:
    """Write (or replace) the models of ``bundle`` in the Triton repository ``out``; return their names."""
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    name = manifest.model.name.replace("-", "_")
    models = []
    if manifest.backends.trt.plan:
        plan = verified_path(bundle, manifest, manifest.backends.trt.plan)
        models.append((f"{name}_trt", "tensorrt_plan", plan, "model.plan"))
    ort_graph = verified_path(bundle, manifest, manifest.backends.ort.graph)
    models.append((f"{name}_ort", "onnxruntime_onnx", ort_graph, "model.onnx"))
    out.mkdir(parents=True, exist_ok=True)
    for model_name, platform, source, filename in models:
        staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.partial-", dir=out))
        try:
            (staging / "1").mkdir()
            shutil.copyfile(source, staging / "1" / filename)
            (staging / "config.pbtxt").write_text(config_text(manifest, model_name, platform))
            target = out / model_name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [m[0] for m in models]
