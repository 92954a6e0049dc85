"""``digits_cnn``: a small CNN trained at first use on scikit-learn's bundled 8x8 digits.

The 1,797 images are split once with a fixed seed into train (70%), calibration (10%, the
held-out split INT8 calibration uses) and test (20%, where accuracy is measured). Training takes
a few seconds on a CPU; the weights are cached (``torch.save`` of tensors only, read back with
``weights_only=True``) and retrained when the cache is missing or unreadable.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

CACHE_NAME = "digits_cnn-v1.pt"
SPLITS = ("train", "calib", "test")


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 8, 8] scaled to 0..1, labels as int64 [N]."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only needed for this model

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = load_digits()
    order = np.random.default_rng(20261121).permutation(len(data.target))
    n_train, n_calib = int(0.7 * len(order)), int(0.1 * len(order))
    bounds = {"train": (0, n_train), "calib": (n_train, n_train + n_calib), "test": (n_train + n_calib, len(order))}
    lo, hi = bounds[split]
    idx = order[lo:hi]
    images = (data.images[idx] / 16.0).astype(np.float32)[:, None]
    return images, data.target[idx].astype(np.int64)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def accuracy(model: nn.Module, split: str = "test") -> float:
    """The PyTorch model's accuracy on ``split``."""
    images, _ = digits_split(split)
    with torch.no_grad():
        return logits_accuracy(model(torch.from_numpy(images)).numpy(), split)


def logits_accuracy(logits: np.ndarray, split: str = "test") -> float:
    """Accuracy of class scores for the images of ``split``, in order (any runner's outputs)."""
    _, labels = digits_split(split)
    return float((np.asarray(logits).argmax(1) == labels).mean())


def train(epochs: int = 25, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    images, labels = digits_split("train")
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def load_or_train(cache_dir: Path) -> DigitsCNN:
    path = Path(cache_dir) / CACHE_NAME
    model = DigitsCNN()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception as exc:  # noqa: BLE001 - a bad cache is retrained, never trusted
            logger.warning("digits_cnn cache %s is unreadable (%s); retraining", path, exc)
    logger.info("training digits_cnn on scikit-learn digits (first use; cached in %s)", path.parent)
    model = train()
    logger.info("digits_cnn test accuracy %.4f", accuracy(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digits-", suffix=".pt")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model
