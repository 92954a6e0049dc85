"""MTCNN's output network (ONet) with the weights facenet-pytorch 2.6.0 ships (``data/onet.pt``).

Input: 48x48 RGB face candidates scaled as (x - 127.5) / 128; outputs: box regression (4 offsets),
5 facial landmarks (10 coordinates relative to the crop) and face / non-face probabilities. A CNN
whose main outputs are coordinates. facenet-pytorch pins torch 2.2 and imports torchvision, so it is
installed without dependencies and only its ``models/mtcnn.py`` is loaded, with the detector utils
stubbed out (they need torchvision's nms, not the networks).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def package_dir() -> Path | None:
    loaded = sys.modules.get("facenet_pytorch")  # a stub of ours once module() ran: its __spec__ is None
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec("facenet_pytorch")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def module():
    import torch

    root = package_dir()
    for name, path in (("facenet_pytorch", root), ("facenet_pytorch.models", root / "models"),
                       ("facenet_pytorch.models.utils", root / "models" / "utils")):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
    detect = types.ModuleType("facenet_pytorch.models.utils.detect_face")
    detect.detect_face = detect.extract_face = None
    sys.modules.setdefault(detect.__name__, detect)
    mtcnn = importlib.import_module("facenet_pytorch.models.mtcnn")
    net = mtcnn.ONet(pretrained=False)
    net.load_state_dict(torch.load(root / "data" / "onet.pt", map_location="cpu", weights_only=True))
    return net.eval()


def model():
    return module(), ["img:float32:[batch=1..64@16,3,48,48]"], ["box", "landmarks", "prob"]


def _prep(pixels: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB (any size) -> 1x3x48x48, MTCNN's scaling."""
    from PIL import Image

    small = np.asarray(Image.fromarray(pixels).resize((48, 48), Image.BILINEAR), np.float32)
    return ((small.transpose(2, 0, 1)[None] - 127.5) * 0.0078125).astype(np.float32)


def candidates(seed: int, count: int) -> np.ndarray:
    """Face candidates as a detector's earlier stages give them: the astronaut's face (scikit-image's
    sample photo) with jittered boxes and scales, and LFW faces and non-faces (scikit-image's subset)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photo = data.astronaut()
    lfw = data.lfw_subset()  # 200 grey 25x25 images: the first 100 faces, the rest not
    out = []
    for i in range(count):
        if i % 2 == 0:
            size = rng.uniform(80, 130)
            cx, cy = 217 + rng.uniform(-15, 15), 117 + rng.uniform(-15, 15)
            x0, y0 = int(max(cx - size / 2, 0)), int(max(cy - size / 2, 0))
            crop = photo[y0:y0 + int(size), x0:x0 + int(size)]
        else:
            grey = (lfw[rng.integers(0, 200)] * 255).astype(np.uint8)
            crop = np.repeat(grey[..., None], 3, axis=2)
        out.append(_prep(np.ascontiguousarray(crop)))
    return np.concatenate(out)


def calibration():
    """30 batches of 16 candidates (every fifth held out by planforge)."""
    for i in range(30):
        yield {"img": candidates(seed=i, count=16)}


def task_set() -> np.ndarray:
    return candidates(seed=1000, count=64)
