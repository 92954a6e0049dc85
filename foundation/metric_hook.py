"""A user's task metric as the INT8 budget (``--metric file.py:function``), used the same way by the
build's fallback search and by ``compare``.

The function is called once per evaluation over all held-out batches::

    def function(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                 feeds: dict[str, np.ndarray]) -> tuple[float, bool]

with each output and input concatenated over the batches along the first axis (kept as a list of
per-batch arrays where the batches' other dims differ). It returns a score (higher is better; it
orders the fallback's sensitivities) and whether the candidate passes. ``reference`` is FP32.
"""

from __future__ import annotations

import functools

import numpy as np

from foundation.errors import UsageError
from foundation.loading import import_function


@functools.lru_cache(maxsize=8)
def load_metric(source: str):
    """The callable ``file.py:function`` or ``module:function`` names."""
    try:
        return import_function(source, "--metric")
    except UsageError:
        raise
    except Exception as exc:  # user code may raise anything
        raise UsageError(f"--metric {source}: importing it raised {type(exc).__name__}: {exc}") from exc


def _joined(batches: list[np.ndarray]):
    shapes = {b.shape[1:] for b in batches}
    return np.concatenate(batches) if len(shapes) == 1 and all(b.ndim for b in batches) else list(batches)


def call_metric(source: str, reference: list[list[np.ndarray]], actual: list[list[np.ndarray]],
                names: list[str] | None, feeds: list[dict] | None) -> tuple[float, bool]:
    """(score, passed) from the user's function over the batches."""
    if names is None:
        raise UsageError(f"--metric {source}: output names are needed to call it")
    ref = {n: _joined([r[k] for r in reference]) for k, n in enumerate(names)}
    act = {n: _joined([a[k] for a in actual]) for k, n in enumerate(names)}
    inputs = {k: _joined([f[k] for f in feeds]) for k in feeds[0]} if feeds else {}
    try:
        result = load_metric(source)(ref, act, inputs)
    except UsageError:
        raise
    except Exception as exc:  # user code may raise anything
        raise UsageError(f"--metric {source} raised {type(exc).__name__}: {exc}") from exc
    try:
        score, passed = result
        return float(score), bool(passed)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--metric {source} must return (score, passed); it returned {result!r}") from exc
