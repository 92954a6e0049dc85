"""The peer corpus: ONNX's own backend test cases, run through planforge's FP32 pipelines.

Cases: the ~1,900 single-operator cases of ``onnx.backend.test.loader.load_node_model_tests()``
and the model folders shipped in ``onnx/backend/test/data`` (``simple``, ``pytorch-converted``,
``pytorch-operator``, and ``light``: classic CNNs with expected outputs for ONNX's own
deterministic inputs). A case *runs* when ONNX Runtime CPU (graph optimizations off) loads and
runs the original graph; only those count. For each target's pipeline the outcome is:

- ``equal``: the optimized graph's outputs match the expected ones (the case's rtol/atol), or
  match what ONNX Runtime gives on the original when that itself misses the expectation
  (an ONNX Runtime difference, not a pass's);
- ``differ``: they do not;
- ``pass_error``: a pass raised (a ``PassError`` or anything else).

Run ``python tests/corpus.py`` for the count table (non-zero exit on any differ or pass error).
The tests in ``test_corpus.py`` run the same code in shards and assert zero of both.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from passes import PassManager, pipeline
from passes.verify import session

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FOLDERS = ("simple", "pytorch-converted", "pytorch-operator")
LIGHT_TOLERANCE = (1e-3, 1e-7)


@dataclasses.dataclass
class Case:
    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list, list]]
    rtol: float
    atol: float


def node_cases() -> list[Case]:
    from onnx.backend.test.loader import load_node_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tests = load_node_model_tests()
    return [Case(t.name, t.model, t.data_sets, t.rtol, t.atol) for t in tests]


def _read_pb(path: str):
    tensor = onnx.TensorProto()
    with open(path, "rb") as fh:
        tensor.ParseFromString(fh.read())
    return numpy_helper.to_array(tensor)


def folder_cases() -> list[Case]:
    cases = []
    for folder in FOLDERS:
        for case_dir in sorted((DATA / folder).iterdir()):
            model_path = case_dir / "model.onnx"
            if not model_path.exists():
                continue
            data_sets = []
            for ds in sorted(case_dir.glob("test_data_set_*")):
                try:
                    inputs = [_read_pb(p) for p in sorted(glob.glob(str(ds / "input_*.pb")))]
                    outputs = [_read_pb(p) for p in sorted(glob.glob(str(ds / "output_*.pb")))]
                except Exception:  # noqa: BLE001 - sequences/optionals are not plain tensors
                    continue
                data_sets.append((inputs, outputs))
            if data_sets:
                cases.append(Case(f"{folder}/{case_dir.name}", onnx.load(str(model_path)), data_sets, 1e-3, 1e-7))
    for model_path in sorted((DATA / "light").glob("light_*.onnx")):
        from onnx.backend.test.runner import Runner

        model = onnx.load(str(model_path))
        inits = {i.name for i in model.graph.initializer}
        inputs = [Runner.generate_dummy_data(x, seed=0, name=model_path.stem) for x in model.graph.input
                  if x.name not in inits]
        expected = [_read_pb(str(model_path).replace(".onnx", "_output_0.pb"))]
        cases.append(Case(f"light/{model_path.stem}", model, [(inputs, expected)], *LIGHT_TOLERANCE))
    return cases


def all_cases() -> list[Case]:
    return node_cases() + folder_cases()


def _feeds(model: onnx.ModelProto, inputs: list) -> dict:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return dict(zip(names, inputs))


def _run(model: onnx.ModelProto, feeds: dict) -> list:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return sess.run(names, {k: v for k, v in feeds.items() if k in wanted})


def _close(actual, expected, rtol: float, atol: float) -> bool:
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and len(actual) == len(expected) and all(
            _close(a, e, rtol, atol) for a, e in zip(actual, expected))
    if expected is None or actual is None:
        return expected is None and actual is None
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return False
    if expected.dtype.kind in "fc":
        return bool(np.allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                equal_nan=True))
    return bool(np.array_equal(actual, expected))


def _all_close(actual: list, expected: list, rtol: float, atol: float) -> bool:
    return len(actual) == len(expected) and all(_close(a, e, rtol, atol) for a, e in zip(actual, expected))


def run_case(case: Case, targets=("ort", "trt")) -> dict[str, str]:
    """Outcome per target: skipped (ORT cannot run the original), equal, differ or pass_error."""
    try:
        originals = [_run(case.model, _feeds(case.model, ins)) for ins, _ in case.data_sets]
    except Exception:  # noqa: BLE001 - ONNX Runtime cannot run it: not part of the corpus
        return {t: "skipped" for t in targets}
    outcomes = {}
    for target in targets:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimized, _ = PassManager(pipeline(target, "fp32")).run(case.model)
            results = [_run(optimized, _feeds(optimized, ins)) for ins, _ in case.data_sets]
        except Exception as exc:  # noqa: BLE001 - every failure is a pass error to report
            outcomes[target] = f"pass_error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            continue
        equal = all(
            _all_close(res, list(exp), case.rtol, case.atol)
            or (not _all_close(orig, list(exp), case.rtol, case.atol) and _all_close(res, orig, case.rtol, case.atol))
            for res, orig, (_, exp) in zip(results, originals, case.data_sets)
        )
        outcomes[target] = "equal" if equal else "differ"
    return outcomes


def shard(cases: list[Case], index: int, count: int) -> list[Case]:
    return cases[index::count]


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    counts: dict[str, collections.Counter] = {"ort": collections.Counter(), "trt": collections.Counter()}
    problems = []
    for case in all_cases():
        for target, outcome in run_case(case).items():
            counts[target][outcome.split(":")[0]] += 1
            if outcome not in ("equal", "skipped"):
                problems.append(f"{target} {case.name}: {outcome}")
    for target, c in counts.items():
        ran = sum(v for k, v in c.items() if k != "skipped")
        print(f"{target}: cases {sum(c.values())}, ran {ran}, equal {c['equal']}, differ {c['differ']}, "
              f"pass errors {c['pass_error']}, skipped (ORT cannot run the original) {c['skipped']}")
    for line in problems:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
