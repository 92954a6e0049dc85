"""``polygraphy run`` lines that repeat compare's ONNX Runtime checks from the saved inputs, and the compare
script an INT8 line loads to judge the budget as compare does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from engines.bundle import Manifest, write_atomic
from engines.evaluate.compare.results import PairResult
from foundation.numerics import Budget


def polygraphy_commands(bundle: Path, manifest: Manifest, pairs: list[PairResult], inputs: Path | None,
                        batches: int) -> list[str]:
    """``polygraphy run`` lines that repeat the ONNX Runtime comparisons (exported graph as reference).

    They need the inputs saved (``--save-inputs``): without them there are none, and the CLI says how
    to get them. The reference outputs go beside the inputs, not into the working directory. An INT8
    pair is judged by its budget, which Polygraphy's elementwise checks cannot express: its line loads
    a compare script written beside the inputs (``budget_script``) that computes the budget's metric
    with planforge's own code over all the batches, so the line fails exactly when compare fails.
    Stateful bundles get none: Polygraphy runs each batch on its own and cannot feed the state back."""
    if inputs is None or (manifest.calibration and manifest.calibration.state):
        return []
    inputs = Path(inputs).resolve()
    load, ref_path = shlex.quote(str(inputs)), inputs.with_name(f"{inputs.stem}.ref_outputs.json")
    ref = shlex.quote(str(bundle.resolve() / "model.onnx"))
    lines = [f"polygraphy run {ref} --onnxrt --load-inputs {load} --save-outputs {shlex.quote(str(ref_path))}"]
    for pair in pairs:
        graph = pair.graph
        if graph is None:  # the exported graph, PyTorch, planforge's runtime, TensorRT
            continue
        args = []
        if pair.budget is not None:
            module = re.sub(r"\W", "_", f"{inputs.stem}_{pair.target}_budget")  # Polygraphy imports it
            script = budget_script(inputs.with_name(f"{module}.py"),
                                   manifest.calibration.budget, list(pair.outputs), batches, inputs)
            args += ["--compare-func-script", str(script)]
        else:
            tols = {n: o["tolerance"] for n, o in pair.outputs.items()}
            for key, flag in (("atol", "--atol"), ("rtol", "--rtol"), ("stat", "--check-error-stat")):
                args += [flag, *(f"{n}:{t[key]}" for n, t in tols.items())]
            if any(t["stat"] == "quantile" for t in tols.values()):
                args += ["--error-quantile", *(f"{n}:{t['quantile']}" for n, t in tols.items())]
        if pair.target == "trt":  # float emulation: the graph as written, without ORT's optimizations
            args += ["--graph-optimization-level", "ORT_DISABLE_ALL"]
        lines.append(f"polygraphy run {shlex.quote(str(bundle.resolve() / graph))} --onnxrt --load-inputs {load} "
                     f"--load-outputs {shlex.quote(str(ref_path))} {' '.join(shlex.quote(a) for a in args)}")
    return lines


BUDGET_SCRIPT = '''"""Polygraphy compare function written by `planforge compare`: the INT8 budget {budget}.

Polygraphy calls it once per batch; it keeps the outputs and, at the last of the {batches} batches,
judges the budget over all of them with planforge's own metric (foundation.numerics), as compare
did. Earlier batches pass: the budget is a statistic over the whole data set, not per batch.
The inputs (an attention mask, a user metric's feeds) are read from the file the line loads.
"""

import sys
import types
from collections import OrderedDict

import numpy as np
from polygraphy.json import load_json

from foundation.numerics import Budget, budget_metric

BUDGET = Budget.from_json({spec})
NAMES = {names}
BATCHES = {batches}
INPUTS = {inputs}
# Polygraphy imports this script afresh for every batch (InvokeFromScript): the outputs seen so far live in
# a module registered under this script's name, which the re-import does not reset.
_STATE = sys.modules.setdefault(f"_planforge_state_{{__name__}}", types.ModuleType(f"_planforge_state_{{__name__}}"))
_seen = _STATE.__dict__.setdefault("seen", {{"reference": [], "actual": []}})


def compare_outputs(actual, reference):  # Polygraphy passes this run's outputs first, the loaded reference second
    _seen["reference"].append([np.asarray(reference[n]) for n in NAMES])
    _seen["actual"].append([np.asarray(actual[n]) for n in NAMES])
    if len(_seen["reference"]) < BATCHES:
        return OrderedDict((n, True) for n in NAMES)
    feeds = [dict(f) for f in load_json(INPUTS)] if INPUTS else None
    score = budget_metric(BUDGET, _seen["reference"], _seen["actual"], NAMES, feeds)
    passed = BUDGET.met(score)
    print(f"planforge budget {{BUDGET}}: {{float(score):.6g}} over {{BATCHES}} batches: "
          f"{{'PASSED' if passed else 'FAILED'}}")
    return OrderedDict((n, bool(passed)) for n in NAMES)
'''


def budget_script(path: Path, budget: Budget, names: list[str], batches: int, inputs: Path | None = None) -> Path:
    """Write the compare script of an INT8 line (see ``polygraphy_commands``) to ``path``; ``inputs``: the
    Polygraphy inputs file the line loads (the budget's feeds)."""
    text = BUDGET_SCRIPT.format(budget=budget, batches=batches, spec=repr(budget.to_json()), names=repr(names),
                                inputs=repr(str(inputs)) if inputs else None)
    write_atomic(path, text.encode())
    return path
