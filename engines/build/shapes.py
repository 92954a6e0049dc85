"""Shapes a build checks before it spends time: shape-tensor inputs get profile values from their
value range, every profile's min and max shapes run on the exported graph, and the outputs' specs."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from engines.profiles import Profile
from foundation.dtypes import ONNX_DTYPES
from foundation.errors import UsageError
from foundation.golden import golden_key, golden_points
from foundation.spec import InputSpec, OutputSpec, random_array
from passes.verify import run_graph


def output_specs(model: onnx.ModelProto, spec: InputSpec | None = None, golden: dict | None = None) -> list[OutputSpec]:
    """The outputs' dtypes and shapes. With ``spec`` and ``golden`` (the graph run at the spec's shape points),
    shapes come from what the graph produced: a dim of the same size at every point is that size, one that
    moves like an input's dynamic dim gets its name (so a batch dim named otherwise in the file is still the
    batch), anything else is dynamic (None). Without them, as the graph declares (-1 and 0 read as None)."""
    measured = _measured_shapes(spec, golden) if spec is not None and golden else {}
    specs = []
    for out in model.graph.output:
        ttype = out.type.tensor_type
        shape = measured.get(out.name) or tuple(
            d.dim_param or (d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
            for d in ttype.shape.dim)
        specs.append(OutputSpec(out.name, ONNX_DTYPES.get(ttype.elem_type, str(ttype.elem_type)), shape))
    return specs


def _measured_shapes(spec: InputSpec, golden: dict) -> dict[str, tuple]:
    points = golden_points(golden)
    sizes = _symbol_sizes(spec, golden, points)
    outputs = {k.split("/", 2)[2] for k in golden if "/out/" in k}
    shapes = {}
    for name in outputs:
        arrays = [golden.get(golden_key(p, "out", name)) for p in points]
        if any(a is None for a in arrays) or len({np.ndim(a) for a in arrays}) != 1:
            continue
        dims = []
        for axis in range(np.ndim(arrays[0])):
            seen = tuple(int(np.shape(a)[axis]) for a in arrays)
            if len(set(seen)) == 1:
                dims.append(seen[0])
            else:
                matches = [n for n, s in sizes.items() if s == seen]
                dims.append(matches[0] if len(matches) == 1 else None)  # two dims moving alike: ambiguous
        shapes[name] = tuple(dims)
    return shapes


def _symbol_sizes(spec: InputSpec, golden: dict, points: list[str]) -> dict[str, tuple[int, ...]]:
    """Each symbolic dim's size at each golden point, read off the golden inputs that carry it (the points
    may be the spec's min and max, or a decoder's prefill and decode step)."""
    sizes: dict[str, tuple[int, ...]] = {}
    for tensor in spec:
        arrays = [golden.get(golden_key(p, "in", tensor.name)) for p in points]
        if any(a is None for a in arrays):
            continue
        for axis, dim in enumerate(tensor.dims):
            if dim.name is not None and dim.name not in sizes:
                sizes[dim.name] = tuple(int(np.shape(a)[axis]) for a in arrays)
    return sizes


SHAPE_OPERANDS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Resize": 3}


def shape_tensor_inputs(graph: onnx.ModelProto) -> list[str]:
    """Integer graph inputs read as a shape operand (TensorRT shape tensors: profiles need their values)."""
    inputs = {i.name for i in graph.graph.input if i.type.tensor_type.elem_type in (6, 7)}
    return sorted({n.input[SHAPE_OPERANDS[n.op_type]] for n in graph.graph.node
                   if n.op_type in SHAPE_OPERANDS and len(n.input) > SHAPE_OPERANDS[n.op_type]
                   and n.input[SHAPE_OPERANDS[n.op_type]] in inputs})


def with_shape_values(graph: onnx.ModelProto, spec: InputSpec, profiles: list[Profile]) -> list[Profile]:
    """Shape-tensor inputs get profile values from the spec's value range lo..hi (min lo, opt and max hi-1)."""
    names = shape_tensor_inputs(graph)
    if not names or not profiles:
        return profiles
    values = {}
    for name in names:
        tensor = spec[name]
        if tensor.value_range is None or tensor.rank != 1 or tensor.dims[0].is_dynamic:
            raise UsageError(f"input {name!r} is a shape tensor (it feeds a shape operand); TensorRT profiles need "
                             f"its values: give it a fixed length and a value range, e.g. {name}:int64:[2]:1..65")
        n, (lo, hi) = tensor.dims[0].min, tensor.value_range
        values[name] = ((lo,) * n, (hi - 1,) * n, (hi - 1,) * n)
    return [dataclasses.replace(p, shape_values={**values, **p.shape_values}) for p in profiles]


def check_profiles(graph: onnx.ModelProto, profiles: list[Profile], spec: InputSpec | None = None) -> None:
    """Each profile's fixed dims equal the graph's, and the graph runs at its min and max shapes, fed from
    the spec's value ranges (an ``sr`` input that must be 16000 gets 16000, token ids stay in range)."""
    inputs = {i.name: i for i in graph.graph.input}
    for profile in profiles:
        missing = [n for n in inputs if n not in profile.min]
        if missing:
            raise UsageError(f"profile {profile.name} does not cover inputs {', '.join(missing)}")
        for point in ("min", "max"):
            shapes = getattr(profile, point)
            for name, shape in shapes.items():
                dims = inputs[name].type.tensor_type.shape.dim
                fixed = [(i, d.dim_value) for i, d in enumerate(dims) if d.HasField("dim_value") and d.dim_value > 0]
                if len(dims) != len(shape) or any(shape[i] != v for i, v in fixed):
                    raise UsageError(f"profile {profile.name}: input {name!r} {point} shape {list(shape)} does not "
                                     f"fit the graph's dims {[d.dim_value or d.dim_param for d in dims]}")
            rng = np.random.default_rng(0)
            feeds = {n: random_array(spec[n], s, rng) if spec is not None and n in spec.names else
                     (rng.standard_normal(s) if ONNX_DTYPES[inputs[n].type.tensor_type.elem_type].startswith("float")
                      else np.ones(s)).astype(ONNX_DTYPES[inputs[n].type.tensor_type.elem_type])
                     for n, s in shapes.items()}
            try:
                run_graph(graph, feeds)
            except Exception as exc:  # ONNX Runtime's own error types
                raise UsageError(f"profile {profile.name}: the exported graph does not run at its {point} shapes "
                                 f"{ {k: list(v) for k, v in shapes.items()} }: {str(exc).splitlines()[0][:200]}; "
                                 "narrow the profile") from exc
