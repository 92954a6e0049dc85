"""The 32-value blocks of a GGUF file's weights, for carrying them into 4/8-bit MatMulNBits unchanged.

transformers loads a GGUF model dequantized to float (``exporter/decoder.py``), so the exported graph's weights
are exactly the file's blocks, and quantizing them again rounds a second time. (Rounding again gives the same
blocks back for Q5_0 and Q4_0 -- llama.cpp maps a block's signed extreme onto the lowest level, as
``quantize_blocks`` does -- but not for Q8_0, whose extreme sits on +-127 where 8 bits reach -128: Gemma 3's
embedding / LM head and its v projections; nor for Q4_K, whose blocks have an offset.) Two forms are read:

- symmetric, ``d * q`` per block: ``Q8_0`` (q in -128..127), ``Q5_0`` (``d * (q - 16)``, q in 0..31) and
  ``Q4_0`` (``d * (q - 8)``, q in 0..15), ggml's ``block_q8_0`` / ``block_q5_0`` / ``block_q4_0``, each starting
  with its fp16 ``d``;
- with an offset, ``s * q - o`` per 32 values, q in 0..15: ``Q4_K`` (super-blocks of 256: fp16 ``d`` and
  ``dmin``, then 6-bit sub-block scales and mins, ``s = d * sc``, ``o = dmin * m``; ggml's ``block_q4_K``) and
  ``Q4_1`` (fp16 ``d`` and ``m``, ``d * q + m``: ``o = -m``).

``passes/quantize_weights_nbits.py`` (``SourceBlocks``) matches them to the graph's weights by value and writes
them as MatMulNBits blocks (an offset through a block-sum correction, explained there). This module reads, per
tensor, each row's dequantized values (the ``gguf`` package's own ``dequantize``, as transformers uses it), its
block scales and, for the offset forms, its block offsets: computed with the same float32 operations as
``dequantize``, so ``s * q - o`` reproduces the values bit for bit.

Not read, with the reason: ``Q5_K`` / ``Q5_1`` (5-bit levels with an offset: 8 bits would hold them, where
plain rounding already loses < 0.2 %), ``Q6_K`` (sub-blocks of 16), and float tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32  # QK8_0 = QK5_0 = QK4_0 = QK4_1, and a k-quant's sub-block
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q5_0": 2 + 4 + 16, "Q4_0": 2 + 16}  # fp16 d first, then the quants
OFFSET_BYTES = {"Q4_K": 2 + 2 + 12 + 128, "Q4_1": 2 + 2 + 16}  # per 256 / 32 values


def blocked_tensors(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(tensor name, values [rows, K] float32, scales [rows, K / 32] float32, offsets [rows, K / 32] or None)``
    for each tensor of the GGUF file at ``path`` in a form above, one tensor at a time (a 262,144-row embedding
    is 0.7 GB in float): ``values = scale * level`` per block, or ``scale * level - offset``."""
    import gguf  # noqa: PLC0415 - an optional dependency ('.[llm]'), present whenever a GGUF was exported

    path = Path(path)
    reader = gguf.GGUFReader(str(path))
    skipped: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in BLOCK_BYTES and kind not in OFFSET_BYTES or len(tensor.data.shape) != 2:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        raw = np.asarray(tensor.data)
        rows = raw.shape[0]
        values = gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32, copy=False).reshape(rows, -1)
        if kind in BLOCK_BYTES:
            scales = raw.reshape(rows, -1, BLOCK_BYTES[kind])[..., :2].copy().view(np.float16)[..., 0]
            yield tensor.name, values, scales.astype(np.float32), None
            continue
        blocks = raw.reshape(-1, OFFSET_BYTES[kind])
        first = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
        second = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        if kind == "Q4_K":  # as gguf.quants.Q4_K.dequantize_blocks: (d * sc) * q - (dmin * m)
            sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
            scales, offsets = first * sc.astype(np.float32), second * m.astype(np.float32)
        else:  # Q4_1: d * q + m
            scales, offsets = first, -second
        yield tensor.name, values, scales.reshape(rows, -1), offsets.reshape(rows, -1)
    logger.debug("%s: not carried (no 32-value blocks of a form above): %s", path.name,
                 ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())))
