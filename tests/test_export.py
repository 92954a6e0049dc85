"""Export with dynamic shapes, the TorchScript fallback, parity, and external data."""

import numpy as np
import onnx
import pytest
import torch

from exporter import export as export_mod
from exporter.export import export_onnx
from exporter.parity import check_parity, torch_outputs
from exporter.zoo import BY_NAME
from foundation.errors import ExportError, ParityError
from foundation.spec import InputSpec
from passes.verify import run_graph


class DataDependent(torch.nn.Module):
    """torch.export cannot trace a branch on a tensor's value; TorchScript traces it as a constant."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > -1e9:  # always true: the traced constant branch is still right
            return y * 2
        return y


class Noisy(torch.nn.Module):
    """Exports fine, but ONNX Runtime's random numbers are not PyTorch's: parity must fail."""

    def forward(self, x):
        return x + torch.rand_like(x)


@torch.library.custom_op("planforge_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Unexportable(torch.nn.Module):
    def forward(self, x):
        return mystery(x) + 1


SMALL = InputSpec.parse(["x:float32:[batch=1..8@4,3]"])


def test_dynamo_export_keeps_symbolic_dims_and_matches_pytorch_at_other_sizes(tmp_path):
    entry = BY_NAME["mlp"]
    module = entry.build(tmp_path)
    result = export_onnx(module, entry.input_spec, entry.outputs, tmp_path / "mlp.onnx")
    assert result.exporter == "dynamo" and result.fallback_reason is None
    graph = onnx.load(str(tmp_path / "mlp.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.ir_version <= 10
    for batch in (1, 5, 64):
        x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
        np.testing.assert_allclose(run_graph(graph, {"x": x})["logits"], torch_outputs(module, {"x": x})[0],
                                   atol=1e-5, rtol=1e-4)


def test_kv_cache_decoder_exports_with_shared_and_varargs_dims(tmp_path):
    entry = BY_NAME["gpt_tiny"]
    module = entry.build(tmp_path)
    export_onnx(module, entry.input_spec, entry.outputs, tmp_path / "gpt.onnx")
    report = check_parity(module, tmp_path / "gpt.onnx", entry.input_spec)
    assert report.ok and set(report.points) == {"min", "max"}
    present = report.golden["max/out/present_key_0"]
    assert present.shape == (8, 4, 192 + 64, 32)  # past + new positions
    assert all(e["max_abs"] < 1e-4 for e in report.worst().values())


def test_falls_back_to_torchscript_when_dynamo_fails_and_logs_why(tmp_path, caplog):
    module = DataDependent().eval()
    result = export_onnx(module, SMALL, ("y",), tmp_path / "dd.onnx")
    assert result.exporter == "torchscript"
    assert result.fallback_reason and "Error" in result.fallback_reason
    assert "trying the TorchScript exporter" in caplog.text
    graph = onnx.load(str(tmp_path / "dd.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert check_parity(module, tmp_path / "dd.onnx", SMALL).ok


def test_an_op_no_exporter_handles_is_one_clear_export_error(tmp_path):
    with pytest.raises(ExportError, match="both exporters failed.*planforge_test::mystery|both exporters failed"):
        export_onnx(Unexportable(), SMALL, ("y",), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_parity_failure_names_the_output_the_shapes_and_the_error(tmp_path):
    export_onnx(Noisy(), SMALL, ("y",), tmp_path / "noisy.onnx")
    with pytest.raises(ParityError, match=r"output 'y' at the min shapes \{'x': \[1, 3\]\}.*max abs error"):
        check_parity(Noisy(), tmp_path / "noisy.onnx", SMALL)


def test_graphs_over_the_protobuf_limit_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "PROTOBUF_LIMIT", 10_000)  # stand-in for 2 GB: same code path
    entry = BY_NAME["mlp"]
    module = entry.build(tmp_path)
    result = export_onnx(module, entry.input_spec, entry.outputs, tmp_path / "big.onnx")
    assert result.external_data and (tmp_path / "big.onnx.data").stat().st_size > 300_000
    assert (tmp_path / "big.onnx").stat().st_size < 50_000
    assert check_parity(module, tmp_path / "big.onnx", entry.input_spec).ok
