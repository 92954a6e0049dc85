"""The input spec: one truth about every model input, from export to the runtime.

Text form, one input per string (the CLI's ``--input``)::

    x:float32:[batch=1..32@8,3,224,224]
    input_ids:int64:[batch=1..16@4,seq=1..128@32]:0..30522

fields: name, dtype, dims, and optionally the half-open value range ``lo..hi`` used when
random or calibration data is drawn (token ids, masks). A dim is a fixed size (``3``), a named
symbolic dim with ``min..max@opt`` (``@opt`` defaults to ``max``), or a bare name that refers to
a symbolic dim defined by another input (``attention_mask:int64:[batch,seq]``). Inputs that use
the same name share the dim: they must have equal sizes at run time.

Only the standard library and NumPy are imported: the runtime checks feeds with this module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import numpy as np

from foundation.errors import RuntimeInputError, UsageError

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
POINTS = ("min", "opt", "max")
_DIM_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*)(=(?P<min>\d+)\.\.(?P<max>\d+)(@(?P<opt>\d+))?)?$")
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TENSOR_RE = re.compile(
    r"^(?:\"(?P<quoted>[^\"]+)\"|'(?P<single>[^']+)'|(?P<name>[^:\[\]\"']+)):(?P<dtype>\w+):\[(?P<dims>[^\]]*)\]"
    rf"(:(?P<lo>{_NUMBER})\.\.(?P<hi>{_NUMBER}))?$"
)


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dimension: fixed (``name is None``) or symbolic with ``min <= opt <= max``."""

    name: str | None
    min: int
    opt: int
    max: int
    assumed: bool = dataclasses.field(default=False, compare=False)  # a range planforge guessed (ONNX input)

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max:
            raise UsageError(
                f"dim {self.name or '(fixed)'}: expected 0 <= min <= opt <= max, "
                f"found min={self.min} opt={self.opt} max={self.max}; fix the range in the input spec"
            )
        if self.name is None and self.min != self.max:
            raise UsageError(f"a fixed dim must have one size, found {self.min}..{self.max}")

    @classmethod
    def fixed(cls, size: int) -> Dim:
        return cls(None, size, size, size)

    @property
    def is_dynamic(self) -> bool:
        return self.name is not None

    def at(self, point: str) -> int:
        return getattr(self, point)

    def __str__(self) -> str:
        if self.name is None:
            return str(self.min)
        return f"{self.name}={self.min}..{self.max}@{self.opt}"

    def __repr__(self) -> str:
        if self.name is None:
            return f"Dim.fixed({self.min})"
        return f"Dim({self.name!r}, {self.min}, {self.opt}, {self.max})"


def assumed_dims(spec: InputSpec) -> list[tuple[str, int, Dim]]:
    """(input, axis, dim) for every dim whose range was guessed, not given (``Dim.assumed``)."""
    return [(t.name, axis, d) for t in spec.tensors for axis, d in enumerate(t.dims) if d.assumed]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A named input: dtype, dims, and the value range random data is drawn from."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]
    value_range: tuple[float, float] | None = None  # integers for integer dtypes

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise UsageError(
                f"input {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}"
            )
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise UsageError(
                f"input {self.name!r}: value range {self.value_range[0]}..{self.value_range[1]} "
                "is empty; write lo..hi with lo < hi (hi is excluded)"
            )
        if self.value_range is not None and not self.dtype.startswith(("float", "bfloat")) and any(
                float(v) != int(v) for v in self.value_range):
            raise UsageError(f"input {self.name!r}: {self.dtype} values need an integer range, found "
                             f"{self.value_range[0]}..{self.value_range[1]}")

    @property
    def rank(self) -> int:
        return len(self.dims)

    def shape(self, point: str = "opt") -> tuple[int, ...]:
        return tuple(d.at(point) for d in self.dims)

    @property
    def layout(self) -> str:
        """Dims and value range as the spec writes them: ``[batch=1..32@8,3]`` or ``[2]:1..65``."""
        text = f"[{','.join(str(d) for d in self.dims)}]"
        if self.value_range is not None:
            text += f":{_number(self.value_range[0])}..{_number(self.value_range[1])}"
        return text

    def __str__(self) -> str:
        name = f'"{self.name}"' if re.search(r"[:\[\]'\s]", self.name) else self.name
        return f"{name}:{self.dtype}:{self.layout}"

    def __repr__(self) -> str:
        return f"TensorSpec.parse({str(self)!r})"

    @classmethod
    def parse(cls, text: str, known: Mapping[str, Dim] | None = None) -> TensorSpec:
        """Parse ``name:dtype:[dims][:lo..hi]``; bare dim names resolve through ``known``."""
        match = _TENSOR_RE.match(text.strip() if text.strip()[:1] in "\"'" else text.replace(" ", ""))
        if not match:
            raise UsageError(
                f"input spec {text!r} is not of the form name:dtype:[dims][:lo..hi], "
                "for example x:float32:[batch=1..32@8,3,224,224] or x:float32:[1,3,8,8]:-2.1..2.6; "
                "quote a name that holds ':' (\"input:0\":float32:[1,3])"
            )
        dims = tuple(_parse_dim(tok, text, known or {}) for tok in match["dims"].split(",") if tok)
        value_range = None
        if match["lo"] is not None:
            value_range = (_parse_number(match["lo"]), _parse_number(match["hi"]))
        name = match["quoted"] or match["single"] or match["name"]
        return cls(name, match["dtype"], dims, value_range)


def _parse_number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and re.fullmatch(r"-?\d+", text) else value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _parse_dim(token: str, text: str, known: Mapping[str, Dim]) -> Dim:
    if token.isdigit():
        return Dim.fixed(int(token))
    match = _DIM_RE.match(token)
    if not match:
        raise UsageError(
            f"input spec {text!r}: dim {token!r} is neither a size (3), a range "
            "(batch=1..32@8) nor the name of a dim defined by another input"
        )
    name = match["name"]
    if match["min"] is None:
        if name not in known:
            raise UsageError(
                f"input spec {text!r}: dim {name!r} has no range; give one "
                f"({name}=1..32@8) or define it on an earlier input"
            )
        return known[name]
    lo, hi = int(match["min"]), int(match["max"])
    opt = int(match["opt"]) if match["opt"] is not None else hi
    return Dim(name, lo, opt, hi)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """All inputs of a model, in the order the model takes them."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self):
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise UsageError(f"input names must be unique, found {names}")
        seen: dict[str, Dim] = {}
        for tensor in self.tensors:
            for dim in tensor.dims:
                if dim.is_dynamic and seen.setdefault(dim.name, dim) != dim:
                    raise UsageError(
                        f"dim {dim.name!r} is given two ranges ({seen[dim.name]} and {dim}); "
                        "a named dim must have one range across all inputs"
                    )

    @classmethod
    def parse(cls, texts: Iterable[str]) -> InputSpec:
        known: dict[str, Dim] = {}
        tensors = []
        for text in texts:
            tensor = TensorSpec.parse(text, known)
            known.update({d.name: d for d in tensor.dims if d.is_dynamic})
            tensors.append(tensor)
        return cls(tuple(tensors))

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorSpec:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def __str__(self) -> str:
        return " ".join(str(t) for t in self.tensors)

    def __repr__(self) -> str:
        return f"InputSpec.parse({[str(t) for t in self.tensors]!r})"

    def symbols(self) -> dict[str, Dim]:
        """The named dynamic dims, in order of first use."""
        out: dict[str, Dim] = {}
        for tensor in self.tensors:
            out.update({d.name: d for d in tensor.dims if d.is_dynamic and d.name not in out})
        return out

    @property
    def is_dynamic(self) -> bool:
        return bool(self.symbols())

    def shapes(self, point: str = "opt") -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(point) for t in self.tensors}

    def frozen(self, point: str = "opt") -> InputSpec:
        """Every dim fixed at its size at ``point`` (a static build); dtypes and value ranges kept."""
        return InputSpec(tuple(dataclasses.replace(t, dims=tuple(Dim.fixed(n) for n in t.shape(point)))
                               for t in self.tensors))

    def override(self, texts: Iterable[str]) -> InputSpec:
        """Replace the inputs named in ``texts`` (CLI ``--input``); the others stay."""
        known = self.symbols()
        replaced: dict[str, TensorSpec] = {}
        for text in texts:
            tensor = TensorSpec.parse(text, known)
            if tensor.name not in self.names:
                raise UsageError(
                    f"--input names {tensor.name!r}, but the model's inputs are "
                    f"{', '.join(self.names)}; use one of those names"
                )
            known.update({d.name: d for d in tensor.dims if d.is_dynamic})
            replaced[tensor.name] = tensor
        # A dim redefined by one override applies to every input that shares its name.
        redefined = {d.name: d for t in replaced.values() for d in t.dims if d.is_dynamic}
        tensors = []
        for t in self.tensors:
            if t.name not in replaced:
                t = dataclasses.replace(t, dims=tuple(redefined.get(d.name, d) if d.is_dynamic else d for d in t.dims))
            tensors.append(replaced.get(t.name, t))
        return InputSpec(tuple(tensors))

    def to_json(self) -> list[dict]:
        return [
            {
                "name": t.name,
                "dtype": t.dtype,
                "dims": [d.min if d.name is None else
                         {"name": d.name, "min": d.min, "opt": d.opt, "max": d.max} for d in t.dims],
                "value_range": list(t.value_range) if t.value_range else None,
                "text": str(t),
            }
            for t in self.tensors
        ]

    @classmethod
    def from_json(cls, items: list[dict]) -> InputSpec:
        tensors = []
        for item in items:
            dims = tuple(
                Dim.fixed(d) if isinstance(d, int) else Dim(d["name"], d["min"], d["opt"], d["max"])
                for d in item["dims"]
            )
            vr = tuple(item["value_range"]) if item.get("value_range") else None
            tensors.append(TensorSpec(item["name"], item["dtype"], dims, vr))
        return cls(tuple(tensors))

    def random_feeds(self, point: str = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded random arrays at the ``min``/``opt``/``max`` shape point."""
        rng = np.random.default_rng(seed)
        return {t.name: random_array(t, t.shape(point), rng) for t in self.tensors}

    def check_feeds(self, feeds: Mapping[str, np.ndarray], values: bool = False) -> None:
        """Raise ``RuntimeInputError`` unless names, dtypes and shapes fit this spec; with ``values``, integer
        inputs also within their declared value range (a token id past the vocabulary would reach a Gather)."""
        missing = [n for n in self.names if n not in feeds]
        extra = [n for n in feeds if n not in self.names]
        if missing or extra:
            raise RuntimeInputError(
                f"expected inputs {', '.join(self.names)}; "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {', '.join(extra)}" if extra else "")
            )
        bound: dict[str, tuple[int, str]] = {}
        for tensor in self.tensors:
            _check_one(tensor, feeds[tensor.name], bound)
            if values and tensor.value_range is not None and tensor.dtype.startswith(("int", "uint")):
                _check_values(tensor, feeds[tensor.name])


_NP_DTYPES = {name: np.dtype(name) for name in ("float32", "float16", "float64", "int64", "int32", "int8", "uint8",
                                                "bool")}


def _check_one(tensor: TensorSpec, value: np.ndarray, bound: dict[str, tuple[int, str]]) -> None:
    found = getattr(value, "dtype", None)
    if isinstance(found, np.dtype) and found == _NP_DTYPES.get(tensor.dtype):  # the hot path: no str() per call
        dtype = tensor.dtype
    else:
        dtype = str(found if found is not None else type(value).__name__)
    if dtype != tensor.dtype:
        raise RuntimeInputError(
            f"input {tensor.name!r}: expected dtype {tensor.dtype}, found {dtype}; "
            f"convert it (e.g. array.astype(np.{tensor.dtype})) - planforge does not cast silently"
        )
    shape = tuple(value.shape)
    if len(shape) != tensor.rank:
        raise RuntimeInputError(
            f"input {tensor.name!r}: expected rank {tensor.rank} "
            f"[{','.join(str(d) for d in tensor.dims)}], found shape {list(shape)}"
        )
    for axis, (dim, size) in enumerate(zip(tensor.dims, shape)):
        if not dim.min <= size <= dim.max:
            allowed = f"{dim.min}..{dim.max}" if dim.is_dynamic else str(dim.min)
            raise RuntimeInputError(
                f"input {tensor.name!r}: dim {axis} ({dim.name or 'fixed'}) is {size}, "
                f"allowed {allowed}; use a shape inside the bundle's range or rebuild with a wider --input"
            )
        if dim.is_dynamic:
            first = bound.setdefault(dim.name, (size, tensor.name))
            if first[0] != size:
                raise RuntimeInputError(
                    f"input {tensor.name!r}: dim {dim.name!r} is {size}, but input {first[1]!r} "
                    f"has {dim.name}={first[0]}; inputs sharing a dim must agree"
                )


def _check_values(tensor: TensorSpec, value) -> None:
    array = np.asarray(value) if isinstance(value, np.ndarray) else None
    if array is None or not array.size:
        return
    lo, hi = tensor.value_range
    low, high = int(array.min()), int(array.max())
    if low < lo or high >= hi:
        raise RuntimeInputError(f"input {tensor.name!r}: values {low}..{high} fall outside the spec's range {lo}..{hi} "
                                f"(hi excluded), e.g. a token id past the vocabulary; fix the input, or load with "
                                "check_values=False to skip this check")


def random_array(tensor: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard-normal floats, uniform integers in the value range (default 0..2), 0/1 bools."""
    if tensor.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if tensor.dtype.startswith(("int", "uint")):
        lo, hi = tensor.value_range or (0, 2)
        return rng.integers(lo, hi, size=shape).astype(tensor.dtype)
    if tensor.value_range is not None:
        lo, hi = tensor.value_range
        values = rng.uniform(lo, hi, size=shape)
    else:
        values = rng.standard_normal(size=shape)
    if tensor.dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - only for bfloat16 inputs

        return values.astype(ml_dtypes.bfloat16)
    return values.astype(tensor.dtype)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """A model output as the exported graph declares it: dims are sizes or symbolic names."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, item: dict) -> OutputSpec:
        return cls(item["name"], item["dtype"], tuple(item["shape"]))


def batch_dim(spec: InputSpec, outputs: list[OutputSpec]) -> tuple[str | None, str]:
    """The symbolic dim every input and every output leads with (the batch, which a batcher may merge
    requests along), or None and why there is none."""
    batch = None
    for tensor in spec:
        first = tensor.dims[0] if tensor.dims else None
        if first is None or first.name is None:
            return None, (f"input {tensor.name!r} has no dynamic leading (batch) dim ({tensor}); rebuild it with a "
                          "dynamic batch, e.g. --input \"x:float32:[batch=1..32@8,...]\"")
        if batch is None:
            batch = first.name
        elif first.name != batch:
            return None, f"inputs lead with different dims ({batch!r}, {first.name!r})"
    for out in outputs:
        if not out.shape or out.shape[0] != batch:
            return None, (f"output {out.name!r} has shape {list(out.shape)}, not led by the batch dim {batch!r}; its "
                          "rows cannot be split back to the requests")
    return batch, ""
