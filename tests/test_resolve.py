"""MODEL forms and the errors for bad ones."""

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from helpers import helper, make_model

from exporter.resolve import load_onnx, resolve, weights_sha256
from foundation.errors import ExportError, UsageError


def test_zoo_name_resolves_to_module_spec_and_stable_hash(tmp_path):
    a, b = resolve("mlp", tmp_path), resolve("mlp", tmp_path)
    assert a.kind == "zoo" and a.module is not None and a.input_spec.names == ["x"]
    assert a.source_sha256 == b.source_sha256  # seeded weights: same model, same hash


def test_unknown_zoo_name_suggests_close_matches(tmp_path):
    with pytest.raises(UsageError, match="unknown model 'resnet81': did you mean resnet18"):
        resolve("resnet81", tmp_path)


def _write(tmp_path, body: str):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(body))
    return path


FACTORY = """
    import torch
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.lin = torch.nn.Linear(4, 2)
        def forward(self, x):
            return self.lin(x)
    def make():
        return Net(), ["x:float32:[batch=1..8@2,4]"]
    def make_examples():
        return Net(), (torch.zeros(3, 4),)
    def broken():
        raise ValueError("weights file not found")
    def wrong():
        return 42
"""


def test_python_factory_with_spec_strings_and_with_example_inputs(tmp_path):
    path = _write(tmp_path, FACTORY)
    model = resolve(f"{path}:make", tmp_path)
    assert model.kind == "python" and str(model.input_spec) == "x:float32:[batch=1..8@2,4]"
    examples = resolve(f"{path}:make_examples", tmp_path)
    assert str(examples.input_spec) == "x:float32:[3,4]"


def test_python_file_without_the_factory_lists_the_functions_it_has(tmp_path):
    path = _write(tmp_path, FACTORY)
    with pytest.raises(UsageError, match=r"no function 'missing'.*Functions in the file: make, make_examples"):
        resolve(f"{path}:missing", tmp_path)


def test_factory_that_raises_or_returns_the_wrong_thing_is_an_export_error(tmp_path):
    path = _write(tmp_path, FACTORY)
    with pytest.raises(ExportError, match=r"broken\(\) raised ValueError: weights file not found"):
        resolve(f"{path}:broken", tmp_path)
    with pytest.raises(ExportError, match=r"returned int; expected \(torch.nn.Module, input_spec\)"):
        resolve(f"{path}:wrong", tmp_path)


def test_missing_python_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve(f"{tmp_path}/nope.py:make", tmp_path)


def _tiny_onnx():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return make_model(nodes, [("x", np.float32, ["n", 3])], [("y", np.float32, ["n", 3])])


def test_onnx_model_resolves_with_a_spec_from_its_inputs(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_onnx(), str(path))
    model = resolve(str(path), tmp_path)
    assert model.kind == "onnx" and model.module is None
    assert str(model.input_spec) == "x:float32:[n=1..16@4,3]"


def test_corrupt_onnx_file_is_one_clear_error(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(
        onnx.load_model_from_string(_tiny_onnx().SerializeToString()).SerializeToString()[:-7] + b"\xff\x00junk"
    )
    with pytest.raises(ExportError, match="is not a readable ONNX model|fails onnx.checker"):
        load_onnx(path)


def test_external_data_outside_the_model_directory_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [256])], [("y", np.float32, [256])], {"w": np.ones(256, np.float32)})
    onnx.save_model(model, str(inner / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    assert load_onnx(inner / "m.onnx").graph.initializer[0].raw_data  # inside: loads
    tampered = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for entry in tampered.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1024)
    onnx.save(tampered, str(inner / "evil.onnx"))
    with pytest.raises(ExportError, match="outside the model's directory; refusing"):
        load_onnx(inner / "evil.onnx")


def test_hugging_face_directory_without_transformers_says_what_to_install(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        from foundation.errors import UsageError
        from exporter.resolve import resolve
        try:
            resolve({str(tmp_path / "hf")!r}, {str(tmp_path)!r})
        except UsageError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "transformers is not installed" in out and "pip install 'planforge[hf]'" in out


def test_weights_sha256_follows_every_value_dtype_name_and_buffer():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    base = weights_sha256(net)
    assert weights_sha256(net) == base and len(base) == 64
    variants = []
    with torch.no_grad():
        weight = net[0].weight
        saved = weight[0, 0].item()
        weight[0, 0] = float(np.nextafter(np.float32(saved), np.float32(np.inf)))  # one ULP
        variants.append(weights_sha256(net))
        weight[0, 0] = saved
        net[1].running_mean += 1e-3  # a buffer
        variants.append(weights_sha256(net))
        net[1].running_mean -= 1e-3
    assert weights_sha256(net) == base
    renamed = torch.nn.Sequential()
    renamed.add_module("fc", net[0])
    renamed.add_module("1", net[1])
    variants += [weights_sha256(renamed), weights_sha256(net.to(torch.bfloat16)), weights_sha256(net.double())]
    assert len({base, *variants}) == 1 + len(variants)


def test_a_hugging_face_directory_lacking_some_weights_resolves_to_the_same_weights_every_time(tmp_path):
    """A BertForMaskedLM checkpoint has no pooler: AutoModel initialises one, alike at build and compare."""
    tf = pytest.importorskip("transformers")
    import torch

    config = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tf.BertForMaskedLM(config).eval().save_pretrained(str(tmp_path / "mlm"))
        hashes = set()
        for seed in (1, 2):
            torch.manual_seed(seed)
            state = torch.get_rng_state()
            hashes.add(weights_sha256(resolve(str(tmp_path / "mlm"), tmp_path).module))
            assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
    assert len(hashes) == 1
