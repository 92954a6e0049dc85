"""Parity: do ONNX Runtime's outputs equal PyTorch's on the same inputs?

Checked on seeded random inputs at the ``min`` and ``max`` point of the input spec (one ``opt``
point for static specs): each output passes when ``|ort - torch| <= atol + rtol * |torch|``
everywhere (NumPy's ``allclose``), and the same NaNs appear. The inputs and PyTorch's outputs
are kept: they become the bundle's ``golden.npz``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from foundation.errors import ParityError
from foundation.golden import golden_key
from foundation.numerics import ArrayError, compare_arrays, scaled_atol
from foundation.ort_session import create_session
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class ParityReport:
    atol: float
    rtol: float
    points: dict[str, dict[str, ArrayError]]  # point -> output -> error
    golden: dict[str, np.ndarray]  # "<point>/in/<name>", "<point>/out/<name>"

    @property
    def ok(self) -> bool:
        return all(e.ok for errs in self.points.values() for e in errs.values())

    def worst(self) -> dict[str, dict]:
        """Per output, the largest errors over all points."""
        out: dict[str, dict] = {}
        for errs in self.points.values():
            for name, e in errs.items():
                w = out.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "ok": True})
                w["max_abs"], w["max_rel"] = max(w["max_abs"], e.max_abs), max(w["max_rel"], e.max_rel)
                w["ok"] = w["ok"] and e.ok
        return out

    def to_json(self) -> dict:
        return {
            "atol": self.atol, "rtol": self.rtol, "ok": self.ok,
            "points": {p: {n: e.to_json() for n, e in errs.items()} for p, errs in self.points.items()},
            "worst": self.worst(),
        }


def torch_outputs(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(v.copy()) for v in feeds.values()])
    if isinstance(result, torch.Tensor):
        result = (result,)
    flat = torch.utils._pytree.tree_leaves(result)
    return [t.detach().cpu().numpy() for t in flat]


def check_parity(
    module: torch.nn.Module,
    onnx_path: Path,
    spec: InputSpec,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
    points: tuple[str, ...] | None = None,
    given: dict[str, dict[str, np.ndarray]] | None = None,
    scaled: bool = False,
) -> ParityReport:
    """Run both at each shape point (seeded random feeds from the spec), or on the ``given`` feeds per named
    point (a decoder's prefill and decode step, whose dims depend on each other); raise ``ParityError``
    naming the worst output when they differ. ``scaled``: ``atol`` is relative to each output's largest
    magnitude (``foundation.numerics.scaled_atol``), for a language model's logits."""
    session = create_session(onnx_path, optimize=True)
    names = [o.name for o in session.get_outputs()]
    points = tuple(given) if given else points or (("min", "max") if spec.is_dynamic else ("opt",))
    report = ParityReport(atol, rtol, {}, {})
    for i, point in enumerate(points):
        feeds = given[point] if given else spec.random_feeds(point, seed + i)
        expected = torch_outputs(module, feeds)
        actual = session.run(names, feeds)
        if len(expected) != len(actual):
            raise ParityError(f"PyTorch returns {len(expected)} outputs, the ONNX graph {len(actual)} ({names})")
        report.points[point] = {n: compare_arrays(a, e, scaled_atol(atol, e) if scaled else atol, rtol)
                                for n, a, e in zip(names, actual, expected)}
        report.golden.update({golden_key(point, "in", k): v for k, v in feeds.items()})
        report.golden.update({golden_key(point, "out", n): e for n, e in zip(names, expected)})
        for name, err in report.points[point].items():
            logger.debug("parity %s %s: max_abs=%.3g max_rel=%.3g", point, name, err.max_abs, err.max_rel)
    if not report.ok:
        point, name, err = next((p, n, e) for p, errs in report.points.items() for n, e in errs.items() if not e.ok)
        shapes = {k: list(v.shape) for k, v in (given[point] if given else spec.random_feeds(point, 0)).items()}
        raise ParityError(
            f"ONNX Runtime differs from PyTorch on output {name!r} at the {point} shapes {shapes}: "
            f"max abs error {err.max_abs:.3g}, max rel error {err.max_rel:.3g}, "
            f"allowed atol={atol:g} rtol={rtol:g}. The export is not faithful (data-dependent control flow "
            "traced as a constant is a common cause); fix the model, or loosen --parity-atol/--parity-rtol "
            "if the error is expected"
        )
    return report

