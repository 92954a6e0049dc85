"""The inputs ``planforge compare`` feeds every runner: one list of feed dicts, one per iteration.

- ``golden``: the bundle's ``golden.npz`` (the inputs of the build's parity check, one iteration
  per shape point), read after its sha256 matched the manifest.
- ``random``: Polygraphy's ``DataLoader`` driven by the input spec: seeded, shapes at a spec
  point, values in each input's value range (integer inputs such as token ids stay valid; ``hi``
  is exclusive in the spec, inclusive in Polygraphy, so it is passed as ``hi - 1``), floats in
  [-1, 1] without one.
- ``eval``: the held-out batches the INT8 budget was measured on: the bundle's ``evaluation.npz``
  (any model; sha256-checked), or for older bundles a zoo model's evaluation batches. The default
  for INT8 bundles, so compare repeats the build's verdict.
- ``PATH``: an ``.npz`` file (one iteration, keyed by input name) or a directory of them.

Every iteration is checked against the input spec before any runner sees it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from engines.bundle import Manifest, golden_feeds, golden_points, verified_path
from engines.bundle.evaluation import load_evaluation
from engines.evaluate.compare.runners import input_metadata, polygraphy_quiet
from foundation.errors import RuntimeInputError, UsageError
from foundation.files import load_batches
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)

SOURCES = ("auto", "golden", "random", "eval")


@dataclasses.dataclass
class CompareData:
    source: str  # golden | random | eval | a path
    feeds: list[dict[str, np.ndarray]]
    description: str

    def to_json(self) -> dict:
        return {"source": self.source, "iterations": len(self.feeds), "description": self.description,
                "shapes": [{k: list(v.shape) for k, v in f.items()} for f in self.feeds]}


def load_data(source: str, bundle: Path, manifest: Manifest, spec: InputSpec, iterations: int = 4, point: str = "opt",
              seed: int = 0, module=None) -> CompareData:
    """The feeds for ``source`` (see the module docstring); ``auto`` is ``eval`` for INT8 zoo bundles."""
    if source == "auto":
        stored = _stored_evaluation(manifest)
        budgeted = manifest.precision == "int8" or bool(manifest.accuracy and (manifest.accuracy.prune or
                                                                              manifest.accuracy.sparsity))
        source = "eval" if budgeted and (stored or _zoo_entry(manifest) is not None) else "golden"
    if source == "golden":
        data = _golden(bundle, manifest)
    elif source == "random":
        data = _random(spec, iterations, point, seed)
    elif source == "eval":
        data = _evaluation(bundle, manifest, module)
    else:
        data = _files(Path(source), spec.names)
    for i, feeds in enumerate(data.feeds):
        try:
            spec.check_feeds(feeds)
        except RuntimeInputError as exc:
            raise RuntimeInputError(f"compare data {data.source}, iteration {i}: {exc}") from None
    if not data.feeds:
        raise UsageError(f"compare data {data.source} holds no inputs")
    return data


def _golden(bundle: Path, manifest: Manifest) -> CompareData:
    with np.load(verified_path(bundle, manifest, "golden.npz"), allow_pickle=False) as golden:
        arrays = {k: golden[k] for k in golden.files}
    return CompareData("golden", golden_feeds(arrays),
                       f"golden.npz: the build's parity inputs at the {', '.join(golden_points(arrays))} points")


def _random(spec: InputSpec, iterations: int, point: str, seed: int) -> CompareData:
    from polygraphy.comparator import DataLoader  # noqa: PLC0415 - polygraphy is heavy

    ranges = {}
    for tensor in spec:
        if tensor.dtype == "bool":
            ranges[tensor.name] = (0, 1)
        elif tensor.dtype.startswith(("int", "uint")):
            lo, hi = tensor.value_range or (0, 2)
            ranges[tensor.name] = (lo, hi - 1)
        else:
            ranges[tensor.name] = tuple(map(float, tensor.value_range)) if tensor.value_range else (-1.0, 1.0)
    with polygraphy_quiet():
        loader = DataLoader(seed=seed, iterations=iterations, input_metadata=input_metadata(spec, point),
                            val_range=ranges)
        loader.input_metadata = input_metadata(spec, point)
        feeds = [{k: np.asarray(v) for k, v in loader[i].items()} for i in range(iterations)]
    return CompareData("random", feeds, f"Polygraphy DataLoader: seed {seed}, {iterations} iterations at the "
                                        f"{point} shapes, value ranges {ranges}")


def _zoo_entry(manifest: Manifest):
    if manifest.model.kind != "zoo":
        return None
    from exporter.zoo import BY_NAME  # noqa: PLC0415 - imports torch

    entry = BY_NAME.get(manifest.model.name)
    return entry if entry is not None and entry.calibration else None


def _stored_evaluation(manifest: Manifest) -> str | None:
    """The held-out batches a budget was measured on (INT8's, a pruned or 2:4 build's), if the bundle has them."""
    if manifest.calibration is not None and manifest.calibration.evaluation_file:
        return manifest.calibration.evaluation_file
    reports = (manifest.accuracy.prune, manifest.accuracy.sparsity) if manifest.accuracy else ()
    return next((r.evaluation_file for r in reports if r is not None and r.evaluation_file), None)


def _evaluation(bundle: Path, manifest: Manifest, module) -> CompareData:
    stored = _stored_evaluation(manifest)
    if stored:
        batches = load_evaluation(verified_path(bundle, manifest, stored))
        return CompareData("eval", batches, f"{stored}: the {len(batches)} held-out batches the build's budget "
                                            f"was measured on")
    entry = _zoo_entry(manifest)
    if entry is None or module is None:
        raise UsageError(f"--data eval needs the bundle's evaluation.npz (INT8 bundles) or a zoo model with "
                         f"evaluation data and its PyTorch module; "
                         f"{manifest.model.name!r} has none. Use --data golden, random or a .npz path")
    _, evaluation = entry.calibration_data(module)
    return CompareData("eval", evaluation, f"the zoo's held-out evaluation batches for {entry.name} "
                                           f"({len(evaluation)} batches, the INT8 budget's data)")


def _files(path: Path, names: list[str]) -> CompareData:
    """An .npz/.npy file or a directory of them, the layouts ``--calib DIR`` takes (``load_batches``)."""
    if not path.exists():
        raise UsageError(f"--data {path!s}: expected golden, random, eval, an .npz/.npy file or a directory of "
                         "them; no such file")
    try:
        feeds = load_batches(path, names)
    except UsageError as exc:
        raise UsageError(f"--data {exc}") from None
    return CompareData(str(path), feeds, f"{len(feeds)} batch file(s) from {path}")
