"""Perplexity of a decoder on held-out text, and its agreement with another graph: the accuracy metrics of
a decoder bundle (the 4-bit budget at build, ``compare``, ``bench-llm``).

The default text is English prose that ships with every Python: the reference documentation of the
language's statements and operators (``pydoc_data.topics``), its topics in sorted order. No download, the
same bytes on every machine of one Python version; the record names the Python version with the text.
"""

from __future__ import annotations

import dataclasses
import math
import platform

import numpy as np

from engines.runtime.generate.loop import Generator

DEFAULT_TOKENS = 512


def held_out_text() -> str:
    """The default evaluation text (module docstring)."""
    from pydoc_data.topics import topics  # noqa: PLC0415 - 450 KB of text, read only when scoring

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_source() -> str:
    return f"pydoc_data.topics (Python {platform.python_version()})"


@dataclasses.dataclass(frozen=True)
class Score:
    """A graph's perplexity on ``tokens`` tokens of text, and how often its first choice for the next token
    equals a reference graph's (1.0 when scored alone)."""

    perplexity: float
    agreement: float
    tokens: int
    text: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def score(generator: Generator, ids, reference_choices: np.ndarray | None = None, chunk: int = 128
          ) -> tuple[Score, np.ndarray]:
    """The ``Score`` of ``ids`` (the first token is BOS when the model uses one) and the graph's first
    choices, for scoring another graph against this one."""
    logprobs, choices = generator.score(ids, chunk)
    agreement = 1.0 if reference_choices is None else float(np.mean(choices == reference_choices))
    return Score(float(math.exp(-logprobs.mean())), agreement, len(ids), text_source()), choices


def evaluation_ids(encode, bos: int | None, tokens: int = DEFAULT_TOKENS) -> list[int]:
    """The first ``tokens`` ids of the held-out text, BOS first when the tokenizer does not add it."""
    ids = list(encode(held_out_text()))
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids[:tokens]
