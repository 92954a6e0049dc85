"""Where INT8 calibration data comes from, and checking it against the input spec.

Sources (``--calib``): a directory of ``.npz`` files (one batch each, keyed by input name) or
``.npy`` files (single-input models, one batch each); ``module:function`` or
``path/to/file.py:function`` returning an iterable of feed dicts; nothing, for a zoo model with
its own set. Random data only with ``--allow-random-calibration``, loudly. Every batch is checked
against the input spec as the runtime checks feeds (names, dtypes, shapes within the ranges, integer
values within the declared value range: ``InputSpec.check_feeds(values=True)``), with the runtime's
message and an error naming the file: the held-out batches become the bundle's ``evaluation.npz``,
which ``compare`` feeds the runtime, so data it would refuse is refused here, before any work.
Every fifth batch is held out for the accuracy budget unless the source provides its own split.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from foundation.errors import CalibrationError, RuntimeInputError, UsageError
from foundation.files import load_batches
from foundation.loading import import_function
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)

RANDOM_BATCHES = 10


@dataclasses.dataclass
class CalibrationSet:
    calibration: list[dict[str, np.ndarray]]
    evaluation: list[dict[str, np.ndarray]]
    source: str

    @property
    def samples(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.calibration)


def load_calibration(source: str | None, spec: InputSpec, zoo_entry=None, module=None,
                     allow_random: bool = False) -> CalibrationSet:
    if source in (None, "", "zoo"):
        if zoo_entry is not None and zoo_entry.calibration:
            calibration, evaluation = zoo_entry.calibration_data(module)
            return _checked(calibration, evaluation, spec, f"zoo:{zoo_entry.name} ({zoo_entry.calibration})")
        if not allow_random:
            raise CalibrationError(
                "INT8 needs calibration data that looks like production inputs: pass --calib DIR (of .npz/.npy "
                "batches) or --calib module:function, or --allow-random-calibration to accept random data"
            )
        source = "random"
    if source == "random":
        if not allow_random:
            raise CalibrationError("--calib random needs --allow-random-calibration")
        logger.warning("CALIBRATING ON RANDOM DATA: INT8 ranges will not match real inputs; accuracy is unknown")
        batches = [spec.random_feeds("opt", seed=i) for i in range(RANDOM_BATCHES)]
        return _checked(*_split(batches), spec, "random")
    path = Path(source)
    if path.is_dir():
        return _checked(*_split(_read_dir(path, spec)), spec, f"dir:{path}")
    if ":" in source:
        return _checked(*_split(_call(source)), spec, f"function:{source}")
    raise CalibrationError(
        f"calibration source {source!r} is neither a directory nor module:function; "
        "expected a directory of .npz/.npy batches or a function yielding feed dicts"
    )


def _read_dir(path: Path, spec: InputSpec) -> list[dict]:
    try:
        pairs = load_batches(path, spec.names, with_files=True)
    except UsageError as exc:
        raise CalibrationError(f"calibration data: {exc}") from exc
    for file, batch in pairs:
        _check(batch, spec, str(file))
    return [batch for _, batch in pairs]


def _call(source: str) -> list[dict]:
    try:
        batches = list(import_function(source, "--calib")())
    except (CalibrationError, UsageError):
        raise
    except Exception as exc:  # user code may raise anything
        raise CalibrationError(f"calibration function {source} failed: {type(exc).__name__}: {exc}") from exc
    if not all(isinstance(b, dict) for b in batches):
        raise CalibrationError(f"calibration function {source} must yield dicts of input name -> array")
    return batches


def _split(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    if len(batches) < 2:
        logger.warning("one calibration batch: the accuracy budget is measured on the calibration data itself")
        return batches, batches
    evaluation = batches[4::5] or batches[-1:]
    calibration = [b for i, b in enumerate(batches) if (i + 1) % 5] if len(batches) >= 5 else batches[:-1]
    return calibration, evaluation


def _check(batch: dict, spec: InputSpec, where: str) -> None:
    try:
        spec.check_feeds(batch, values=True)  # the runtime's check (engines.runtime.base), values included
    except RuntimeInputError as exc:
        raise CalibrationError(f"{where}: {exc}. Expected the input spec {spec}") from exc


def _checked(calibration: list[dict], evaluation: list[dict], spec: InputSpec, source: str) -> CalibrationSet:
    if not calibration:
        raise CalibrationError(f"calibration source {source} yielded no batches")
    for i, batch in enumerate(calibration + evaluation):
        _check(batch, spec, f"{source} batch {i}")
    return CalibrationSet(calibration, evaluation, source)
