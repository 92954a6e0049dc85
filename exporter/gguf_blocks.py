"""The symmetric 32-value blocks of a GGUF file's weights, for carrying them into 4/8-bit MatMulNBits unchanged.

transformers loads a GGUF model dequantized to float (``exporter/decoder.py``), so the exported graph's weights
are exactly ``d * q`` per block, and quantizing them again rounds a second time. (Rounding again gives the same
blocks back for Q5_0 and Q4_0 -- llama.cpp maps a block's signed extreme onto the lowest level, as
``quantize_blocks`` does -- but not for Q8_0, whose extreme sits on +-127 where 8 bits reach -128: Gemma 3's
embedding / LM head and its v projections.) Where the file's block is
symmetric and 32 long -- ``Q8_0`` (``d * q``, q in -128..127), ``Q5_0`` (``d * (q - 16)``, q in 0..31) and
``Q4_0`` (``d * (q - 8)``, q in 0..15), ggml's ``block_q8_0`` / ``block_q5_0`` / ``block_q4_0``, each starting
with its fp16 ``d`` -- ONNX Runtime's blocked form ``(level - 2^(bits-1)) * scale`` holds the same numbers
with ``scale = d``: 8 bits for all three, 4 bits for ``Q4_0``. This module reads, per such tensor, each row's
dequantized values (the ``gguf`` package's own ``dequantize``, as transformers uses it) and its block scales;
``passes/quantize_weights_nbits.py`` (``SourceBlocks``) matches them to the graph's weights by value.

Not carried, with the reason: k-quants (``Q4_K``, ``Q5_K``: each 32-value sub-block has a scale *and* an
offset, which MatMulNBits holds only as float zero points, measured 40x slower on this CPU; ``Q6_K``:
sub-blocks of 16), ``Q4_1`` / ``Q5_1`` (offsets), and float tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32  # QK8_0 = QK5_0 = QK4_0
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q5_0": 2 + 4 + 16, "Q4_0": 2 + 16}  # fp16 d first, then the quants


def symmetric_blocks(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(tensor name, values [rows, K] float32, scales [rows, K / 32] float32)`` for each Q8_0 / Q5_0 / Q4_0
    tensor of the GGUF file at ``path``, one tensor at a time (a 262,144-row embedding is 0.7 GB in float)."""
    import gguf  # noqa: PLC0415 - an optional dependency ('.[llm]'), present whenever a GGUF was exported

    path = Path(path)
    reader = gguf.GGUFReader(str(path))
    skipped: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in BLOCK_BYTES or len(tensor.data.shape) != 2:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        raw = np.asarray(tensor.data)
        rows = raw.shape[0]
        scales = raw.reshape(rows, -1, BLOCK_BYTES[kind])[..., :2].copy().view(np.float16)[..., 0]
        values = gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32, copy=False)
        yield tensor.name, values.reshape(rows, -1), scales.astype(np.float32)
    logger.debug("%s: not carried (no symmetric 32-value blocks): %s", path.name,
                 ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())))
