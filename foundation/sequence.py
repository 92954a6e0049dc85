"""Stateful models judged as they run: a sequence of batches with each state output fed back.

``--state OUT:IN`` pairs an output with the input it feeds on the next call (an LSTM's new state,
a VAD's context, a KV cache). The INT8 budget and ``compare`` then run their batches in order,
each model feeding back its own outputs, so error that accumulates through the state (drift) is
measured instead of one step from a shared exact state. A batch whose state input shape differs from
the previous output (another batch size) starts a new sequence with the state it carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from foundation.errors import UsageError

StatePairs = tuple[tuple[str, str], ...]


def parse_state(texts: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> StatePairs:
    """``OUT:IN`` strings, checked against the model's names."""
    pairs = []
    for text in texts:
        out, sep, inp = text.rpartition(":")
        if not sep or not out or not inp:
            raise UsageError(f"--state {text!r}: expected OUTPUT:INPUT, e.g. new_state:state")
        if out not in outputs:
            raise UsageError(f"--state {text!r}: no output {out!r}; the model's outputs are {', '.join(outputs)}")
        if inp not in inputs:
            raise UsageError(f"--state {text!r}: no input {inp!r}; the model's inputs are {', '.join(inputs)}")
        pairs.append((out, inp))
    return tuple(pairs)


_OUT_WORDS = frozenset({"new", "next", "out", "present", "updated", "n"})
_IN_WORDS = frozenset({"in", "past", "prev", "previous", "old"})


def _words(name: str, drop: frozenset[str], initial: bool = False) -> tuple[str, ...]:
    words = [w for w in re.split(r"[_.:/\-]+", name.lower()) if w and w not in drop]
    if initial and words and re.fullmatch(r"[a-z]+0", words[-1]):  # h0 -> h (PyTorch's initial-state names)
        words[-1] = words[-1][:-1]
    elif initial and len(words) > 1 and words[-1] == "0":  # h_0 -> h
        words.pop()
    return tuple(words)


def detect_state(inputs: Sequence[tuple[str, int, int]], outputs: Sequence[tuple[str, int, int]]) -> StatePairs:
    """(output, input) pairs that look like state fed back, from ``(name, ONNX elem type, rank)``: the
    same type and rank, and the same name once words such as new/next/out/present and
    in/past/prev/0 are dropped (``new_state`` -> ``state``, ``h_n`` -> ``h_0``, ``present.0.key`` ->
    ``past.0.key``). Each input pairs with at most one output; ``--state`` overrides."""
    pairs, taken = [], set()
    for out, out_type, out_rank in outputs:
        key = _words(out, _OUT_WORDS)
        for inp, in_type, in_rank in inputs:
            if inp not in taken and key and (in_type, in_rank) == (out_type, out_rank) \
                    and _words(inp, _IN_WORDS, initial=True) == key and out != inp:
                pairs.append((out, inp))
                taken.add(inp)
                break
    return tuple(pairs)


def run_sequence(infer: Callable[[dict], list[np.ndarray]], output_names: Sequence[str], batches: list[dict],
                 state: StatePairs = ()) -> list[list[np.ndarray]]:
    """``infer`` on each batch in order; with ``state``, each paired input is the previous output."""
    results: list[list[np.ndarray]] = []
    for batch in batches:
        feed = dict(batch)
        if results and state:
            previous = results[-1]
            carried = {inp: np.asarray(previous[list(output_names).index(out)]) for out, inp in state}
            if all(v.shape == np.shape(feed[k]) for k, v in carried.items()):
                feed.update({k: np.ascontiguousarray(v, dtype=np.asarray(feed[k]).dtype) for k, v in carried.items()})
        results.append([np.asarray(x) for x in infer(feed)])
    return results


def judged_outputs(names: Sequence[str], state: StatePairs) -> list[int]:
    """Indices of the outputs a budget without an output of its own judges: all but the state fed back,
    whose error counts through the outputs it drives over the sequence (an LSTM's cell state has its
    own scale; a relative bound on it says little of the task). All, when nothing else is left."""
    fed = {out for out, _ in state}
    kept = [i for i, n in enumerate(names) if n not in fed]
    return kept or list(range(len(names)))


def select(batches: list[list], indices: list[int]) -> list[list]:
    return [[b[i] for i in indices] for b in batches]
