"""What ``compare`` is asked (``CompareRequest``) and what it answers: one ``PairResult`` per runner
against the reference, gathered in a ``CompareResult``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engines.evaluate.compare.data import CompareData
from engines.evaluate.compare.tolerances import ERROR_STATS, OPTIONS, per_output
from foundation.errors import ComparisonFailed


@dataclasses.dataclass(frozen=True)
class CompareRequest:
    bundle: Path
    data: str = "auto"  # auto | golden | random | eval | PATH
    iterations: int = 4  # random data
    point: str = "opt"  # random data
    seed: int = 0
    atol: tuple[str, ...] = ()  # VALUE or OUTPUT:VALUE
    rtol: tuple[str, ...] = ()
    error_stat: tuple[str, ...] = ()
    quantile: tuple[str, ...] = ()
    reference: str = "auto"  # auto | pytorch | onnx
    report: Path | None = None  # default: report.json in the bundle
    save_inputs: Path | None = None  # Polygraphy JSON, for `polygraphy run --load-inputs`
    threads: int | None = None
    cache_dir: Path = Path("build/.cache")

    def overrides(self) -> dict[str, dict]:
        return {"atol": per_output(self.atol, OPTIONS["atol"]), "rtol": per_output(self.rtol, OPTIONS["rtol"]),
                "stat": per_output(self.error_stat, OPTIONS["stat"], str, ERROR_STATS),
                "quantile": per_output(self.quantile, OPTIONS["quantile"], upper=1.0)}


@dataclasses.dataclass
class Side:
    """One runner in the comparison and what it runs."""

    name: str
    precision: str
    runner: object
    artifact: str | None = None
    target: str | None = None  # the graph's target (ort: run optimized, trt: as written), None otherwise


@dataclasses.dataclass
class PairResult:
    reference: str
    runner: str
    precision: str
    outputs: dict[str, dict]
    budget: dict | None
    passed: bool
    graph: str | None = None  # the bundle's graph this side ran under ONNX Runtime
    target: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompareResult:
    bundle: Path
    data: CompareData
    reference: str
    pairs: list[PairResult]
    skipped: dict[str, str]
    task_metric: dict | None
    polygraphy: list[str]
    cpu: dict = dataclasses.field(default_factory=dict)  # this CPU's class; where the INT8 ort graph was validated
    report: Path | None = None
    stateful: bool = False  # state fed back between batches: Polygraphy's CLI cannot repeat it

    @property
    def ok(self) -> bool:
        return all(p.passed for p in self.pairs)

    def to_json(self) -> dict:
        return {"ok": self.ok, "data": self.data.to_json(), "reference": self.reference,
                "pairs": [p.to_json() for p in self.pairs], "skipped": self.skipped,
                "task_metric": self.task_metric, "polygraphy_commands": self.polygraphy, "cpu": self.cpu}

    def raise_for_failures(self) -> None:
        """``ComparisonFailed`` naming the failed checks (exit code 4), or nothing."""
        if not self.ok:
            raise ComparisonFailed(f"{len(self.failures())} check(s) failed: {', '.join(self.failures())}; "
                                   f"details in {self.report}")

    def failures(self) -> list[str]:
        return [f"{p.runner} {name}" for p in self.pairs for name, o in p.outputs.items() if not o["passed"]] + \
               [f"{p.runner} {p.budget['metric']}" for p in self.pairs if p.budget and not p.budget["passed"]]
