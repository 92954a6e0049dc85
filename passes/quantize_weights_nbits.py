"""Weight-only 4-bit (and 8-bit) quantization of MatMul weights for ONNX Runtime (``--precision int4``).

Every ``MatMul(A, W)`` whose ``W`` is a constant ``[K, N]`` (or the ``Transpose`` of one: a tied LM head,
``logits = h . E^T``) becomes ``com.microsoft.MatMulNBits``: ``W`` is cut along K into blocks of
``block_size`` and each block is stored as ``bits``-bit integers with one float scale,

    W[k, n] ~= (q[n, k / bs, k % bs] - 2^(bits-1)) * scale[n, k / bs],    q in [0, 2^bits)

symmetric round-to-nearest with the block's largest-magnitude value mapped exactly onto -2^(bits-1) (the
scale takes its sign), as ONNX Runtime's own quantizer does. Packing: 4-bit values two per byte along K,
the lower nibble holding the even k (docs/decisions/008). ``accuracy_level`` 4 lets the kernel quantize
``A`` to int8 per block and use the integer dot-product units (AVX-512 VNNI, AMX, AVX2); 0 keeps ``A`` in
float. Which block size and level a bundle uses is measured (docs/decisions/009-int4-weights.md).

A tied embedding -- a ``Gather`` of the same table the LM head transposes -- reads the head's 4-bit table
through ``GatherBlockQuantized`` (gather_axis 0, quantize_axis 2, on the ``[vocab, K/bs, bs/2]`` blocks
MatMulNBits holds), so the table is stored once, in 4 bits, instead of a float copy for the embedding.

The rescored head (``rescore=k``, an 8-bit LM head): reading a 262,144 x 640 head in 8 bits costs each
generated token ~190 MB of memory traffic, more than the rest of a small model together, and 4 bits of it
lose accuracy (Gemma 3 270M: perplexity +15 %). So the head runs as a 4-bit pass over the whole vocabulary
(block 128) whose ``k`` best candidates (``TopK``) are computed again from the 8-bit table
(``GatherBlockQuantized`` of k rows, a small MatMul) and written over the approximations
(``ScatterElements``; in any order, so ``TopK`` does not sort them): greedy, top-k and top-p choices see
8-bit logits, the tail keeps 4-bit ones, and the 8-bit table is only gathered from (it is the embedding's
too). Measured in docs/decisions/009.

Written here rather than with ``onnxruntime.quantization.MatMulNBitsQuantizer``: that tool works on whole
models, skips a head whose weights are a Transpose (tied embeddings: the largest matrix of a small LLM),
does not share the table with the embedding, and takes no per-MatMul bit width, which the accuracy budget
(``engines/build/int4.py``) chooses. ``eight_bit`` names the MatMuls the budget moved to 8 bits; ``keep``
those it kept in float.

Target ``trt`` (TensorRT takes standard ONNX only): ``MatMul(A, DequantizeLinear(Wq, scale, axis=0,
block_size))``, signed int4 / int8 weights with zero point 0 and positive scales (TensorRT takes no other):
each block's largest magnitude onto +-7 (+-127), a level fewer than the ort form's; the embedding keeps its
float table there. Which of its MatMuls take 8 bits is the ONNX Runtime graph's budget's choice, carried by
value (``column_bits``): its MatMuls are merged differently (q/k/v, gate/up in one there), but every weight
column is the same float column in both graphs, so ``record`` (a dict the ort graph's pass fills: each column's
digest -> its bits) tells the trt graph's pass the bits of each of its weights (the most of its columns'). A
MatMul none of whose columns was recorded falls back to ``eight_bit_error``: 8 bits where the 4-bit relative
error reaches the threshold the budget arrived at. (That rule alone was wrong for a GGUF source: the ort
graph's carried weights have 4-bit error 0, so the threshold fell to 0 and every trt MatMul took 8 bits.)

Blocks carried from the source (``source``, a ``SourceBlocks``): a GGUF file's 32-value blocks
(``exporter/gguf_blocks.py``) are exactly what the exported weights hold, so where every column of a weight is a
row of them (found by value; merged q/k/v columns too) and the levels fit the bit width, the blocks go into
MatMulNBits unchanged instead of being rounded a second time: relative error 0, and the weights llama.cpp
computes with. Symmetric blocks (Q8_0, Q5_0, Q4_0: ``d * level``) take ``scale = d``. (Rounding again gives Q5_0
and Q4_0 blocks back anyway; it moves Q8_0's, whose extreme is +-127 of 8 bits' -128..127.) Blocks with an
offset (Q4_K, Q4_1: ``s * q - o``, q in 0..15) have no exact MatMulNBits form on their own -- its zero point is
an integer level, and float zero points run ~40x slower on this CPU (decisions/009) -- so they are written as
the levels ``q - c + h`` with ``scale = s`` and the kernel's default zero point ``h = 2^(bits-1)``, plus a
correction from each block's sum of the input:

    sum_k x[k] (s q[k] - o) = sum_k x[k] s (q[k] - c)  +  (sum_k x[k]) (c s - o)       (k over one block)

that is ``MatMulNBits(x) + ReduceSum(Reshape(x, [..., K/bs, bs]), -1) @ C`` with ``C[j, n] = c s - o`` of block
``j`` of column ``n`` (float, ``[K/bs, N]``: 4 bytes per block next to its 16 of levels and 4 of scale; llama.cpp's
Q4_K dot product uses the same block sums for its mins). ``c`` is the level nearest ``o / s`` that the stored
levels allow (8 for a block using all 16): accuracy level 4 rounds ``x`` to int8 per block, and that error is
multiplied by ``s (q - c)``, which stays near the weight itself only when ``c`` is near ``o / s``. 4 bits only: 8
bits round an offset block to within 1/17 of its step without a correction (every MatMul at 8 bits, Gemma 3:
perplexity 21.924 carried, 21.844 rounded -- noise, but no gain for four more nodes a weight). Not for a tied
table (GatherBlockQuantized reads it as it is) nor a head that may run rescored. The ort target only (TensorRT's
form wants positive scales and +-(2^(bits-1) - 1)). A weight that differs from the source anywhere is quantized
as usual.

Skipped, with the reason logged: weights that are not constant, K not a multiple of the block size,
K smaller than a block, batched (3-D) weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.base import Pass, PassResult
from passes.graph_utils import constant_value, fresh_name, producer
from passes.select_logit_positions import lm_head

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
BLOCKED_DQ_OPSET = 21  # DequantizeLinear's block_size
EIGHT_BIT_OFFSETS = "8 bits round them to within 1/17 of their step without a correction (module docstring)"
APPROX_BLOCK = 128  # the rescored head's 4-bit pass: measured fastest for a vocabulary-wide head (decisions/009)


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, symmetric: bool = True, positive: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed uint8 [N, K/bs, bs*bits/8], scales float32 [N, K/bs], zero points) of a ``[K, N]`` weight.
    Symmetric (module docstring): no zero points, the kernel's default 2^(bits-1). Asymmetric: each block's
    range [min, max] over the 2^bits levels, ``W ~= (q - zp) * scale`` with a float zero point ``[N, K/bs]``
    -- exact for a block that already holds 2^bits evenly spaced values, as a GGUF Q4_K block does."""
    k, n = weight.shape
    blocks = np.ascontiguousarray(weight.T, dtype=np.float32).reshape(n, k // block_size, block_size)
    top = 2 ** bits - 1
    if symmetric and positive:  # TensorRT's: positive scales, the largest magnitude onto +-(2^(bits-1) - 1)
        zero = np.full(blocks.shape[:-1], 2 ** (bits - 1), np.float32)
        scales = np.abs(blocks).max(-1) / (2 ** (bits - 1) - 1)
    elif symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        zero = np.full(extreme.shape, 2 ** (bits - 1), np.float32)
        scales = extreme / -zero
    else:  # the block's range [min, max] (widened to hold 0, so the zero point is a level) over the levels
        low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scales = (high - low) / top
        scales[scales == 0] = 1.0
        zero = np.clip(np.rint(-low / scales), 0, top).astype(np.float32)
    scales[scales == 0] = 1.0  # a constant block: any scale holds it
    q = np.clip(np.rint(blocks / scales[..., None] + zero[..., None]), 0, top).astype(np.uint8)
    return pack_levels(q, bits), scales.astype(np.float32), (None if symmetric else zero.astype(np.uint8))


def pack_levels(q: np.ndarray, bits: int) -> np.ndarray:
    """Levels ``[N, K/bs, bs]`` (uint8) as MatMulNBits stores them: 4-bit ones two per byte along K, the lower
    nibble holding the even k (``unpack_levels`` undoes it)."""
    return q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packed zero points: uint8 ``[N, ceil(blocks * bits / 8)]``, two 4-bit values per byte
    (the lower nibble the even block; an odd count padded with the default 8)."""
    if bits == 8:
        return zero
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.full((zero.shape[0], 1), 8, np.uint8)], axis=1)
    return zero[:, 0::2] | (zero[:, 1::2] << 4)


def unpack_levels(packed: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """The levels ``[N, K/bs, bs]`` (uint8, 0 .. 2^bits - 1) of packed MatMulNBits blocks."""
    if bits == 8:
        return packed
    q = np.empty(packed.shape[:-1] + (block_size,), np.uint8)
    q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    return q


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int, block_size: int,
                      zero: np.ndarray | None = None) -> np.ndarray:
    """The ``[K, N]`` float weight that ``(packed, scales, zero)`` stands for (``quantize_blocks`` undone)."""
    q = unpack_levels(packed, bits, block_size)
    zero = np.float32(2 ** (bits - 1)) if zero is None else zero[..., None].astype(np.float32)
    values = (q.astype(np.float32) - zero) * scales[..., None]
    return values.reshape(values.shape[0], -1).T


class SourceBlocks:
    """Rows of a source's blocks, found by value: ``tensors`` yields ``(name, values [rows, K], scales [rows, K /
    block], offsets [rows, K / block] or None)`` with ``values = scale * integer`` per block, or ``scale *
    integer - offset`` (``exporter/gguf_blocks.py``). Only each row's digest, scales and offsets are kept (the
    embedding's 262,144 rows: 21 MB of scales)."""

    def __init__(self, tensors: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
                 block_size: int = 32):
        self.block_size = block_size
        self._rows: dict[bytes, tuple[np.ndarray, np.ndarray | None]] = {}
        for _, values, scales, offsets in tensors:
            for i, row in enumerate(values):
                self._rows[_digest(row)] = (scales[i], None if offsets is None else offsets[i])

    def __len__(self) -> int:
        return len(self._rows)

    def blocks(self, weight: np.ndarray, bits: int, block_size: int, no_offsets: str = ""
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | str:
        """(packed levels, scales, block-sum correction ``[K/bs, N]`` or None) in MatMulNBits' form holding
        ``weight [K, N]`` exactly (module docstring), or why not. ``no_offsets``: why offset blocks cannot be
        taken here (empty: they can)."""
        if block_size != self.block_size:
            return f"the source's blocks hold {self.block_size} values, not {block_size}"
        columns = np.ascontiguousarray(weight.T, dtype=np.float32)
        n, k = columns.shape
        scales = np.empty((n, k // block_size), np.float32)
        shift = None  # the offsets [N, K/bs] and which columns have them, made when one does
        offset_columns = np.zeros(n, bool)
        for j, column in enumerate(columns):
            found = self._rows.get(_digest(column))
            if found is None or found[0].shape != scales.shape[1:]:
                return f"column {j} is not a row of the source's blocks"
            scales[j] = found[0]
            if found[1] is not None:
                if no_offsets:
                    return f"column {j} has offset blocks: {no_offsets}"
                shift = np.zeros_like(scales) if shift is None else shift
                shift[j], offset_columns[j] = found[1], True
        half, top = 2 ** (bits - 1), 2 ** bits - 1
        q = np.empty((n, k // block_size, block_size), np.uint8)
        centre = None if shift is None else np.zeros_like(scales)  # the level each offset block's zero point stands for
        for start in range(0, n, 8192):  # a 262,144-column head in slices: a few float copies of it are GBs
            part = slice(start, start + 8192)
            values, part_scales = columns[part].reshape(-1, k // block_size, block_size), scales[part, :, None]
            safe = np.where(part_scales == 0, 1, part_scales)
            part_shift = 0 if shift is None else shift[part, :, None]
            levels = np.rint((values + part_shift) / safe)
            if not np.array_equal(levels * part_scales - part_shift, values):
                return "the values are not the source's scale x integer (- offset)"
            if centre is not None:  # as near the offset as the levels allow (module docstring): a small correction
                low, high = levels.max(-1) + half - top, levels.min(-1) + half
                wanted = np.clip(np.rint(shift[part] / safe[..., 0]), low, np.maximum(low, high))
                centre[part] = np.where(offset_columns[part, None], wanted, 0)
                levels = levels - centre[part, :, None]
            if levels.min() < -half or levels.max() > top - half:
                return f"the source's levels {int(levels.min())}..{int(levels.max())} do not fit {bits} bits"
            q[part] = levels + half
        correction = None if shift is None else np.ascontiguousarray(
            np.where(offset_columns[:, None], centre * scales - shift, 0).T.astype(np.float32))
        return pack_levels(q, bits), scales, correction


def _variable(graph: gs.Graph, node: gs.Node, base: str, dtype=np.float32) -> gs.Variable:
    """A new tensor named after ``node`` for what the pass writes in its place."""
    return gs.Variable(fresh_name(graph, f"{node.name}_{base}"), dtype=dtype)


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


def _column_digests(weight: np.ndarray) -> list[bytes]:
    """The digest of each column of a ``[K, N]`` weight (a tied head's: each embedding row)."""
    return [_digest(column) for column in np.ascontiguousarray(weight.T, dtype=np.float32)]


class QuantizeWeightsNBits(Pass):
    """MatMul with constant weights -> MatMulNBits (4 bits, or 8 where told); a tied embedding Gather ->
    GatherBlockQuantized on the same 4-bit table."""

    def __init__(self, block_size: int = 32, accuracy_level: int = 4, eight_bit: tuple[str, ...] = (),
                 keep: tuple[str, ...] = (), symmetric: bool = True, memo: dict | None = None, rescore: int = 0,
                 target: str = "ort", eight_bit_error: float | None = None, source: SourceBlocks | None = None,
                 column_bits: dict[bytes, int] | None = None, record: dict[bytes, int] | None = None):
        self.block_size, self.accuracy_level, self.symmetric = block_size, accuracy_level, symmetric
        self.source, self.column_bits, self.record = source, column_bits, record
        self.rescore, self.target, self.eight_bit_error = rescore, target, eight_bit_error
        self.memo = memo if memo is not None else {}  # (node, bits) -> blocks: a budget search runs many times
        self.eight_bit, self.keep = set(eight_bit), set(keep)

    def run(self, graph: gs.Graph) -> PassResult:
        counts = {"4": 0, "8": 0}
        carried = offset = matched = 0
        error: dict[str, float] = {}
        eight: list[str] = []
        self._scales3: dict[str, gs.Constant] = {}
        rescored = None
        tables: dict[int, tuple[gs.Constant, gs.Constant]] = {}  # id(embedding constant) -> (packed, scales)
        gathered = {id(n.inputs[0]): n.inputs[0] for n in graph.nodes
                    if n.op == "Gather" and isinstance(n.inputs[0], gs.Constant) and n.inputs[0].values.ndim == 2}
        head = lm_head(graph)
        for node in [n for n in graph.nodes if n.op == "MatMul"]:
            found = self._weight(node)
            if isinstance(found, str):
                logger.debug("skip %s: %s", node.name, found)
                continue
            weight, tied = found
            if tied is None:  # an exporter may have folded the head's Transpose into a copy of the table
                tied = next((t for t in gathered.values() if t.values.shape == weight.shape[::-1]
                             and np.array_equal(t.values, weight.T)), None)
            symmetric = self.symmetric or tied is not None or self.target == "trt"  # no zero points there
            # a source's offset blocks need a correction after the MatMulNBits (module docstring)
            offsets = ("a tied table's other reader (GatherBlockQuantized) takes no correction" if tied is not None
                       else "the head may run rescored, which takes no correction" if node is head
                       else "the input's rank is unknown" if node.inputs[0].shape is None else "")
            bits = 8 if node.name in self.eight_bit else 4
            recorded = self._recorded_bits(weight) if self.column_bits else None
            threshold = self.eight_bit_error
            if recorded is not None:
                bits, matched = max(bits, recorded), matched + 1
            elif threshold is not None and self._error(node.name, weight, 4, symmetric, offsets) >= threshold:
                bits = 8  # as 4 bits hold it no better than what the budget moved to 8 bits
            if self.record is not None:
                self.record.update(dict.fromkeys(_column_digests(weight), bits))
            self._error(node.name, weight, bits, symmetric, offsets)
            packed, scales, zero, error[node.name], from_source, correction = self.memo[node.name, bits, self.target]
            carried += from_source
            if bits == 8:
                eight.append(node.name)
            if self.target == "trt":
                self._dequantize_linear(graph, node, packed, scales, bits, weight.shape)
                counts[str(bits)] += 1
                continue
            k, n = weight.shape
            packed_t = gs.Constant(fresh_name(graph, f"{node.name}_q{bits}"), packed)
            scales_t = gs.Constant(fresh_name(graph, f"{node.name}_scales"), scales)
            out, x = node.outputs[0], node.inputs[0]
            node.outputs.clear()
            if node is head and bits == 8 and self.rescore and n > 8 * self.rescore:
                self._rescored_head(graph, node, weight, packed_t, scales_t, out)
                node.inputs.clear()
                counts["8"] += 1
                if tied is not None:
                    tables[id(tied)] = (packed_t, scales_t, bits)
                rescored = node.name
                continue
            blocks_out = out if correction is None else _variable(graph, node, "blocks_out")
            graph.layer(op="MatMulNBits", name=f"{node.name}_nbits", domain=MS_DOMAIN,
                        inputs=[x, packed_t, scales_t] + ([] if zero is None else [
                            gs.Constant(fresh_name(graph, f"{node.name}_zero_points"), pack_zero_points(zero, bits))]),
                        outputs=[blocks_out],
                        attrs={"K": k, "N": n, "bits": bits, "block_size": self.block_size,
                               "accuracy_level": self.accuracy_level})
            if correction is not None:
                self._offset_correction(graph, node, x, blocks_out, out, correction)
                offset += 1
            node.inputs.clear()
            counts[str(bits)] += 1
            if tied is not None:
                tables[id(tied)] = (packed_t, scales_t, bits)
        embeddings = self._share_embedding(graph, tables) if tables else 0
        if not any(counts.values()):
            return PassResult(False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, {"int4": counts["4"], "int8": counts["8"], "embedding_4bit": embeddings,
                                 "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                                 **({"rescored_head": rescored, "rescore": self.rescore} if rescored else {}),
                                 "eight_bit": eight, "carried": carried, "carried_offsets": offset,
                                 **({"matched": matched} if self.column_bits else {}), "relative_error": error})

    def _recorded_bits(self, weight: np.ndarray) -> int | None:
        """The most bits ``column_bits`` gives any column of ``weight`` (None: no column recorded)."""
        found = [b for b in map(self.column_bits.get, _column_digests(weight)) if b is not None]
        return max(found, default=None)

    def _error(self, name: str, weight: np.ndarray, bits: int, symmetric: bool, no_offsets: str = "") -> float:
        """The relative error of ``weight`` at ``bits`` (quantized once and kept in the memo as ``(packed,
        scales, zero points, error, carried, correction)``)."""
        key = (name, bits, self.target)
        if key not in self.memo:
            if bits == 8:
                no_offsets = no_offsets or EIGHT_BIT_OFFSETS
            found = "only the ort target's symmetric form takes them" if self.source is None or \
                self.target != "ort" or not symmetric else self.source.blocks(weight, bits, self.block_size,
                                                                               no_offsets)
            if not isinstance(found, str):  # the source's own blocks: exact (module docstring)
                packed, scales, correction = found
                self.memo[key] = (packed, scales, None, 0.0, True, correction)
                return 0.0
            if self.source is not None:
                logger.debug("%s at %d bits not carried from the source: %s", name, bits, found)
            packed, scales, zero = quantize_blocks(weight, bits, self.block_size, symmetric, self.target == "trt")
            back = dequantize_blocks(packed, scales, bits, self.block_size, zero)
            self.memo[key] = (packed, scales, zero,
                              float(np.linalg.norm(back - weight) / max(np.linalg.norm(weight), 1e-30)), False, None)
        return self.memo[key][3]

    def _offset_correction(self, graph: gs.Graph, node: gs.Node, x: gs.Tensor, blocks_out: gs.Tensor,
                           out: gs.Tensor, correction: np.ndarray) -> None:
        """``out = blocks_out + ReduceSum(Reshape(x, [..., K/bs, bs]), -1) @ correction``: each block's sum of
        ``x`` times the block's ``c * scale - offset`` (module docstring, "Blocks carried")."""
        split, sums, shifted = (_variable(graph, node, base) for base in ("input_blocks", "block_sums",
                                                                            "block_offsets"))
        shape = np.array([0] * (len(x.shape) - 1) + [correction.shape[0], self.block_size], np.int64)
        graph.layer(op="Reshape", name=split.name, inputs=[x, gs.Constant(fresh_name(graph, "blocks_shape"), shape)],
                    outputs=[split])
        graph.layer(op="ReduceSum", name=sums.name, outputs=[sums], attrs={"keepdims": 0},
                    inputs=[split, gs.Constant(fresh_name(graph, "last_axis"), np.array([-1], np.int64))])
        graph.layer(op="MatMul", name=shifted.name, outputs=[shifted],
                    inputs=[sums, gs.Constant(fresh_name(graph, f"{node.name}_block_correction"), correction)])
        graph.layer(op="Add", name=f"{node.name}_offsets", inputs=[blocks_out, shifted], outputs=[out])

    def _dequantize_linear(self, graph: gs.Graph, node: gs.Node, packed: np.ndarray, scales: np.ndarray, bits: int,
                           shape: tuple[int, int]) -> None:
        """TensorRT's form: ``MatMul(A, DequantizeLinear(Wq, scale, axis=0, block_size))`` with signed int4 or
        int8 weights and zero point 0 (the only one TensorRT takes); the same values as the MatMulNBits form."""
        k, n = shape
        signed = (unpack_levels(packed, bits, self.block_size).astype(np.int16) - 2 ** (bits - 1)).reshape(n, k).T
        name = fresh_name(graph, f"{node.name}_w{bits}")
        if bits == 4:  # ONNX packs int4 two per byte, the first element in the low nibble (numpy has no int4)
            flat = np.ascontiguousarray(signed).reshape(-1).astype(np.uint8) & 0x0F
            raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
            proto = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, [k, n], raw.tobytes(), raw=True)
            weights = gs.Constant(name, gs.ir.tensor.LazyValues(proto))
        else:
            weights = gs.Constant(name, np.ascontiguousarray(signed).astype(np.int8))
        scale = gs.Constant(fresh_name(graph, f"{node.name}_scale"), np.ascontiguousarray(scales.T))
        dequantized = gs.Variable(fresh_name(graph, f"{node.name}_dequantized"), dtype=np.float32)
        graph.layer(op="DequantizeLinear", name=dequantized.name, inputs=[weights, scale], outputs=[dequantized],
                    attrs={"axis": 0, "block_size": self.block_size})
        node.inputs[1] = dequantized
        graph.opset = max(graph.opset, BLOCKED_DQ_OPSET)

    def _blocks_scales(self, graph: gs.Graph, scales: gs.Constant) -> gs.Constant:
        """``scales`` as GatherBlockQuantized reads them for ``[N, K/bs, bs]`` blocks (``[N, K/bs, 1]``), made once
        per table: the rescored head and the embedding gather from the same one (21 MB for Gemma 3's)."""
        if scales.name not in self._scales3:
            self._scales3[scales.name] = gs.Constant(fresh_name(graph, f"{scales.name}_3d"),
                                                     scales.values.reshape(scales.values.shape[0], -1, 1))
        return self._scales3[scales.name]

    def _rescored_head(self, graph: gs.Graph, node: gs.Node, weight: np.ndarray, table: gs.Constant,
                       scales: gs.Constant, out: gs.Tensor) -> None:
        """An 8-bit tied head as a 4-bit pass over the vocabulary and an 8-bit rescoring of its ``rescore``
        best candidates (module docstring, "The rescored head")."""
        k, n = weight.shape
        block = APPROX_BLOCK if k % APPROX_BLOCK == 0 else self.block_size
        if (node.name, "approx") not in self.memo:  # a 4-bit pass for the ort form only
            self.memo[node.name, "approx"] = quantize_blocks(weight, 4, block)[:2]
        approx_q, approx_s = self.memo[node.name, "approx"]
        x = node.inputs[0]

        def var(base, dtype=np.float32):
            return _variable(graph, node, base, dtype)

        approx = var("approx_logits")
        graph.layer(op="MatMulNBits", name=approx.name, domain=MS_DOMAIN, outputs=[approx],
                    inputs=[x, gs.Constant(fresh_name(graph, f"{node.name}_approx_q4"), approx_q),
                            gs.Constant(fresh_name(graph, f"{node.name}_approx_scales"), approx_s)],
                    attrs={"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": self.accuracy_level})
        values, index = var("candidate_logits"), var("candidates", np.int64)
        graph.layer(op="TopK", name=index.name, inputs=[approx, gs.Constant(fresh_name(graph, "rescore_k"),
                    np.array([self.rescore], np.int64))], outputs=[values, index], attrs={"axis": -1, "sorted": 0})
        blocks = var("candidate_blocks")
        scales3 = self._blocks_scales(graph, scales)
        graph.layer(op="GatherBlockQuantized", name=blocks.name, domain=MS_DOMAIN, outputs=[blocks],
                    inputs=[table, index, scales3],
                    attrs={"bits": 8, "block_size": self.block_size, "gather_axis": 0, "quantize_axis": 2})
        rows = var("candidate_rows")
        graph.layer(op="Reshape", name=rows.name, inputs=[blocks, gs.Constant(fresh_name(graph, "rows_shape"),
                    np.array([0, 0, 0, -1], np.int64))], outputs=[rows])
        column = var("hidden_column")
        graph.layer(op="Unsqueeze", name=column.name, inputs=[x, gs.Constant(fresh_name(graph, "last_axis"),
                    np.array([-1], np.int64))], outputs=[column])
        exact4, exact = var("exact_column"), var("exact_logits")
        graph.layer(op="MatMul", name=exact4.name, inputs=[rows, column], outputs=[exact4])
        graph.layer(op="Squeeze", name=exact.name, inputs=[exact4, gs.Constant(fresh_name(graph, "squeeze_last"),
                    np.array([-1], np.int64))], outputs=[exact])
        graph.layer(op="ScatterElements", name=f"{node.name}_rescored", inputs=[approx, index, exact],
                    outputs=[out], attrs={"axis": -1})

    def _weight(self, node: gs.Node):
        """(the [K, N] float weight, the constant it is the transpose of or None), or why not."""
        if node.name in self.keep:
            return "kept in float by the accuracy budget"
        b = node.inputs[1]
        value, tied = constant_value(b), None
        if value is None:
            transpose = producer(b)
            source = transpose.inputs[0] if transpose is not None and transpose.op == "Transpose" else None
            if source is None or constant_value(source) is None:
                return "the weights are not a constant (or a Transpose of one)"
            perm = transpose.attrs.get("perm")
            if perm is not None and list(perm) != [1, 0]:
                return f"the weights are a Transpose with perm {list(perm)}"
            value, tied = constant_value(source).T, source
        if value.ndim != 2 or value.dtype != np.float32:
            return f"the weights are {value.ndim}-D {value.dtype}, not a 2-D float32 matrix"
        k = value.shape[0]
        if k < self.block_size or k % self.block_size:
            return f"K = {k} is not a multiple of the block size {self.block_size}"
        return value, tied

    def _share_embedding(self, graph: gs.Graph, tables: dict) -> int:
        """Gather(table, ids) of a table whose transpose became a 4-bit head -> GatherBlockQuantized on the
        head's blocks ([vocab, K/bs, bs/2], quantize_axis 2), reshaped back to [..., K]."""
        shared = 0
        for node in [n for n in graph.nodes if n.op == "Gather" and id(n.inputs[0]) in tables]:
            if int(node.attrs.get("axis", 0)) != 0:
                logger.debug("skip %s: a Gather of the tied table along axis %s", node.name, node.attrs.get("axis"))
                continue
            packed, scales, bits = tables[id(node.inputs[0])]
            vocab, blocks, _ = packed.values.shape
            scales3 = self._blocks_scales(graph, scales)
            out = node.outputs[0]
            rows = gs.Variable(fresh_name(graph, f"{node.name}_blocks"), dtype=np.float32)
            graph.layer(op="GatherBlockQuantized", name=f"{node.name}_4bit", domain=MS_DOMAIN,
                        inputs=[packed, node.inputs[1], scales3], outputs=[rows],
                        attrs={"bits": bits, "block_size": self.block_size, "gather_axis": 0, "quantize_axis": 2})
            node.outputs.clear()
            node.inputs.clear()
            flat = gs.Constant(fresh_name(graph, "embedding_rows_shape"), np.array([0, 0, -1], np.int64))
            if out.shape is not None and len(out.shape) != 3:
                flat = gs.Constant(flat.name, np.array([0] * (len(out.shape) - 1) + [-1], np.int64))
            graph.layer(op="Reshape", name=f"{node.name}_rows", inputs=[rows, flat], outputs=[out])
            shared += 1
        return shared

