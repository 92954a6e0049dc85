"""Numbers every room agrees on: graph tolerances per precision, cosine, top-1, the INT8 budget.

- FP32 graph tolerance: ``|actual - ref| <= 1e-4 + 1e-3 * |ref|`` elementwise.
- FP16 budget (the FP16 pass, the build's graph check, compare): ``max |actual - ref| <=
  2e-2 * max|ref| + 1e-3`` per output.
- Cosine similarity per sample (a sample is one index of the first axis): two all-zero vectors
  agree (1.0); one all-zero vector against a non-zero one does not (0.0), so an INT8 output
  collapsed to zero on a sample fails a cosine budget instead of passing it.
- INT8 budgets: ``top1=0.99`` (top-1 agreement with FP32 on the first output), ``cosine=0.99``
  (mean per-sample cosine over all float outputs), ``relerr=0.05`` (max |INT8 - FP32| / max |FP32|
  per output).

NumPy and the standard library only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from exporter.core.errors import UsageError

GRAPH_ATOL, GRAPH_RTOL = 1e-4, 1e-3  # an optimized FP32 graph against its reference
FP16_RANGE_FRACTION, FP16_FLOOR = 2e-2, 1e-3
BUDGET_METRICS = ("top1", "cosine", "relerr")
DEFAULT_BUDGETS = {"classification": "top1=0.99", "embedding": "cosine=0.99", "generation": "cosine=0.99"}


def fp16_atol(reference: np.ndarray) -> float:
    """The FP16 budget's absolute bound for one output."""
    return FP16_RANGE_FRACTION * float(np.abs(reference).max(initial=0.0)) + FP16_FLOOR


def graph_tolerance(precision: str, reference: np.ndarray) -> tuple[float | None, float]:
    """(atol, rtol) a graph of this precision may differ from ``reference`` by; atol None records only
    (INT8: the budget metric decides)."""
    if precision == "fp16":
        return fp16_atol(reference), 0.0
    if precision == "int8":
        return None, 0.0
    return GRAPH_ATOL, GRAPH_RTOL


def cosine_per_sample(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (rows after flattening all but the first axis)."""
    rr = reference.reshape(reference.shape[0], -1).astype(np.float64)
    aa = actual.reshape(actual.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(rr, axis=1) * np.linalg.norm(aa, axis=1)
    both_zero = ~rr.any(axis=1) & ~aa.any(axis=1)
    return np.where(denom > 0, (rr * aa).sum(axis=1) / np.maximum(denom, 1e-300), both_zero.astype(float))


def top1_agreement(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Share of samples, over batches of one output, whose argmax over the last axis agrees."""
    agree = [np.argmax(a, -1) == np.argmax(r, -1) for r, a in zip(reference, actual)]
    return float(np.concatenate([x.reshape(-1) for x in agree]).mean())


@dataclasses.dataclass(frozen=True)
class Budget:
    """An INT8 accuracy budget: ``metric`` (top1 | cosine | relerr) against ``threshold``."""

    metric: str
    threshold: float

    def __post_init__(self):
        if self.metric not in BUDGET_METRICS:
            raise UsageError(f"budget metric {self.metric!r}: expected one of {', '.join(BUDGET_METRICS)}")

    @classmethod
    def parse(cls, text: str | None, task: str | None) -> "Budget":
        """``top1=0.99`` (the CLI's form); None: the task's default."""
        text = text or DEFAULT_BUDGETS.get(task or "", "relerr=0.05")
        metric, _, value = text.partition("=")
        if metric not in BUDGET_METRICS or not value:
            raise UsageError(f"budget {text!r}: expected top1=0.99, cosine=0.99 or relerr=0.05")
        try:
            return cls(metric, float(value))
        except ValueError as exc:
            raise UsageError(f"budget {text!r}: {value!r} is not a number") from exc

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.metric == "relerr" else value >= self.threshold

    def loss(self, value: float) -> float:
        """Larger is worse, for ordering sensitivities."""
        return value if self.metric == "relerr" else 1.0 - value

    def to_json(self) -> dict:
        return {"metric": self.metric, "threshold": self.threshold}

    @classmethod
    def from_json(cls, data: dict) -> "Budget":
        return cls(data["metric"], float(data["threshold"]))

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.metric == 'relerr' else '>='} {self.threshold:g}"


def budget_metric(budget: Budget, reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    """The budget's metric over batches (each a list of outputs in graph order)."""
    if budget.metric == "top1":
        return top1_agreement([r[0] for r in reference], [a[0] for a in actual])
    if budget.metric == "cosine":
        cos = []
        for r, a in zip(reference, actual):
            floats = [(np.atleast_1d(x), np.atleast_1d(y)) for x, y in zip(r, a) if x.dtype.kind == "f"]
            if len({x.shape[0] for x, _ in floats}) == 1:  # batch-first outputs: one vector per sample
                rr = np.concatenate([x.reshape(x.shape[0], -1) for x, _ in floats], axis=1)
                aa = np.concatenate([y.reshape(y.shape[0], -1) for _, y in floats], axis=1)
                cos.append(cosine_per_sample(rr, aa))
            else:  # outputs whose first dims differ (time-major, state, scalars): one vector per output
                cos += [cosine_per_sample(x.reshape(1, -1), y.reshape(1, -1)) for x, y in floats]
        return float(np.concatenate(cos).mean())
    worst = 0.0
    for r, a in zip(reference, actual):
        for x, y in zip(r, a):
            scale = float(np.abs(x).max(initial=0.0)) or 1.0
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max(initial=0.0)) / scale)
    return worst
