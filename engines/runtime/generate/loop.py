"""The generation loop over a decoder graph (``exporter.decoder``: one graph for prefill and decode).

A batch of prompts is left-padded to one length (``attention_mask`` 0 at the pads, ``position_ids`` the
running count of real tokens, as Hugging Face's ``generate`` does), run once as the prefill with empty
pasts, then one token per step. The presents of each step go back in as the next step's pasts through
ONNX Runtime's I/O binding: the cache stays in ONNX Runtime's own buffers as ``OrtValue``s, never copied
to NumPy or back; only the logits of the last position are read. A row that emits a stop token (the
bundle's end-of-sequence tokens, or ``stop``) is finished: it keeps running with the batch until every
row is done or ``max_new_tokens`` is reached, and what it produces after its stop token is dropped.

Bad requests raise ``GenerationError`` naming what was expected: an empty prompt, a token id outside the
vocabulary, a prompt plus new tokens longer than the bundle's ``max_length``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from engines.runtime.generate.sampling import Sampling, next_tokens
from foundation.decoder import DecoderInfo
from foundation.errors import RuntimeInputError


class GenerationError(RuntimeInputError):
    """A request the generation loop cannot serve (an empty prompt, an unknown token, too long)."""


@dataclasses.dataclass
class Step:
    """What one step produced: the token of every row, which rows it extends (not finished before, not a stop
    token: a stop token ends a row and is not part of its text), and which rows are finished after it."""

    tokens: np.ndarray  # [batch] int64
    emitted: np.ndarray  # [batch] bool
    finished: np.ndarray  # [batch] bool


class Generator:
    """Generation over one ONNX Runtime session of a decoder graph (module docstring)."""

    def __init__(self, session: ort.InferenceSession, info: DecoderInfo):
        self.session, self.info = session, info
        self._device = "cpu"

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampling: Sampling | None = None, stop: Sequence[int] = ()) -> list[list[int]]:
        """The new tokens of each prompt (a stop token ends a row and is not included)."""
        new: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, sampling, stop):
            for row in np.flatnonzero(step.emitted):
                new[row].append(int(step.tokens[row]))
        return new

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: Sampling | None = None, stop: Sequence[int] = ()) -> Iterator[Step]:
        """Yields each step's tokens as soon as they are chosen (a streaming client prints them)."""
        sampling = sampling or Sampling()
        ids, mask = self._left_padded(prompts, max_new_tokens)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        batch = ids.shape[0]
        empty = np.zeros((batch, self.info.kv_heads, 0, self.info.head_dim), np.float32)
        pasts = {name: ort.OrtValue.ortvalue_from_numpy(empty) for name in self.info.past_names}
        history = [np.asarray(p, np.int64) for p in prompts]
        finished = np.zeros(batch, dtype=bool)
        rng = sampling.rng()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for _ in range(max_new_tokens):
            logits, pasts = self._run(feeds, pasts)
            tokens = next_tokens(logits, sampling, rng, history)
            stops = np.isin(tokens, [*self.info.eos, *stop])
            emitted = ~finished & ~stops
            finished = finished | stops
            history = [np.append(h, t) for h, t in zip(history, tokens)]
            yield Step(tokens, emitted, finished.copy())
            if finished.all():
                return
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            feeds = {"input_ids": tokens[:, None], "attention_mask": mask,
                     "position_ids": feeds["position_ids"][:, -1:] + 1}

    def _run(self, feeds: dict[str, np.ndarray], pasts: dict[str, ort.OrtValue]):
        """One call: the last position's logits as NumPy, the presents as OrtValues keyed by the past names."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in pasts.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self._device)
        for name in self.info.present_names:
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in the order bound
        logits = outputs[0].numpy()[:, -1, :]
        return logits, dict(zip(self.info.past_names, outputs[1:]))

    def _left_padded(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        if not prompts:
            raise GenerationError("no prompt given: expected at least one sequence of token ids")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens is {max_new_tokens}: expected at least 1")
        longest = max(len(p) for p in prompts)
        for k, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {k} is empty: expected at least one token (a BOS token at least)")
            bad = [t for t in prompt if not 0 <= int(t) < self.info.vocab]
            if bad:
                raise GenerationError(f"prompt {k} holds token id {bad[0]}, outside the vocabulary "
                                      f"0..{self.info.vocab - 1}")
        if longest + max_new_tokens > self.info.max_length:
            raise GenerationError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens is longer than the "
                                  f"bundle's max length {self.info.max_length}: shorten the prompt, ask for fewer "
                                  "tokens, or rebuild with a larger --max-length")
        pad = self.info.pad if self.info.pad is not None else 0
        ids = np.full((len(prompts), longest), pad, np.int64)
        mask = np.zeros((len(prompts), longest), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = np.asarray(prompt, np.int64)
            mask[row, longest - len(prompt):] = 1
        return ids, mask
