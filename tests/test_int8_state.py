"""INT8 budgets on a stateful model (``--state OUT:IN``): the held-out batches run as a sequence,
each graph feeding its own state back, in the build and in compare; and a user metric (``--metric``)
decides the same way in both."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

from engines.bundle import read_manifest
from foundation.numerics import Budget, budget_metric
from foundation.sequence import run_sequence

MODEL = textwrap.dedent('''
    import numpy as np
    import torch

    class Cell(torch.nn.Module):
        """h' = tanh(x W + h U), y = h' V: an RNN step with its state as input and output."""
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Linear(16, 32)
            self.u = torch.nn.Linear(32, 32, bias=False)
            self.v = torch.nn.Linear(32, 4)
            with torch.no_grad():
                self.u.weight.copy_(0.9 * torch.linalg.qr(torch.randn(32, 32, generator=g))[0])

        def forward(self, x, h):
            h_new = torch.tanh(self.w(x) + self.u(h))
            return self.v(h_new), h_new

    def model():
        return Cell().eval(), ["x:float32:[batch=1..8@4,16]", "h:float32:[batch,32]"], ["y", "h_new"]

    def calibration():
        rng = np.random.default_rng(0)
        h = np.zeros((4, 32), np.float32)
        net = Cell().eval()
        for _ in range(30):
            x = rng.standard_normal((4, 16)).astype(np.float32)
            yield {"x": x, "h": h}
            with torch.no_grad():
                h = net(torch.from_numpy(x), torch.from_numpy(h))[1].numpy()

    def close_outputs(reference, candidate, feeds):
        error = float(np.abs(reference["y"] - candidate["y"]).max() / np.abs(reference["y"]).max())
        return -error, error <= 0.5
''')


@pytest.fixture()
def cell(in_tmp):
    (in_tmp / "cell.py").write_text(MODEL)
    return in_tmp / "cell.py"


def _sessions(bundle, target):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return (ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(bundle / f"model.{target}.onnx"), options, providers=["CPUExecutionProvider"]))


def test_state_runs_the_budget_as_a_sequence_in_build_and_compare(run_cli, cell, in_tmp):
    code, out, err = run_cli("build", f"{cell}:model", "--precision", "int8", "--calib", f"{cell}:calibration",
                             "--state", "h_new:h", "--budget", "relerr=0.5")
    assert code == 0, err
    bundle = in_tmp / "build" / "cell-int8"
    manifest = read_manifest(bundle)
    assert manifest.calibration.state == (("h_new", "h"),)
    evaluation = np.load(bundle / "evaluation.npz")
    batches = [{k.split("/")[1]: evaluation[k] for k in evaluation.files if k.startswith(f"{i}/")}
               for i in range(manifest.calibration.evaluation_batches)]
    assert all(set(b) == {"x", "h"} for b in batches)
    fp32, int8 = _sessions(bundle, "trt")
    names = ["y", "h_new"]
    seq = [run_sequence(lambda f, s=s: s.run(names, f), names, batches, (("h_new", "h"),)) for s in (fp32, int8)]
    step = [[s.run(names, b) for b in batches] for s in (fp32, int8)]
    budget = Budget("relerr", 0.5)
    recorded = manifest.int8_report("trt").final
    only_y = [[[outputs[0]] for outputs in run] for run in seq]  # the state output is judged through y
    assert recorded == pytest.approx(budget_metric(budget, *only_y), rel=1e-5)  # the sequence, fed back
    assert recorded != pytest.approx(budget_metric(budget, *[[[o[0]] for o in run] for run in step]), rel=1e-3)
    code, out, err = run_cli("compare", str(bundle), "--reference", "onnx")
    assert code == 0, out + err
    report = json.loads((bundle / "report.json").read_text())
    trt_pair = next(p for p in report["compare"]["pairs"] if "trt" in p["runner"])
    assert trt_pair["budget"]["value"] == pytest.approx(recorded, rel=1e-4)


def test_state_names_are_checked(run_cli, cell):
    code, _, err = run_cli("build", f"{cell}:model", "--precision", "int8", "--calib", f"{cell}:calibration",
                           "--state", "h_next:h")
    assert code == 2 and "no output 'h_next'; the model's outputs are y, h_new" in err


def test_a_user_metric_is_the_budget_in_build_and_compare(run_cli, cell, in_tmp):
    code, out, err = run_cli("build", f"{cell}:model", "--precision", "int8", "--calib", f"{cell}:calibration",
                             "--metric", f"{cell}:close_outputs")
    assert code == 0, err
    bundle = in_tmp / "build" / "cell-int8"
    manifest = read_manifest(bundle)
    assert manifest.calibration.budget.metric == "user" and manifest.calibration.budget.hook.endswith(
        "cell.py:close_outputs"
    )
    for target in ("trt", "ort"):
        report = manifest.int8_report(target)
        assert report.met and -0.5 <= report.final <= 0.0
    code, out, err = run_cli("compare", str(bundle), "--reference", "onnx")
    assert code == 0, out + err
    pairs = json.loads((bundle / "report.json").read_text())["compare"]["pairs"]
    verdicts = [p["budget"] for p in pairs if p["budget"]]
    assert verdicts and all(v["metric"] == "user" and v["passed"] and v["budget"].endswith("close_outputs passes")
                            for v in verdicts)
    trt = next(v for p, v in zip(pairs, verdicts) if "trt" in p["runner"])
    assert trt["value"] == pytest.approx(manifest.int8_report("trt").final, abs=1e-6)


def test_state_pairs_are_read_off_the_names_when_not_given(run_cli, cell, in_tmp):
    from foundation.sequence import detect_state

    assert detect_state([("chunk", 1, 2), ("context", 1, 2), ("state", 1, 3)],
                        [("prob", 1, 2), ("new_state", 1, 3), ("new_context", 1, 2)]) == \
        (("new_state", "state"), ("new_context", "context"))
    assert detect_state([("ids", 7, 2), ("past.0.key", 1, 4)], [("logits", 1, 3), ("present.0.key", 1, 4)]) == \
        (("present.0.key", "past.0.key"),)
    assert detect_state([("tokens", 7, 2), ("h0", 1, 3)], [("outputs", 1, 3), ("h_n", 1, 3)]) == (("h_n", "h0"),)
    assert detect_state([("x", 1, 4)], [("y", 1, 4)]) == ()  # unrelated names
    assert detect_state([("state", 1, 3)], [("new_state", 1, 2)]) == ()  # another rank
    code, _, err = run_cli("build", f"{cell}:model", "--precision", "int8", "--calib", f"{cell}:calibration",
                           "--budget", "relerr=0.5")
    assert code == 0, err
    assert read_manifest(in_tmp / "build" / "cell-int8").calibration.state == (("h_new", "h"),)
