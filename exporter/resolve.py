"""Turn a MODEL string into something the pipeline can build.

Forms, tried in this order:
- ``path/to/model.onnx``: an exported graph; export and parity are skipped.
- ``path/to/file.py:factory``: ``factory()`` returns ``(module, spec)``, where spec is an
  ``InputSpec``, a list of input-spec strings, or example inputs (a tuple or a dict of tensors:
  every dim fixed); an optional third item names the outputs.
- a directory holding ``config.json``: a local Hugging Face model (needs ``transformers``).
- a zoo name (``planforge zoo`` lists them).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from pathlib import Path

import onnx
import torch

from exporter import zoo
from exporter.resolved import ResolvedModel
from foundation.dtypes import ONNX_DTYPES
from foundation.errors import ExportError, UsageError
from foundation.files import sha256_file
from foundation.spec import Dim, InputSpec, TensorSpec, assumed_dims

logger = logging.getLogger(__name__)

DEFAULT_ONNX_RANGE = (1, 4, 16)  # min, opt, max for a leading dynamic dim of a .onnx MODEL without --input


def resolve(model: str, cache_dir: Path, max_length: int | None = None) -> ResolvedModel:
    """Resolve ``model`` (see the module docstring); raise ``UsageError``/``ExportError`` with advice.
    ``max_length``: a decoder's longest sequence (prompt and new tokens) the bundle is built for."""
    path_part = model.rsplit(":", 1)[0] if model.count(":") == 1 and ".py:" in model else model
    if model.endswith(".onnx"):
        return _resolve_onnx(Path(model))
    if model.endswith(".gguf") or Path(path_part).is_dir():
        from exporter.decoder import is_decoder_source, resolve_decoder  # noqa: PLC0415 - transformers, optional

        if model.endswith(".gguf") and not Path(model).is_file():
            raise UsageError(f"GGUF file {model} does not exist")
        if is_decoder_source(Path(path_part)):
            return resolve_decoder(Path(path_part), cache_dir, max_length)
    if ".py:" in model or model.endswith(".py"):
        return _resolve_python(model)
    if Path(path_part).is_dir():
        from exporter.hf import resolve_hf_dir  # noqa: PLC0415 - optional dependency

        return resolve_hf_dir(Path(path_part))
    return _resolve_zoo(model, cache_dir)


def _resolve_zoo(name: str, cache_dir: Path) -> ResolvedModel:

    entry = zoo.BY_NAME.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(zoo.BY_NAME), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        looks_like_path = "/" in name or name.endswith((".py", ".onnx"))
        raise UsageError(
            f"unknown model {name!r}: {hint}expected a zoo name ({', '.join(zoo.BY_NAME)}), "
            "path/to/file.py:factory, path/to/model.onnx or a Hugging Face model directory"
            + ("; that path does not exist" if looks_like_path else "")
        )
    digest = hashlib.sha256(name.encode())
    for source in sorted(Path(zoo.__file__).parent.glob("*.py")):  # the zoo's model definitions
        sha256_file(source, digest)
    module = entry.build(cache_dir)
    if entry.trained:  # seeded weights follow from the source hashed above; trained ones do not
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return ResolvedModel(name, "zoo", name, entry.input_spec, entry.outputs, digest.hexdigest(), entry.task, module)


def _resolve_python(model: str) -> ResolvedModel:
    file_part, _, factory_name = model.rpartition(":") if ".py:" in model else (model, "", "")
    path = Path(file_part)
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist; expected path/to/file.py:factory")
    module_name = f"planforge_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    user = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = user
    try:
        spec.loader.exec_module(user)
    except Exception as exc:  # user code may raise anything
        raise ExportError(f"importing {path} raised {type(exc).__name__}: {exc}; fix the file and retry") from exc
    candidates = [n for n, v in vars(user).items() if callable(v) and not n.startswith("_")
                  and getattr(v, "__module__", None) == module_name and not inspect.isclass(v)]
    factory = getattr(user, factory_name, None) if factory_name else None
    if factory is None or not callable(factory):
        found = f"no function {factory_name!r}" if factory_name else "no factory named"
        raise UsageError(
            f"{path}: {found}; expected path/to/file.py:factory where factory() returns (module, input_spec). "
            f"Functions in the file: {', '.join(candidates) or 'none'}"
        )
    try:
        result = factory()
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ExportError(f"factory {path}:{factory_name}() raised {type(exc).__name__}: {exc}") from exc
    module, input_spec, outputs = _unpack_factory_result(result, f"{path}:{factory_name}")
    source = f"{path.resolve()}:{factory_name}"  # absolute: compare and bench run from anywhere
    return ResolvedModel(path.stem, "python", source, input_spec, outputs,
                         sha256_file(path).hexdigest(), None, module.eval())


def _unpack_factory_result(result, where: str):
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], torch.nn.Module):
        raise ExportError(
            f"{where}() returned {type(result).__name__}; expected (torch.nn.Module, input_spec) "
            "or (module, input_spec, output_names)"
        )
    module, spec = result[0], result[1]
    outputs = tuple(result[2]) if len(result) == 3 else ()
    if isinstance(spec, InputSpec):
        return module, spec, outputs
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return module, InputSpec.parse(spec), outputs
    if isinstance(spec, torch.Tensor):
        spec = (spec,)
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(t, torch.Tensor) for t in spec):
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
        names = [p.name for p in params][: len(spec)]
        names += [f"input_{i}" for i in range(len(names), len(spec))]
        spec = dict(zip(names, spec))
    if isinstance(spec, dict) and all(isinstance(t, torch.Tensor) for t in spec.values()):
        tensors = tuple(
            TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(Dim.fixed(s) for s in t.shape))
            for name, t in spec.items()
        )
        return module, InputSpec(tensors), outputs
    raise ExportError(f"{where}(): the second item must be an InputSpec, spec strings or example tensors")


def check_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Refuse external-data locations that leave the model's directory (absolute, ``..``, links out)."""
    base = model_path.resolve().parent
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise ExportError(
                f"{model_path}: tensor {tensor.name!r} points its external data at {location!r}, outside "
                "the model's directory; refusing to read it. Keep .data files beside the .onnx file"
            )
        if not target.is_file():
            raise ExportError(f"{model_path}: external data file {location!r} for tensor {tensor.name!r} is missing")


def _all_tensors(model: onnx.ModelProto):
    """Initializers and tensor attributes, subgraphs included (what may point at external data)."""
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)
    yield from walk(model.graph)


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file someone else may have written: safe external data, clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-export it or check the file was copied completely"
        ) from exc
    check_external_data(model, path)
    onnx.load_external_data_for_model(model, str(path.resolve().parent))
    try:
        onnx.checker.check_model(model if model.ByteSize() < 2**31 - 1 else str(path), full_check=False)
    except Exception as exc:
        raise ExportError(f"{path} fails onnx.checker: {str(exc).splitlines()[0][:300]}") from exc
    return model


def spec_from_onnx(model: onnx.ModelProto) -> InputSpec:
    """Input spec from graph inputs. A dim is dynamic when it has a name, no value, or a value of -1 or 0
    (exporters write all three); its range is DEFAULT_ONNX_RANGE, marked assumed (``check_assumed``)
    until ``--input`` gives it. Dims keep the file's name where it is one, so inputs sharing it share."""
    initializers = {i.name for i in model.graph.initializer}
    tensors = []
    for inp in (i for i in model.graph.input if i.name not in initializers):
        ttype = inp.type.tensor_type
        dtype = ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise ExportError(
                f"input {inp.name!r} has ONNX element type {ttype.elem_type}, which planforge does not feed"
            )
        if not ttype.HasField("shape"):
            raise UsageError(f"input {inp.name!r} has no shape in the ONNX file (not even a rank); give it with "
                             f"--input \"{inp.name}:{dtype}:[...]\"")
        dims = []
        for axis, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(Dim.fixed(d.dim_value))
                continue
            name = re.sub(r"\W", "_", d.dim_param) if d.dim_param and re.search(r"[A-Za-z]", d.dim_param) else ""
            if not name or not name[0].isalpha() and name[0] != "_":
                name = re.sub(r"\W", "_", f"{inp.name}_dim{axis}")
                name = name if name[0].isalpha() or name[0] == "_" else f"_{name}"
            dims.append(Dim(name, *DEFAULT_ONNX_RANGE, assumed=True))
        tensors.append(TensorSpec(inp.name, dtype, tuple(dims)))
    return InputSpec(tuple(tensors))


def check_assumed(spec: InputSpec, source: str) -> None:
    """After ``--input``: a leading (batch) dim still without a range gets DEFAULT_ONNX_RANGE with a WARNING
    naming it; any other dynamic dim without one is refused with the ``--input`` to write."""
    assumed = assumed_dims(spec)
    inner = [(t, a, d) for t, a, d in assumed if a != 0]
    if inner:
        examples = " ".join(f"--input \"{_example(spec[t])}\"" for t in dict.fromkeys(t for t, _, _ in inner))
        raise UsageError(
            f"{source}: dynamic dims without a range: "
            + ", ".join(f"{t} axis {a} ({d.name})" for t, a, d in inner)
            + f"; planforge does not guess image sizes or sequence lengths. Give them, e.g. {examples}")
    if assumed:
        low, opt, high = DEFAULT_ONNX_RANGE
        logger.warning("%s: assuming %s = %d..%d@%d (leading dims without a range in the file); --input sets them",
                       source, ", ".join(f"{t} axis 0 ({d.name})" for t, _, d in assumed), low, high, opt)


def _example(tensor) -> str:
    dims = ",".join(f"{d.name}=MIN..MAX@OPT" if d.assumed and i else str(d) for i, d in enumerate(tensor.dims))
    return f"{tensor.name}:{tensor.dtype}:[{dims}]"


def _resolve_onnx(path: Path) -> ResolvedModel:
    model = load_onnx(path)
    spec = spec_from_onnx(model)
    outputs = tuple(o.name for o in model.graph.output)
    return ResolvedModel(path.stem, "onnx", str(path.resolve()), spec, outputs, sha256_file(path).hexdigest(),
                         onnx_path=path)


def source_path(source: str) -> str:
    """The file or directory part of a model source (``file.py:factory`` -> ``file.py``)."""
    return source.rsplit(":", 1)[0] if ".py:" in source else source


def relative_source(source: str, bundle: Path) -> str | None:
    """``source`` written relative to the bundle directory (for bundles moved with their model), or None
    for zoo names."""
    path = Path(source_path(source))
    if not path.is_absolute():
        return None
    relative = os.path.relpath(path, Path(bundle).resolve())
    return relative + source[len(source_path(source)):]


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights: every ``state_dict`` entry (parameters and persistent buffers, in its
    order) as name, dtype, shape and bytes. A build records it; ``compare`` computes it again on the module
    it re-resolves, which catches a factory that initialises different weights on every call."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):  # a module's get_extra_state() may return anything
            digest.update(f"{name}\0{type(value).__name__}\0".encode())
            continue
        tensor = value.detach()
        tensor = tensor.dequantize() if tensor.is_quantized else tensor.to_dense() if tensor.layout != torch.strided \
            else tensor
        tensor = tensor.cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # bytes: bfloat16 has no NumPy dtype
    return digest.hexdigest()


def resolve_bundle_model(source: str, source_sha256: str, cache_dir: Path,
                         hint: str = "rebuild the bundle", bundle: Path | None = None,
                         relative: str | None = None, weights: str | None = None) -> ResolvedModel:
    """The PyTorch model a bundle was built from (its manifest's model ``source``, an absolute path, or
    ``relative`` to the ``bundle`` when the recorded path is gone: the two were moved together), refused
    when that source no longer hashes to the recorded ``source_sha256`` (comparing or timing another model
    would mislead), or, given the build's ``weights`` (``weights_sha256``), when the module's weights differ
    from them (an unseeded factory)."""
    if relative and bundle is not None and not Path(source_path(source)).exists():
        moved = Path(bundle) / source_path(relative)
        if moved.exists():
            source = str(moved.resolve()) + relative[len(source_path(relative)):]
    resolved = resolve(source, Path(cache_dir))
    if resolved.source_sha256 != source_sha256:
        raise UsageError(f"the model {source} is not the one the bundle was built from (its source sha256 "
                         f"differs from the manifest's); {hint}")
    if weights is not None and resolved.module is not None and (found := weights_sha256(resolved.module)) != weights:
        raise UsageError(f"{source}: the factory returned different weights than at build time (seed it or load a "
                         f"checkpoint), then {hint} (weights sha256 {found[:12]} now, {weights[:12]} at build)")
    return resolved
