"""Optimization profiles: the shape ranges a TensorRT engine is built for, derived from the input spec.

    --profile "batch=1..8@4" --profile "batch=9..64@32"     one profile per option
    --profiles auto:3                                         the first symbolic dim split into 3 buckets

A ``--profile`` names symbolic dims and their ``min..max@opt``; dims it does not name keep the
spec's range. ``auto:N`` (or ``auto:N:DIM``) splits the first (or the named) symbolic dim's range into N
contiguous geometric buckets, each with its upper bound as ``opt``; every other dim keeps its full
range in every profile, so together they accept exactly what the spec accepts. Shape-tensor inputs (int64
shape operands) carry ``shape_values`` ranges.

Lean: standard library and the input spec only; the runtime selects profiles with this module.
"""

from __future__ import annotations

import dataclasses
import math
import re

from foundation.errors import UsageError
from foundation.spec import Dim, InputSpec

_RANGE = re.compile(r"^(?P<name>[A-Za-z_]\w*)=(?P<min>\d+)\.\.(?P<max>\d+)(@(?P<opt>\d+))?$")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Per input: the min, opt and max shapes (and values, for shape tensors) one profile accepts."""

    name: str
    min: dict[str, tuple[int, ...]]
    opt: dict[str, tuple[int, ...]]
    max: dict[str, tuple[int, ...]]
    shape_values: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=dict)

    def __post_init__(self):
        if not (set(self.min) == set(self.opt) == set(self.max)):
            raise UsageError(f"profile {self.name}: min, opt and max must name the same inputs")
        for name in self.min:
            lo, opt, hi = self.min[name], self.opt[name], self.max[name]
            if not len(lo) == len(opt) == len(hi):
                raise UsageError(f"profile {self.name}: input {name!r} has ranks {len(lo)}, {len(opt)}, {len(hi)}; "
                                 "min, opt and max must have equal rank")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise UsageError(f"profile {self.name}: input {name!r} needs min <= opt <= max per dim, "
                                 f"found min {list(lo)}, opt {list(opt)}, max {list(hi)}")

    def accepts(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(name in self.min and len(shape) == len(self.min[name]) and
                   all(a <= s <= c for a, s, c in zip(self.min[name], shape, self.max[name]))
                   for name, shape in shapes.items())

    def to_json(self) -> dict:
        return {"name": self.name, "min": {k: list(v) for k, v in self.min.items()},
                "opt": {k: list(v) for k, v in self.opt.items()}, "max": {k: list(v) for k, v in self.max.items()},
                "shape_values": {k: [list(x) for x in v] for k, v in self.shape_values.items()}}

    @classmethod
    def from_json(cls, item: dict) -> Profile:
        tup = lambda d: {k: tuple(v) for k, v in d.items()}  # noqa: E731
        values = {k: tuple(tuple(x) for x in v) for k, v in item.get("shape_values", {}).items()}
        return cls(item["name"], tup(item["min"]), tup(item["opt"]), tup(item["max"]), values)

    @classmethod
    def from_spec(cls, spec: InputSpec, name: str = "profile0") -> Profile:
        return cls(name, spec.shapes("min"), spec.shapes("opt"), spec.shapes("max"))


def _with_dims(spec: InputSpec, dims: dict[str, Dim]) -> InputSpec:
    tensors = tuple(dataclasses.replace(t, dims=tuple(dims.get(d.name, d) if d.is_dynamic else d for d in t.dims))
                    for t in spec)
    return InputSpec(tensors)


def parse_profile(text: str, spec: InputSpec, name: str) -> Profile:
    """``batch=1..8@4,seq=1..64@16`` -> a Profile; named dims must be the spec's symbolic dims."""
    symbols = spec.symbols()
    dims = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = _RANGE.match(part)
        if not match:
            raise UsageError(f"--profile {text!r}: {part!r} is not dim=min..max[@opt], e.g. batch=1..8@4")
        dim = match["name"]
        if dim not in symbols:
            raise UsageError(f"--profile {text!r}: {dim!r} is not a symbolic dim of the inputs "
                             f"({', '.join(symbols) or 'the spec is static'})")
        lo, hi = int(match["min"]), int(match["max"])
        dims[dim] = Dim(dim, lo, int(match["opt"]) if match["opt"] else hi, hi)
    return Profile.from_spec(_with_dims(spec, dims), name)


def auto_profiles(spec: InputSpec, count: int, dim_name: str | None = None) -> list[Profile]:
    """Split one symbolic dim's range into ``count`` geometric buckets, each profile keeping every
    other dim's full range, so the profiles together accept exactly what the spec accepts."""
    if count < 1:
        raise UsageError(f"--profiles auto:{count}: the bucket count must be at least 1")
    symbols = spec.symbols()
    if not symbols:
        raise UsageError("--profiles auto:N needs symbolic dims; the input spec is static")
    dim = symbols.get(dim_name) if dim_name else next(iter(symbols.values()))
    if dim is None:
        raise UsageError(f"--profiles auto:{count}:{dim_name}: no symbolic dim {dim_name!r} ({', '.join(symbols)})")
    ratio = (dim.max / max(dim.min, 1)) ** (1 / count)
    uppers = sorted({min(dim.max, max(dim.min, math.ceil(max(dim.min, 1) * ratio ** k))) for k in range(1, count + 1)}
                    | {dim.max})
    profiles, lo = [], dim.min
    for hi in uppers:
        if hi < lo:
            continue
        bucket = Dim(dim.name, lo, hi, hi)
        profiles.append(Profile.from_spec(_with_dims(spec, {dim.name: bucket}), f"profile{len(profiles)}"))
        lo = hi + 1
    return profiles


def profiles_for(spec: InputSpec, texts: tuple[str, ...] = (), auto: str | None = None) -> list[Profile]:
    """The build's profiles: explicit ``--profile`` texts, ``auto:N``, or one spanning the spec."""
    if texts and auto:
        raise UsageError("give either --profile (one or more) or --profiles auto:N, not both")
    if auto:
        kind, _, rest = auto.partition(":")
        n, _, dim = rest.partition(":")
        if kind != "auto" or not n.isdigit():
            raise UsageError(f"--profiles {auto!r}: expected auto:N or auto:N:DIM, e.g. auto:3 or auto:3:seq")
        return auto_profiles(spec, int(n), dim or None)
    if texts:
        return [parse_profile(t, spec, f"profile{i}") for i, t in enumerate(texts)]
    return [Profile.from_spec(spec)] if spec.is_dynamic else []


def envelope(spec: InputSpec, profiles: list[Profile]) -> InputSpec:
    """The input spec whose ranges cover exactly the union of the profiles (what the bundle accepts)."""
    if not profiles:
        return spec
    dims = {}
    for tensor in spec:
        for axis, dim in enumerate(tensor.dims):
            if dim.is_dynamic:
                lo = min(p.min[tensor.name][axis] for p in profiles)
                hi = max(p.max[tensor.name][axis] for p in profiles)
                dims[dim.name] = Dim(dim.name, lo, min(max(dim.opt, lo), hi), hi)  # the spec's opt, kept inside
    return _with_dims(spec, dims)


def select(profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Index of the first profile that accepts ``shapes`` (None when none does)."""
    return next((i for i, p in enumerate(profiles) if p.accepts(shapes)), None)
