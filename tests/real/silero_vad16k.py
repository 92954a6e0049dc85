"""Silero VAD v6 (16 kHz) with the weights silero-vad 6.2.3 ships: a stateful model.

Inputs: ``chunk`` (B, 512) audio in [-1, 1], ``context`` (B, 64) the previous chunk's last samples,
``state`` (2, B, 128) the LSTM's h and c; outputs: ``prob`` (B, 1) speech probability,
``new_state`` and ``new_context``, fed back as ``state`` and ``context`` for the next chunk.

The network is the package's own PyTorch port (``silero_vad/tinygrad_model.py``: STFT as a Conv1d,
four Conv1d, an LSTMCell, a 1x1 Conv) written out here with explicit state. Its weights come from
the package's ``silero_vad.jit``, the official v6 model, loaded with ``torch.jit.load`` exactly as
the package's own ``load_silero_vad`` does (it is the installed package's file, not a download);
the package's ``.safetensors`` holds older weights that differ by up to 0.24 in probability.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

SAMPLE_RATE, CHUNK, CONTEXT = 16000, 512, 64


def package_dir() -> Path | None:
    loaded = sys.modules.get("silero_vad")  # the package once imported (the same check as the stubbed models)
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec("silero_vad")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SileroVad16k(nn.Module):
        def __init__(self):
            super().__init__()
            self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
            self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
            self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
            self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
            self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
            self.lstm_cell = nn.LSTMCell(128, 128)
            self.final_conv = nn.Conv1d(128, 1, 1)

        def forward(self, chunk, context, state):
            x = F.pad(torch.cat([context, chunk], dim=1).unsqueeze(1), (0, 64), mode="reflect")
            x = self.stft_conv(x)
            x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.relu(self.conv3(x))
            x = F.relu(self.conv4(x)).squeeze(-1)
            h, c = self.lstm_cell(x, (state[0], state[1]))
            y = torch.sigmoid(self.final_conv(F.relu(h).unsqueeze(-1))).squeeze(1).mean(dim=1, keepdim=True)
            return y, torch.stack([h, c]), chunk[:, -CONTEXT:]

    scripted = torch.jit.load(str(package_dir() / "data" / "silero_vad.jit"), map_location="cpu")
    weights = {}
    for key, value in scripted._model.state_dict().items():
        parts = key.split(".")
        if key == "stft.forward_basis_buffer":
            weights["stft_conv.weight"] = value
        elif parts[0] == "encoder":
            weights[f"conv{int(parts[1]) + 1}.{parts[-1]}"] = value
        elif parts[:2] == ["decoder", "rnn"]:
            weights[f"lstm_cell.{parts[-1]}"] = value
        elif parts[:2] == ["decoder", "decoder"]:
            weights[f"final_conv.{parts[-1]}"] = value
    net = SileroVad16k()
    net.load_state_dict(weights)
    return net.eval()


def model():
    return (module(), ["chunk:float32:[batch=1..32@8,512]", "context:float32:[batch,64]",
                       "state:float32:[2,batch,128]"], ["prob", "new_state", "new_context"])


def vowel(seconds: float, f0: float, formants, rng) -> np.ndarray:
    """A vowel: a glottal-like harmonic source with jitter through three formant resonators, 4 Hz syllables."""
    from scipy.signal import lfilter

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 4) * t))) / SAMPLE_RATE
    source = sum(np.sin(k * phase) / k for k in range(1, 40))
    out = np.zeros_like(t)
    for centre, width in formants:
        r, theta = np.exp(-np.pi * width / SAMPLE_RATE), 2 * np.pi * centre / SAMPLE_RATE
        out += lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], source)
    return out / np.abs(out).max() * 0.5 * (1 - np.cos(2 * np.pi * 4 * t))


VOWELS = (((700, 110), (1220, 120), (2600, 160)), ((300, 60), (2300, 100), (3000, 150)),
          ((500, 80), (900, 90), (2400, 150)))


def stream(seed: int, seconds: float = 4.0) -> np.ndarray:
    """Noise, speech-like vowels and pauses, as (chunks, 512)."""
    rng = np.random.default_rng(seed)
    parts = []
    while sum(p.size for p in parts) < seconds * SAMPLE_RATE:
        noise = rng.uniform(0.001, 0.02)
        parts.append(noise * rng.standard_normal(int(rng.uniform(0.3, 1.0) * SAMPLE_RATE)))
        voice = vowel(rng.uniform(0.5, 1.2), rng.uniform(90, 250), VOWELS[rng.integers(0, 3)], rng)
        parts.append(rng.uniform(0.2, 0.8) * voice + noise * rng.standard_normal(voice.size))
    audio = np.concatenate(parts)[: int(seconds * SAMPLE_RATE) // CHUNK * CHUNK]
    return np.clip(audio, -1, 1).astype(np.float32).reshape(-1, CHUNK)


def run_stream(infer, streams: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Feed (B, steps, 512) chunk by chunk with each step's state fed back: (probs (B, steps), the feeds)."""
    batch = streams.shape[0]
    context = np.zeros((batch, CONTEXT), np.float32)
    state = np.zeros((2, batch, 128), np.float32)
    probs, feeds = [], []
    for step in range(streams.shape[1]):
        feed = {"chunk": streams[:, step], "context": context, "state": state}
        feeds.append(feed)
        prob, state, context = infer(feed)
        probs.append(np.asarray(prob)[:, 0])
    return np.stack(probs, axis=1), feeds


def torch_infer(net):
    import torch

    def infer(feed):
        with torch.no_grad():
            return [t.numpy() for t in net(*(torch.from_numpy(feed[k]) for k in ("chunk", "context", "state")))]
    return infer


def calibration():
    """Each step of 8 parallel streams with the state FP32 PyTorch carries there (every fifth step held out)."""
    streams = np.stack([stream(seed) for seed in range(8)])
    _, feeds = run_stream(torch_infer(module()), streams)
    yield from feeds[::2]


def task_streams() -> np.ndarray:
    return np.stack([stream(seed) for seed in range(100, 106)])
