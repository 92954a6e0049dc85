"""ONNX's own backend cases through both FP32 pipelines: zero differences, zero pass errors.

``python tests/corpus.py`` prints the counts (ran, equal, differ, pass errors).
"""

import functools

import corpus
import pytest

SHARDS = 8


@functools.lru_cache(maxsize=1)
def _cases():
    return corpus.all_cases()


@pytest.mark.parametrize("index", range(SHARDS))
def test_peer_corpus_shard_has_no_differences_and_no_pass_errors(index):
    problems, ran = [], 0
    for case in corpus.shard(_cases(), index, SHARDS):
        outcomes = corpus.run_case(case)
        ran += any(o != "skipped" for o in outcomes.values())
        problems += [f"{t} {case.name}: {o}" for t, o in outcomes.items() if o not in ("equal", "skipped")]
    assert ran > 100  # ONNX Runtime runs most of each shard
    assert problems == []
