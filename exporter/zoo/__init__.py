"""The model zoo: named models with their input specs, for demos, tests and benchmarks.

Weights are seeded random (reproducible across runs) except ``digits_cnn``, which is trained
at first use. ``ENTRIES`` is the one list; ``planforge zoo`` prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from exporter.zoo import calibration
from exporter.zoo.attention import GPT, Bert, ViT
from exporter.zoo.cnn import MLP, MobileNetV2, ResNet18, init_like_trained
from exporter.zoo.digits import load_or_train
from foundation.spec import InputSpec


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    task: str  # classification | embedding | generation
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    factory: Callable[[Path], torch.nn.Module]
    calibration: str | None = None  # name of the function in exporter.zoo.calibration
    trained: bool = False  # weights come from training (their bytes identify the model), not from the seed

    def calibration_data(self, module: torch.nn.Module) -> tuple[list[dict], list[dict]]:
        """(calibration batches, held-out evaluation batches) for INT8 builds."""
        return getattr(calibration, self.calibration)(module)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.parse(self.inputs)

    def build(self, cache_dir: Path, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.factory(Path(cache_dir)).eval()


def _resnet18(_: Path):
    return init_like_trained(ResNet18(), seed=1)


def _mobilenet_v2(_: Path):
    return init_like_trained(MobileNetV2(), seed=2)


def _mlp(_: Path):
    return MLP()


def _vit_tiny(_: Path):
    return ViT()


def _bert_tiny(_: Path):
    return Bert()


def _gpt_tiny(_: Path):
    return GPT()


def _digits_cnn(cache_dir: Path):
    return load_or_train(cache_dir)


_GPT_LAYERS, _GPT_HEADS, _GPT_HEAD_DIM = 2, 4, 32
_GPT_PAST = tuple(
    f"past_{kind}_{i}:float32:[batch,{_GPT_HEADS},past=1..192@32,{_GPT_HEAD_DIM}]"
    for i in range(_GPT_LAYERS) for kind in ("key", "value")
)
_GPT_PRESENT = tuple(f"present_{kind}_{i}" for i in range(_GPT_LAYERS) for kind in ("key", "value"))

ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        "mlp",
        "3-layer MLP with GELU, 64 -> 10",
        "classification",
        ("x:float32:[batch=1..64@8,64]",),
        ("logits",),
        _mlp,
        "features",
    ),
    ZooEntry(
        "resnet18",
        "ResNet-18, 11.7M parameters, ImageNet head",
        "classification",
        ("x:float32:[batch=1..32@8,3,224,224]",),
        ("logits",),
        _resnet18,
        "images",
    ),
    ZooEntry(
        "mobilenet_v2",
        "MobileNetV2 1.0, depthwise separable CNN, 3.5M parameters",
        "classification",
        ("x:float32:[batch=1..16@4,3,224,224]",),
        ("logits",),
        _mobilenet_v2,
        "images",
    ),
    ZooEntry(
        "vit_tiny",
        "ViT-Ti/16, 12 layers, 192 wide, 5.7M parameters",
        "classification",
        ("x:float32:[batch=1..16@4,3,224,224]",),
        ("logits",),
        _vit_tiny,
        "images",
    ),
    ZooEntry(
        "bert_tiny",
        "BERT-tiny encoder, 2 layers, 128 wide, attention mask",
        "embedding",
        ("input_ids:int64:[batch=1..16@4,seq=1..128@32]:0..30522", "attention_mask:int64:[batch,seq]:0..2"),
        ("last_hidden_state", "pooler_output"),
        _bert_tiny,
        "bert_sentences",
    ),
    ZooEntry(
        "gpt_tiny",
        "GPT-style decoder, 2 layers, KV cache in and out",
        "generation",
        ("input_ids:int64:[batch=1..8@2,seq=1..64@8]:0..1024", *_GPT_PAST),
        ("logits", *_GPT_PRESENT),
        _gpt_tiny,
        "gpt_sentences",
    ),
    ZooEntry(
        "digits_cnn",
        "small CNN trained at first use on scikit-learn digits (8x8)",
        "classification",
        ("x:float32:[batch=1..64@16,1,8,8]:0..1",),
        ("logits",),
        _digits_cnn,
        "digits",
        trained=True,
    ),
)

BY_NAME = {e.name: e for e in ENTRIES}
