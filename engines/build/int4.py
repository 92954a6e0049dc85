"""A decoder's 4-bit weights under an accuracy budget (``--precision int4``).

The ONNX Runtime graph's MatMuls become 4-bit ``MatMulNBits`` (``passes/quantize_weights_nbits.py``);
the float graph and each candidate are scored on held-out text (``engines.runtime.generate.perplexity``:
perplexity, and agreement of the next-token first choice with the float graph). When 4 bits everywhere
break the budget, the MatMuls 4 bits hold worst -- the largest relative weight error, which is where a
weight carries more than 16 levels per block, as a GGUF's 5-, 6- and 8-bit tensors do -- move to 8 bits:
the smallest such prefix that meets the budget, found by bisection over the ordered list (a handful of
scored tries; each weight is quantized once per bit width and reused). An LM head at 8 bits runs rescored
(a 4-bit pass over the vocabulary, its best candidates in 8 bits: ``passes/quantize_weights_nbits.py``).
That head has an accuracy floor of its own: a token the 4-bit pass pushes out of the candidates keeps a 4-bit
logit, biased low by that selection (Gemma 3 270M: +1.3 % perplexity at 256 candidates, +0.8 % at 1024, measured
in docs/decisions/009, "The rescored head's floor"), and how large the floor is depends on the CPU's kernels.
So when every MatMul at 8 bits breaks the budget, the head takes more candidates, then runs whole in 8 bits,
before the build gives up; the bisection then runs with the first head that met it. When even that breaks the
budget, the build stops and says so. A GGUF source's symmetric blocks
(Q8_0, Q5_0, Q4_0: ``exporter/gguf_blocks.py``) and its blocks with an offset (Q4_K, Q4_1, with a block-sum
correction) are carried into the MatMulNBits that can hold them exactly instead of being rounded again
(``source``): a weight carried at 4 bits has no 4-bit error and comes last in the order. Block size and
accuracy level: measured on this CPU (docs/decisions/009-int4-weights.md).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import tempfile
import time
from pathlib import Path

import onnx

from engines.bundle.manifest import Int4Report
from engines.runtime.generate import Generator
from engines.runtime.generate.perplexity import DEFAULT_TOKENS, Score, evaluation_ids, score
from engines.runtime.generate.text import Tokenizer
from foundation.decoder import DecoderBudget, DecoderInfo
from foundation.errors import BuildError
from foundation.ort_session import create_session
from passes import InferShapes, PassManager
from passes.quantize_weights_nbits import QuantizeWeightsNBits, SourceBlocks

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32  # docs/decisions/009-int4-weights.md
ACCURACY_LEVEL = 4  # int8 activations: the integer dot-product units; measured faster at equal perplexity
# An 8-bit LM head as a 4-bit pass + its k best candidates in 8 bits, k tried in this order where every MatMul at
# 8 bits breaks the budget; 0: the whole head in 8 bits (decisions/009, "The rescored head's floor").
RESCORE = (256, 1024, 0)


@dataclasses.dataclass
class Int4Stage:
    """Quantizes the ``ort`` graph of a decoder to 4-bit weights within ``budget`` (module docstring)."""

    root: Path
    info: DecoderInfo
    tokenizer_dir: Path
    budget: DecoderBudget
    tokens: int = DEFAULT_TOKENS
    threads: int | None = None
    reports: dict[str, Int4Report] = dataclasses.field(default_factory=dict)
    threshold: float | None = None  # the 4-bit relative error from which the ort graph's budget chose 8 bits
    columns: dict[bytes, int] = dataclasses.field(default_factory=dict)  # the ort graph's bits of each weight column
    source: SourceBlocks | None = None  # the source file's own blocks, carried where they fit

    def quantize(self, graph: onnx.ModelProto, target: str = "ort") -> onnx.ModelProto:
        if target == "trt":
            return self._tensorrt(graph)
        start = time.perf_counter()
        ids = evaluation_ids(Tokenizer(self.tokenizer_dir).encode, self.info.bos,
                             min(self.tokens, self.info.max_length))
        if len(ids) < 16:
            raise BuildError(f"the held-out text gave {len(ids)} tokens with this tokenizer: too few to score")
        reference, choices = self._score(graph, ids)
        logger.info("int4: the float graph's perplexity %.3f on %d tokens of %s", reference.perplexity,
                    reference.tokens, reference.text)
        memo: dict = {}
        tries: list[dict] = []

        def attempt(eight: tuple[str, ...], rescore: int = RESCORE[0]):
            """Score the graph with ``eight`` at 8 bits; only the numbers are kept (a candidate is ~0.4 GB for a
            270M model and its graphsurgeon copy holds reference cycles: collected before the next try)."""
            candidate, stats = self._candidate(graph, eight, memo, rescore)
            result, _ = self._score(candidate, ids, choices)
            del candidate
            gc.collect()
            met = self.budget.met(result.perplexity, result.agreement, reference.perplexity)
            other_head = bool(eight) and rescore != RESCORE[0]  # a fallback of the head's (module docstring)
            tries.append({"int8": len(eight), "perplexity": round(result.perplexity, 4),
                          "agreement": round(result.agreement, 4), "met": met,
                          **({"rescore": rescore} if other_head else {})})
            logger.info("int4: %d MatMuls at 8 bits%s: perplexity %.3f, agreement %.3f -> %s", len(eight),
                        f" ({_head_words(rescore)})" if other_head else "",
                        result.perplexity, result.agreement, "within" if met else "outside")
            return stats, result, met

        stats, result, met = attempt(())
        errors4 = dict(stats["relative_error"])
        chosen: tuple[str, ...] = ()
        rescore = RESCORE[0]
        if not met:
            order = tuple(sorted(errors4, key=lambda n: -errors4[n]))
            floors = []
            for rescore in RESCORE:  # the head's floor first (module docstring)
                stats, result, met = attempt(order, rescore)
                floors.append(f"{result.perplexity:.3f} with "
                              f"{_head_words(rescore if stats.get('rescored_head') else 0)}")
                if met or not stats.get("rescored_head"):  # a head that cannot run rescored is tried once
                    break
            if not met:
                raise BuildError(f"4-bit weights break the budget {self.budget} even with every MatMul at 8 bits "
                                 f"(perplexity {', '.join(floors)}; the float graph's {reference.perplexity:.3f}): "
                                 "loosen --budget, or build fp32")
            low, high = 0, len(order)  # low fails, high meets
            while high - low > 1:
                middle = (low + high) // 2
                found = attempt(order[:middle], rescore)
                if found[2]:
                    high, (stats, result, _) = middle, found
                else:
                    low = middle
            chosen = order[:high]
        self.columns.clear()  # filled by the chosen one, made again from the memo: what the trt graph follows
        candidate, stats = self._candidate(graph, chosen, memo, rescore, self.columns)
        self.threshold = min((errors4[n] for n in chosen), default=float("inf"))
        self.reports["ort"] = Int4Report(str(self.budget), BLOCK_SIZE, ACCURACY_LEVEL, reference.to_json(),
                                         result.to_json(), stats["int4"], chosen, tuple(tries),
                                         round(time.perf_counter() - start, 1), stats.get("rescored_head"),
                                         stats.get("rescore", 0), stats.get("carried", 0),
                                         stats.get("carried_offsets", 0))
        logger.info("int4: %d MatMuls at 4 bits, %d at 8 (%d as the source's own blocks, %d of them with offsets); "
                    "perplexity %.3f (float %.3f), agreement %.3f", stats["int4"], len(chosen),
                    stats.get("carried", 0), stats.get("carried_offsets", 0),
                    result.perplexity, reference.perplexity, result.agreement)
        return candidate

    def _tensorrt(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        """TensorRT's graph: blocked DequantizeLinear weights, each MatMul at the bits the ort graph's budget gave
        the same weight columns (its MatMuls are merged differently: matched by value, ``columns``); one matching
        none, at 8 bits where its 4-bit error reaches the threshold the budget arrived at. Its static-cache form
        has no CPU generation loop to score, so its numbers are checked against golden.npz as every trt graph's."""
        if self.threshold is None:
            raise BuildError("internal: TensorRT's 4-bit graph needs the ONNX Runtime graph's budget first")
        start = time.perf_counter()
        threshold = None if self.threshold == float("inf") else self.threshold
        passes = [InferShapes(), QuantizeWeightsNBits(BLOCK_SIZE, ACCURACY_LEVEL, target="trt",
                                                      eight_bit_error=threshold, column_bits=self.columns)]
        gc.collect()  # the ort graph's tries, before a second copy of the weights is quantized
        quantized, records = PassManager(passes, quiet=True).run(graph)
        stats = records[-1].stats
        ort = self.reports["ort"]
        self.reports["trt"] = Int4Report(ort.budget, BLOCK_SIZE, 0, ort.reference, {"scored": False},
                                         stats.get("int4", 0), tuple(stats.get("eight_bit", ())), (),
                                         round(time.perf_counter() - start, 1))
        logger.info("int4 (trt): %d MatMuls at 4 bits, %d at 8 (%d as the ort graph's same weights; the rest "
                    "8 bits from a 4-bit error of %s)", stats.get("int4", 0), stats.get("int8", 0),
                    stats.get("matched", 0), "none" if threshold is None else f"{threshold:.4f}")
        return quantized

    def _candidate(self, graph: onnx.ModelProto, eight: tuple[str, ...], memo: dict, rescore: int,
                   record: dict | None = None):
        passes = [InferShapes(), QuantizeWeightsNBits(BLOCK_SIZE, ACCURACY_LEVEL, eight_bit=eight, memo=memo,
                                                      rescore=rescore, source=self.source, record=record)]
        quantized, records = PassManager(passes, quiet=True).run(graph)
        return quantized, records[-1].stats

    def _score(self, graph: onnx.ModelProto, ids: list[int], choices=None) -> tuple[Score, object]:
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".int4-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            onnx.save_model(graph, str(path), save_as_external_data=graph.ByteSize() > 1_800_000_000)
            session = create_session(path, self.threads)
            return score(Generator(session, self.info), ids, choices)


def _head_words(rescore: int) -> str:
    """An 8-bit LM head's form in words (``rescore`` 0: no 4-bit pass), for the log and the budget's error."""
    return f"the LM head's {rescore} best candidates in 8 bits" if rescore else "the LM head whole in 8 bits"
