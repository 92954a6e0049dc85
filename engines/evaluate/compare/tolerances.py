"""How far a graph of each precision may differ from its reference, and per-output overrides.

FP32: ``|actual - ref| <= 1e-4 + 1e-3 * |ref|`` elementwise. FP16: the budget of
``passes/convert_fp16.py``, ``max |actual - ref| <= 2e-2 * max|ref| + 1e-3``. INT8: the bundle's
accuracy budget (``top1=0.99``, ``cosine=0.99`` or ``relerr=0.05``, see ``engines.build.int8``) decides;
elementwise errors are recorded without a bound, except ``relerr``, which is a bound on the max
absolute error relative to the output's range and so is checked as one (not where the budget judges
only the positions an attention mask keeps: an elementwise bound would judge the padding too).

Overrides are ``NAME:VALUE`` for one output or a bare ``VALUE`` for all (``--atol logits:1e-3``).
Lean: NumPy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from foundation.errors import UsageError
from foundation.numerics import Budget, graph_tolerance

ERROR_STATS = ("elemwise", "max", "mean", "median", "quantile")
OPTIONS = {"atol": "--atol", "rtol": "--rtol", "stat": "--error-stat", "quantile": "--error-quantile"}


def per_output(values: tuple[str, ...], option: str, kind=float, choices: tuple[str, ...] = (),
               upper: float | None = None) -> dict:
    """``("1e-3", "logits:1e-2")`` -> ``{"": 1e-3, "logits": 1e-2}``; a ``UsageError`` says what is wrong."""
    out = {}
    for text in values:
        name, sep, value = text.rpartition(":")
        if not sep:
            name, value = "", text
        if sep and not name:
            raise UsageError(f"{option} {text!r}: expected VALUE or OUTPUT:VALUE, e.g. {option} logits:1e-3")
        try:
            parsed = kind(value)
        except ValueError:
            raise UsageError(f"{option} {text!r}: {value!r} is not a {kind.__name__}; expected VALUE or OUTPUT:VALUE, "
                             f"e.g. {option} logits:{'max' if choices else '1e-3'}") from None
        if choices and parsed not in choices:
            raise UsageError(f"{option} {text!r}: {value!r} is not one of {', '.join(choices)}")
        if kind is float and not parsed >= 0:
            raise UsageError(f"{option} {text!r}: expected a number >= 0")
        if upper is not None and parsed > upper:
            raise UsageError(f"{option} {text!r}: expected a number in [0, {upper:g}]")
        out[name] = parsed
    return out


def check_output_names(overrides: dict[str, dict], outputs: list[str]) -> None:
    """Every output an override names exists (a typo would silently leave the default in place)."""
    for key, values in overrides.items():
        unknown = [n for n in values if n and n not in outputs]
        if unknown:
            raise UsageError(
                f"{OPTIONS.get(key, key)} names {', '.join(map(repr, unknown))}, which the model does not output; "
                f"its outputs are {', '.join(outputs)}"
            )


@dataclasses.dataclass(frozen=True)
class OutputTolerance:
    """What one output of one runner is checked against."""

    atol: float | None  # None: errors are recorded, the budget metric decides
    rtol: float
    stat: str = "elemwise"
    quantile: float = 0.99
    source: str = "precision"  # precision | budget | override

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tolerances(precision: str, references: dict[str, list[np.ndarray]], budget: Budget | None,
               overrides: dict[str, dict], judged: list[str] | None = None) -> dict[str, OutputTolerance]:
    """Per output: the precision's default (see the module docstring), then the user's overrides."""
    out = {}
    for name, arrays in references.items():
        scale = max((float(np.abs(a.astype(np.float64)).max(initial=0.0)) for a in arrays if a.size), default=0.0)
        atol, rtol = graph_tolerance(precision, np.array([scale]))
        stat, source = ("max" if precision == "fp16" else "elemwise"), "precision"
        if precision == "int8" and budget and budget.metric == "relerr" and budget.stat in (None, "max") \
                and budget.mask is None and budget.output in (None, name) and (judged is None or name in judged):
            atol, rtol, stat, source = budget.threshold * (scale or 1.0), 0.0, "max", "budget"
        tol = OutputTolerance(atol, rtol, stat, 0.99, source)
        given = {key: values.get(name, values.get("")) for key, values in overrides.items()}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            tol = dataclasses.replace(tol, **given, source="override")
            if tol.atol is None:
                tol = dataclasses.replace(tol, atol=0.0)
        out[name] = tol
    return out
