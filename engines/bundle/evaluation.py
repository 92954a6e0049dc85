"""evaluation.npz: the held-out batches an INT8 build measured its budget on, kept in the bundle so
``planforge compare`` repeats the build's verdict on any model (keys ``"<batch>/<input>"``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.npz"
MAX_EVALUATION_BYTES = 32 * 2**20  # larger held-out sets stay out of the bundle


def save_evaluation(path: Path, batches: list[dict]) -> bool:
    """The held-out batches the budget is measured on, for ``planforge compare`` (keys ``"<batch>/<input>"``);
    not written when larger than ``MAX_EVALUATION_BYTES`` (compare then needs --data)."""
    size = sum(v.nbytes for b in batches for v in b.values())
    if size > MAX_EVALUATION_BYTES:
        logger.warning("INT8: the %d held-out batches take %.0f MiB, over the %d MiB kept in the bundle; compare "
                       "will need --data to repeat the build's verdict", len(batches), size / 2**20,
                       MAX_EVALUATION_BYTES // 2**20)
        return False
    np.savez(path, **{f"{i}/{name}": value for i, batch in enumerate(batches) for name, value in batch.items()})
    return True


def load_evaluation(path: Path) -> list[dict]:
    """``save_evaluation``'s batches back, in order."""
    with np.load(path, allow_pickle=False) as data:
        batches: dict[int, dict] = {}
        for key in data.files:
            index, _, name = key.partition("/")
            batches.setdefault(int(index), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]
