"""How requests are put together into one batch and the results taken apart again.

``Batching`` holds the serving options (after Triton's dynamic batcher and queue policy). ``Layout``
is what a bundle allows: every input and output must lead with the same dynamic batch dim (a bundle
whose batch dim is fixed or absent is refused, naming the input or output); requests whose other dims
and dtypes match are concatenated along it. A dim declared paddable (``pad``; by default a transformer's
sequence dim, when an ``attention_mask`` input carries it) lets requests of different lengths share a
batch when their lengths fall in the same power-of-two bucket (padding at most doubles a request's
work): each input is padded at the end with its pad value, and outputs carrying that dim (by name, in
the manifest's output shapes) are trimmed back to each request's length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from foundation.errors import UsageError
from foundation.spec import InputSpec, OutputSpec, batch_dim

MASKS = ("attention_mask",)  # inputs whose zeros make padding invisible to the model


@dataclasses.dataclass(frozen=True)
class Batching:
    """Serving options. ``max_batch``: None is the largest batch the bundle's profiles take.
    ``max_delay_ms``: how long a forming batch may wait for more requests, only when requests are already
    queueing (a lone caller never waits). ``max_queue``: requests waiting beyond it are refused
    (``Overloaded``) or degraded. ``timeout_ms``: a request still queued past it is refused
    (``DeadlineExceeded``) or degraded. ``pad``: ``"auto"``, None (no padding), or ``{dim: {input: pad
    value}}``. ``breaker_failures`` consecutive failed runs open the circuit breaker for
    ``breaker_cooldown_s``: batches go to the fallback runner meanwhile."""

    max_batch: int | None = None
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    timeout_ms: float | None = None
    pad: str | dict | None = "auto"
    trim_padding: bool = True
    breaker_failures: int = 3
    breaker_cooldown_s: float = 10.0

    def __post_init__(self):
        if self.max_batch is not None and self.max_batch < 1:
            raise UsageError(f"max_batch {self.max_batch}: expected at least 1")
        if self.max_delay_ms < 0 or self.max_queue < 1 or (self.timeout_ms is not None and self.timeout_ms <= 0):
            raise UsageError("max_delay_ms >= 0, max_queue >= 1 and timeout_ms > 0 (or None) are expected")


@dataclasses.dataclass(frozen=True)
class Layout:
    batch: str  # the batch dim's name
    inputs: tuple[str, ...]
    pad: dict[str, dict[str, float]]  # dim -> {input: pad value}
    axes: dict[str, dict[str, tuple[int, ...]]]  # dim -> {input or output: the axes it is at}
    max_batch: int
    padded: frozenset = frozenset()  # (tensor, axis) pairs of the paddable dims, for ``key``
    trimmable: bool = False  # every output's dims are known by name or size: trimmed ones can be restored

    def key(self, feeds: Mapping[str, np.ndarray]) -> tuple:
        """Requests with equal keys may share a batch: dtypes and non-batch dims; a paddable dim by its length's
        power-of-two bucket, so padding at most doubles a request (a 5-token request does not run at 128)."""
        return tuple((n, feeds[n].dtype.str, tuple(("bucket", max(int(s) - 1, 0).bit_length()) if (n, k) in self.padded
                                                  else s for k, s in enumerate(feeds[n].shape) if k > 0))
                     for n in self.inputs)

    def lengths(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        out = {}
        for dim, where in self.axes.items():
            if dim in self.pad:
                name = next(n for n in where if n in feeds)
                out[dim] = feeds[name].shape[where[name][0]]
        return out

    def merge(self, requests: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One batch: each input concatenated along the batch axis, paddable dims padded to the longest."""
        longest = {dim: max(self.lengths(r)[dim] for r in requests) for dim in self.pad}
        merged = {}
        for name in self.inputs:
            parts = []
            for r in requests:
                array = r[name]
                widths = [(0, 0)] * array.ndim
                for dim, values in self.pad.items():
                    if name in values:
                        for axis in self.axes[dim][name]:
                            widths[axis] = (0, longest[dim] - array.shape[axis])
                if any(w != (0, 0) for w in widths):
                    array = np.pad(array, widths, constant_values=self.pad_value(name))
                parts.append(array)
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return merged

    def trim(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(feeds without the trailing positions that the attention mask zeroes in every row, the lengths
        before). Trailing only: a left-padded batch keeps its padding (cutting it would move positions)."""
        before, out = self.lengths(feeds), dict(feeds)
        if not self.trimmable:
            return out, before
        for dim, values in self.pad.items():
            mask = next((n for n in MASKS if n in values), None)
            if mask is None:
                continue
            axis = self.axes[dim][mask][0]
            rows = np.any(out[mask] != 0, axis=tuple(a for a in range(out[mask].ndim) if a != axis))
            used = np.flatnonzero(rows)
            keep = int(used[-1]) + 1 if used.size else 1
            if keep >= out[mask].shape[axis]:
                continue
            for name in values:
                index = [slice(None)] * out[name].ndim
                for a in self.axes[dim][name]:
                    index[a] = slice(0, keep)
                out[name] = np.ascontiguousarray(out[name][tuple(index)])
        return out, before

    def restore(self, outputs: Mapping[str, np.ndarray], before: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Outputs padded back with zeros to the lengths a request had before ``trim``."""
        result = dict(outputs)
        for dim, where in self.axes.items():
            if dim not in self.pad or dim not in before:
                continue
            for name in (n for n in where if n in outputs):
                widths = [(0, 0)] * outputs[name].ndim
                for axis in where[name]:
                    widths[axis] = (0, before[dim] - outputs[name].shape[axis])
                if any(w != (0, 0) for w in widths):
                    result[name] = np.pad(outputs[name], widths)
        return result

    def pad_value(self, name: str):
        return next((values[name] for values in self.pad.values() if name in values), 0)

    def split(self, outputs: Mapping[str, np.ndarray], sizes: list[int], lengths: list[dict[str, int]]) -> list[dict]:
        """Each request's rows of every output, trimmed back along the paddable dims it carries."""
        results, start = [], 0
        for size, length in zip(sizes, lengths):
            result = {}
            for name, array in outputs.items():
                part = array[start:start + size]
                for dim, where in self.axes.items():
                    if dim in self.pad and name in where:
                        index = [slice(None)] * part.ndim
                        for axis in where[name]:  # a dim may stand twice ([batch, seq, seq] attention maps)
                            index[axis] = slice(0, length[dim])
                        part = part[tuple(index)]
                result[name] = np.ascontiguousarray(part)
            results.append(result)
            start += size
        return results


def layout(spec: InputSpec, outputs: list[OutputSpec], options: Batching, profile_max: int | None) -> Layout:
    """What the bundle allows (module docstring); a ``UsageError`` naming what prevents batching."""
    batch, why_not = batch_dim(spec, outputs)
    if batch is None:
        raise UsageError(f"cannot batch this bundle: {why_not}")
    axes: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in spec:
        for k, d in enumerate(tensor.dims):
            if k > 0 and d.name is not None:
                where = axes.setdefault(d.name, {})
                where[tensor.name] = where.get(tensor.name, ()) + (k,)
    for out in outputs:
        for k, d in enumerate(out.shape):
            if k > 0 and isinstance(d, str) and d in axes:
                axes[d][out.name] = axes[d].get(out.name, ()) + (k,)
    pad = _pad(spec, options.pad, axes)
    largest = max((d.max for t in spec for d in t.dims[:1]), default=1)
    limit = min(x for x in (options.max_batch, profile_max, largest) if x is not None)
    padded = frozenset((name, axis) for dim in pad for name, where in axes[dim].items() for axis in where)
    trimmable = all(isinstance(d, int) or d in axes for out in outputs for d in out.shape[1:])
    return Layout(batch, tuple(spec.names), pad, axes, limit, padded, trimmable)


def _pad(spec: InputSpec, pad, axes: dict) -> dict[str, dict[str, float]]:
    if pad is None:
        return {}
    if pad == "auto":
        masks = [t for t in spec if t.name in MASKS]
        dims = {d.name for t in masks for d in t.dims[1:] if d.name is not None}
        return {dim: {name: 0 for name in axes.get(dim, {}) if name in spec.names} for dim in dims}
    out = {}
    for dim, values in dict(pad).items():
        if dim not in axes:
            raise UsageError(f"pad: {dim!r} is not a dynamic dim of the inputs (those are {', '.join(axes) or 'none'})")
        missing = [n for n in axes[dim] if n in spec.names and n not in values]
        if missing:
            raise UsageError(f"pad: dim {dim!r} also appears in {', '.join(missing)}: give each a pad value")
        out[dim] = dict(values)
    return out
