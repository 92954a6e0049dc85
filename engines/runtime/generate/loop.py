"""The generation loop over a decoder graph (``exporter.decoder``: one graph for prefill and decode).

A batch of prompts is padded to one length, run once as the prefill, then one token per step; only the
logits of each row's last position are read. How the cache travels depends on the graph
(``DecoderInfo.cache``):

- ``"grow"`` (the exported graph: present = past + this step): prompts are left-padded (``attention_mask``
  0 at the pads, ``position_ids`` the running count of real tokens, as Hugging Face's ``generate`` does);
  each step's presents go back in as the next step's pasts through ONNX Runtime's I/O binding, as
  ``OrtValue``s that never travel through NumPy.
- ``"shared"`` (GroupQueryAttention, ``passes/fuse_group_query_attention.py``): one
  ``[batch, kv_heads, max_length, head_dim]`` buffer per past, allocated once per batch size and bound as
  both the past input and the present output, so the op writes each step's keys and values in place: no
  allocation and no copy of the cache per token. Rows are padded on the right; each row's length says
  where its next token goes (``seqlens_k`` inside the graph, ``position_ids`` here).

A row that emits a stop token (the bundle's end-of-sequence tokens, or ``stop``) is finished: it keeps
running with the batch until every row is done or ``max_new_tokens`` is reached, and what it produces after
its stop token is dropped.

Bad requests raise ``GenerationError`` naming what was expected: an empty prompt, a token id outside the
vocabulary, a prompt plus new tokens longer than the bundle's ``max_length``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from engines.runtime.generate.sampling import Sampling, next_tokens
from foundation.decoder import LOGIT_POSITIONS, DecoderInfo
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
    """Generation over one ONNX Runtime session of a decoder graph (module docstring). ``max_length``: the
    longest prompt plus new tokens, and the length of a shared cache (default: the bundle's)."""

    def __init__(self, session: ort.InferenceSession, info: DecoderInfo, max_length: int | None = None):
        self.session, self.info = session, info
        self.max_length = int(max_length or info.max_length)
        self._device = "cpu"
        self._buffers: dict[int, dict[str, ort.OrtValue]] = {}  # a shared cache per batch size, made once
        # A graph that computes logits only where asked (passes/select_logit_positions.py): one row per sequence.
        self._positions = LOGIT_POSITIONS in {i.name for i in session.get_inputs()}

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampling: Sampling | None = None, stop: Sequence[int] = (), ignore_eos: bool = False
                 ) -> list[list[int]]:
        """The new tokens of each prompt (a stop token ends a row and is not included)."""
        new: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, sampling, stop, ignore_eos):
            for row in np.flatnonzero(step.emitted):
                new[row].append(int(step.tokens[row]))
        return new

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: Sampling | None = None, stop: Sequence[int] = (), ignore_eos: bool = False
               ) -> Iterator[Step]:
        """Yields each step's tokens as soon as they are chosen (a streaming client prints them).
        ``ignore_eos``: only ``stop`` ends a row, not the bundle's end-of-sequence tokens (a benchmark's
        fixed number of new tokens)."""
        sampling = sampling or Sampling()
        self.check(prompts, max_new_tokens)
        shared = self.info.cache == "shared"
        ids, mask = self._padded(prompts, right=shared)
        batch = ids.shape[0]
        lengths = mask.sum(axis=1)
        if shared:
            pasts = self.shared_cache(batch)
            positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
            read = lengths - 1  # each row's last real position in the prefill's logits
        else:
            empty = np.zeros((batch, self.info.kv_heads, 0, self.info.head_dim), np.float32)
            pasts = {name: ort.OrtValue.ortvalue_from_numpy(empty) for name in self.info.past_names}
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            read = np.full(batch, ids.shape[1] - 1)
        history = [np.asarray(p, np.int64) for p in prompts]
        finished = np.zeros(batch, dtype=bool)
        rng = sampling.rng()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for _ in range(max_new_tokens):
            logits, pasts = self.forward(feeds, pasts, read, shared)
            tokens = next_tokens(logits, sampling, rng, history)
            stops = np.isin(tokens, [*([] if ignore_eos else self.info.eos), *stop])
            emitted = ~finished & ~stops
            finished = finished | stops
            history = [np.append(h, t) for h, t in zip(history, tokens)]
            yield Step(tokens, emitted, finished.copy())
            if finished.all():
                return
            if shared:  # the new token goes at each row's length; the mask covers what each row holds
                positions = lengths[:, None].astype(np.int64)
                lengths = lengths + 1
                mask = (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64)
            else:
                positions = feeds["position_ids"][:, -1:] + 1
                mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            feeds = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": positions}
            read = np.zeros(batch, dtype=np.int64)

    def score(self, ids: Sequence[int], chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced scoring of one token sequence: for each position but the last, the log-probability
        of the next token and the token the model ranks first, run ``chunk`` tokens per call over the cache
        (perplexity = exp(-mean(log-probabilities)); agreement between two graphs = equal first choices)."""
        ids = np.asarray(ids, np.int64)
        self.check([ids[:-1].tolist()], 1)  # the last token is only a target
        shared = self.info.cache == "shared"
        if shared:
            pasts = self.shared_cache(1)
        else:
            empty = np.zeros((1, self.info.kv_heads, 0, self.info.head_dim), np.float32)
            pasts = {name: ort.OrtValue.ortvalue_from_numpy(empty) for name in self.info.past_names}
        logprobs, best = [], []
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start:min(start + chunk, len(ids) - 1)]
            feeds = {"input_ids": piece[None], "attention_mask": np.ones((1, start + len(piece)), np.int64),
                     "position_ids": np.arange(start, start + len(piece), dtype=np.int64)[None]}
            logits, pasts = self.forward(feeds, pasts, None, shared)
            logits = logits[0].astype(np.float64)
            top = logits.max(axis=-1, keepdims=True)
            norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
            target = ids[start + 1:start + 1 + len(piece)]
            logprobs.append(logits[np.arange(len(piece)), target] - norm)
            best.append(logits.argmax(axis=-1))
        return np.concatenate(logprobs), np.concatenate(best)

    def shared_cache(self, batch: int) -> dict[str, ort.OrtValue]:
        """The max-length past/present buffers for ``batch`` rows, allocated on first use and reused by every
        later generation of that batch size (what a row held before is never read: the lengths say)."""
        if batch not in self._buffers:
            shape = (batch, self.info.kv_heads, self.max_length, self.info.head_dim)
            self._buffers[batch] = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                                    for name in self.info.past_names}
        return self._buffers[batch]

    def forward(self, feeds: dict[str, np.ndarray], pasts: dict[str, ort.OrtValue], read: np.ndarray | None,
                shared: bool):
        """One call of the graph (the continuous-batching server's too): the logits at each row's ``read``
        position (None: every position) as NumPy, and the caches for the next step (the same buffers when
        shared, else the presents as OrtValues keyed by past name)."""
        if self._positions:  # the graph computes just the logits read
            steps = feeds["input_ids"].shape[1]
            wanted = np.tile(np.arange(steps, dtype=np.int64), (len(feeds["input_ids"]), 1)) if read is None \
                else np.asarray(read, np.int64)[:, None]
            feeds = {**feeds, LOGIT_POSITIONS: wanted}
            read = None if read is None else np.zeros(len(read), np.int64)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in pasts.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self._device)
        for past, present in zip(self.info.past_names, self.info.present_names):
            if shared:
                binding.bind_ortvalue_output(present, pasts[past])
            else:
                binding.bind_output(present, self._device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in the order bound
        logits = outputs[0].numpy()
        if read is not None:  # rows read at one position (every decode step): a view, not a copy of [batch, vocab]
            same = len(read) and (read == read[0]).all()
            logits = logits[:, int(read[0]), :] if same else logits[np.arange(len(read)), read, :]
        return logits, (pasts if shared else dict(zip(self.info.past_names, outputs[1:])))

    def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise GenerationError("no prompt given: expected at least one sequence of token ids")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens is {max_new_tokens}: expected at least 1")
        for k, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {k} is empty: expected at least one token (a BOS token at least)")
            bad = [t for t in prompt if not 0 <= int(t) < self.info.vocab]
            if bad:
                raise GenerationError(f"prompt {k} holds token id {bad[0]}, outside the vocabulary "
                                      f"0..{self.info.vocab - 1}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_length:
            raise GenerationError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens is longer than the "
                                  f"max length {self.max_length}: shorten the prompt, ask for fewer tokens, or "
                                  "rebuild with a larger --max-length")

    def _padded(self, prompts: Sequence[Sequence[int]], right: bool) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(p) for p in prompts)
        pad = self.info.pad if self.info.pad is not None else 0
        ids = np.full((len(prompts), longest), pad, np.int64)
        mask = np.zeros((len(prompts), longest), np.int64)
        for row, prompt in enumerate(prompts):
            where = slice(0, len(prompt)) if right else slice(longest - len(prompt), longest)
            ids[row, where] = np.asarray(prompt, np.int64)
            mask[row, where] = 1
        return ids, mask
