"""What a runtime needs to know about a decoder graph besides its tensors: the cache layout, the longest
sequence it was built for and the special tokens. Written into the manifest by the build, read by the
generation loop (standard library only)."""

from __future__ import annotations

import dataclasses

from foundation.errors import UsageError

# Decoders export at opset 23 or later: its Attention, RotaryEmbedding and RMSNormalization are what the
# decoder fusions match and what TensorRT's parser reads (docs/decisions/008-decoder-graph.md).
DECODER_OPSET = 23


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    family: str  # the transformers config's model_type
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_length: int  # the longest sequence (prompt + new tokens) the bundle is built for
    bos: int | None = None
    eos: tuple[int, ...] = ()
    pad: int | None = None
    sliding_window: int | None = None
    # How the graph keeps its cache: "grow" (present = past + new tokens, left padding) or "shared" (past and
    # present one max-length buffer written in place, rows padded on the right: GroupQueryAttention).
    cache: str = "grow"
    # The TensorRT graph's: "grow", or "static" (buffers of the max length written by TensorScatter).
    trt_cache: str = "grow"

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"eos": list(self.eos)}

    @classmethod
    def from_json(cls, data: dict) -> DecoderInfo:
        return cls(**{**data, "eos": tuple(data.get("eos", ()))})


DECODER_BUDGET_METRICS = ("perplexity", "agreement")
# 1.5 %: as close to the float model as the 4-bit GGUF runtimes it is compared with (llama.cpp: +0.7 % on
# Gemma 3 270M here, docs/decisions/009), with room for 4 bits where they hold.
DEFAULT_DECODER_BUDGET = "perplexity=0.015"


@dataclasses.dataclass(frozen=True)
class DecoderBudget:
    """A decoder's accuracy budget against its float graph on held-out text: ``perplexity=R`` (perplexity at
    most ``1 + R`` times the float graph's) or ``agreement=A`` (the next-token first choice equal to the
    float graph's at a fraction ``A`` of the positions, at least)."""

    metric: str
    threshold: float

    @classmethod
    def parse(cls, text: str | None) -> DecoderBudget:
        text = text or DEFAULT_DECODER_BUDGET
        metric, _, value = text.partition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = None
        if metric not in DECODER_BUDGET_METRICS or threshold is None or threshold < 0:
            raise UsageError(f"decoder budget {text!r}: expected perplexity=R (at most 1 + R times the float "
                             "model's perplexity, e.g. perplexity=0.02) or agreement=A (e.g. agreement=0.95)")
        return cls(metric, threshold)

    def met(self, perplexity: float, agreement: float, reference_perplexity: float) -> bool:
        if self.metric == "perplexity":
            return perplexity <= reference_perplexity * (1 + self.threshold)
        return agreement >= self.threshold

    def __str__(self) -> str:
        return f"{self.metric}={self.threshold:g}"


PAST_PREFIX = "past_key_values."
LOGIT_POSITIONS = "logit_positions"  # int64 [batch, kept]: where a decoder graph computes logits


def every_logit_position(feeds: dict) -> dict:
    """``feeds`` asking a graph with a ``logit_positions`` input for the logits at every position of the step
    (what feeds without it meant; ``passes/select_logit_positions.py``)."""
    if LOGIT_POSITIONS in feeds or "input_ids" not in feeds:
        return feeds
    batch, steps = feeds["input_ids"].shape
    positions = _pad(_arange(steps)[None], [(0, batch - 1), (0, 0)], mode="edge")
    return {**feeds, LOGIT_POSITIONS: positions}


def static_cache_feeds(feeds: dict) -> dict:
    """Growing-cache feeds (pasts ``[B, kv, P, H]``, a step of S tokens) as a static-cache graph reads them:
    each past in a buffer exactly ``P + S`` long, the step's slots zero (``passes/fuse_static_kv_cache.py``).
    Feeds without pasts, or already padded, come back as they are."""
    steps = feeds["input_ids"].shape[1] if "input_ids" in feeds else 0
    total = feeds["attention_mask"].shape[1] if "attention_mask" in feeds else None
    out = dict(feeds)
    for name, value in feeds.items():
        if name.startswith(PAST_PREFIX) and getattr(value, "ndim", 0) == 4 and value.shape[2] + steps == total:
            pad = [(0, 0)] * 4
            pad[2] = (0, steps)
            out[name] = _pad(value, pad)
    return out


def _pad(value, widths, mode: str = "constant"):
    import numpy as np  # noqa: PLC0415 - the standard library above; NumPy only where feeds are padded

    return np.pad(value, widths, mode=mode)


def _arange(n: int):
    import numpy as np  # noqa: PLC0415 - as _pad

    return np.arange(n, dtype=np.int64)
