"""Choosing the next token from logits: greedy, or temperature with top-k, top-p and a repetition penalty.

Per row of ``logits [batch, vocab]``: the repetition penalty divides the positive logits of tokens
already in the row's sequence by ``repetition_penalty`` and multiplies the negative ones (the CTRL
paper's rule, as transformers applies it); temperature 0 is greedy (argmax); otherwise logits are
divided by the temperature, cut to the ``top_k`` largest, then to the smallest set whose probability
reaches ``top_p`` (the most likely token always stays), and one token is drawn from the softmax with a
NumPy generator seeded by ``seed`` (the same seed gives the same text).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from foundation.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise UsageError(f"sampling {self}: expected temperature >= 0, 0 < top_p <= 1, top_k >= 0 and "
                             "repetition_penalty > 0")

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def penalize(logits: np.ndarray, history: list[np.ndarray], penalty: float) -> np.ndarray:
    """``logits [batch, vocab]`` with the repetition penalty applied to each row's ``history`` tokens."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, seen in enumerate(history):
        tokens = np.unique(seen)
        values = out[row, tokens]
        out[row, tokens] = np.where(values > 0, values / penalty, values * penalty)
    return out


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator,
                history: list[np.ndarray]) -> np.ndarray:
    """One token per row of ``logits [batch, vocab]`` (module docstring)."""
    logits = penalize(np.asarray(logits, dtype=np.float32), history, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    scaled = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_probs, -1) - sorted_probs  # the mass of the tokens ranked above each
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, before < sampling.top_p, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
