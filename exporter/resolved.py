"""What resolving a MODEL spec gives: its own module so ``resolve`` and ``hf`` both build one
without importing each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from foundation.decoder import DecoderInfo
from foundation.spec import InputSpec


@dataclasses.dataclass
class ResolvedModel:
    name: str
    kind: str  # zoo | python | onnx | hf | decoder | decoder
    source: str
    input_spec: InputSpec
    output_names: tuple[str, ...]
    source_sha256: str
    task: str | None = None
    module: torch.nn.Module | None = None
    onnx_path: Path | None = None
    decoder: DecoderInfo | None = None  # a language-model decoder's cache layout and special tokens
    tokenizer_dir: Path | None = None  # where a decoder's tokenizer files are
