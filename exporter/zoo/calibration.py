"""Calibration and evaluation data for the zoo's INT8 builds.

Each function returns ``(calibration batches, evaluation batches)``: lists of feed dicts. The
evaluation batches are held out from calibration; the sensitivity analysis measures the
accuracy budget on them.

- ``digits_cnn``: real data. Calibration is the held-out calibration split; evaluation is taken
  from the training split (the test split stays untouched for reporting accuracy).
- text models: a bundled list of English sentences, tokenized by hashing lower-cased words into
  the vocabulary (the zoo's text models have seeded random weights, so no real vocabulary file
  exists; word frequencies and sentence lengths are still those of text). ``gpt_tiny``'s KV cache
  inputs come from running the model itself over each sentence's prefix.
- image models: synthetic smooth images (low-frequency noise, ImageNet-normalized); the zoo's
  CNNs have seeded random weights, so no natural image is more "real" to them.
- ``mlp``: standard-normal features.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from exporter.zoo.digits import digits_split

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a model is only as good as the data it was trained on",
    "deployment engineers care about latency throughput and memory",
    "she sells sea shells by the sea shore",
    "the engine was built on a machine with a different graphics card",
    "please rebuild the plan file for this version of the runtime",
    "calibration data should look like the inputs seen in production",
    "quantization maps floating point values to eight bit integers",
    "the weather today is sunny with a light breeze from the west",
    "he walked to the station and waited for the morning train",
    "our service answers thousands of requests every second",
    "the committee will meet again next tuesday to discuss the budget",
    "a small change in the input can lead to a large change in the output",
    "they planted tomatoes beans and peppers in the garden",
    "the library opens at nine and closes at six on weekdays",
    "music filled the hall as the orchestra began to play",
    "the report shows that sales grew by twelve percent last quarter",
    "children were playing football in the park after school",
    "the recipe calls for two cups of flour and a pinch of salt",
    "security updates should be installed as soon as possible",
    "the mountain trail was steep but the view from the top was worth it",
    "an accurate benchmark repeats each measurement many times",
    "the cat slept on the warm windowsill all afternoon",
    "new features will be released in the next version of the software",
    "the river flows through the valley and into the sea",
    "we compared the results against a reference implementation",
    "traffic was heavy on the highway during the holiday weekend",
    "the museum displays paintings from the seventeenth century",
    "a good test checks both the structure and the numbers",
    "the doctor recommended rest and plenty of fluids",
    "the bakery on the corner sells fresh bread every morning",
    "our team shipped the release after fixing the last bug",
    "the stars were bright in the clear night sky",
    "she read the letter twice before putting it away",
    "the printer on the third floor is out of paper again",
    "learning a new language takes patience and practice",
    "the stock market fell sharply after the announcement",
    "heavy rain caused flooding in several parts of the city",
    "the algorithm sorts the list in linear time for small integers",
    "he fixed the bicycle with a wrench and some spare parts",
)


def word_ids(sentence: str, vocab: int, reserved: int = 1000) -> list[int]:
    """Stable word -> id hashing into [reserved, vocab) (ids below ``reserved`` are special tokens)."""
    return [
        reserved + int(hashlib.sha1(w.encode()).hexdigest(), 16) % (vocab - reserved) for w in sentence.lower().split()
    ]


def _split(batches: list[dict], every: int = 5) -> tuple[list[dict], list[dict]]:
    """Every ``every``-th batch is held out for evaluation."""
    evaluation = batches[every - 1::every] or batches[-1:]
    calibration = [b for i, b in enumerate(batches) if (i + 1) % every] or batches
    return calibration, evaluation


def digits(module, batch: int = 32):
    x_cal, _ = digits_split("calib")
    x_train, _ = digits_split("train")
    calibration = [{"x": x_cal[i:i + batch]} for i in range(0, len(x_cal), batch)]
    evaluation = [{"x": x_train[i:i + 64]} for i in range(0, 512, 64)]
    return calibration, evaluation


def images(module, count: int = 160, batch: int = 4, size: int = 224, seed: int = 0, split: bool = True):
    """Smooth random images with per-image contrast and colour casts, ImageNet-normalized."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((count, 3, size // 16, size // 16)).astype(np.float32)
    smooth = np.repeat(np.repeat(low, 16, axis=2), 16, axis=3)
    detail = 0.25 * rng.standard_normal((count, 3, size, size)).astype(np.float32)
    contrast = rng.uniform(0.1, 0.35, (count, 1, 1, 1)).astype(np.float32)
    cast = rng.normal(0.0, 0.15, (count, 3, 1, 1)).astype(np.float32)
    pixels = np.clip(0.5 + cast + contrast * (smooth + detail), 0.0, 1.0)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    data = ((pixels - mean) / std).astype(np.float32)
    batches = [{"x": data[i:i + batch]} for i in range(0, count, batch)]
    return _split(batches) if split else batches


def features(module, count: int = 256, batch: int = 32, width: int = 64):
    data = np.random.default_rng(0).standard_normal((count, width)).astype(np.float32)
    return _split([{"x": data[i:i + batch]} for i in range(0, count, batch)])


def bert_sentences(module, batch: int = 4, vocab: int = 30522, cls: int = 101, sep: int = 102):
    batches = []
    for i in range(0, len(SENTENCES), batch):
        rows = [[cls, *word_ids(s, vocab), sep] for s in SENTENCES[i:i + batch]]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for j, row in enumerate(rows):
            ids[j, :len(row)], mask[j, :len(row)] = row, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return _split(batches)


def gpt_sentences(module, vocab: int = 1024, prefix: int = 4, step: int = 4):
    """Feeds that continue each sentence after its first ``prefix`` words, with the real KV cache."""
    batches = []
    for sentence in SENTENCES:
        ids = [i % vocab for i in word_ids(sentence, vocab, reserved=16)]
        if len(ids) < prefix + 1:
            continue
        head = torch.tensor([ids[:prefix]])
        empty = [torch.zeros(1, 4, 0, 32) for _ in range(2 * module.depth)]
        with torch.no_grad():
            _, *past = module(head, *empty)
        tail = np.array([ids[prefix:prefix + step]], np.int64)
        feed = {"input_ids": tail}
        for i in range(module.depth):
            feed[f"past_key_{i}"] = past[2 * i].numpy()
            feed[f"past_value_{i}"] = past[2 * i + 1].numpy()
        batches.append(feed)
    return _split(batches)
