"""Files: sha256 of a file, writing one atomically, reading batches of arrays (NumPy, imported there)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from foundation.errors import UsageError


def sha256_file(path: Path, digest=None):
    """``digest`` (a new sha256 when None) updated with the file's bytes, read in 1 MiB blocks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def sha256_source(path: Path) -> str:
    """The sha256 of a model source: a file's bytes, or a directory's files (not its subdirectories) in name
    order, so a Hugging Face directory hashes the same wherever it lies."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        sha256_file(file, digest)
    return digest.hexdigest()


def write_atomic(path: Path, content: bytes) -> None:
    """``content`` at ``path`` via a temporary sibling and a rename: readers see the old file or the new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_batches(path: Path, input_names: list[str], with_files: bool = False) -> list:
    """Batches from ``path``: an ``.npz`` file (arrays keyed by input name), an ``.npy`` file (a single-input
    model), or a directory of them, one batch per file in name order. Shared by ``--calib DIR`` and
    ``compare --data``; a ``UsageError`` says what was expected. ``with_files``: (file, batch) pairs."""
    import numpy as np  # noqa: PLC0415 - the standard library is enough for the rest of this module

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    if not path.exists():
        raise UsageError(f"{path} does not exist; expected an .npz/.npy file or a directory of them")
    if not files:
        raise UsageError(f"{path} holds no .npz or .npy files; expected one batch per file")
    batches = []
    for file in files:
        try:
            if file.suffix == ".npy":
                if len(input_names) != 1:
                    raise UsageError(f"{file}: a .npy file holds one array, but the model takes {len(input_names)} "
                                     f"inputs ({', '.join(input_names)}); use .npz files keyed by input name")
                batch = {input_names[0]: np.load(file, allow_pickle=False)}
            else:
                with np.load(file, allow_pickle=False) as data:
                    batch = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{file} is not a readable NumPy file ({exc}); save batches with numpy.savez(path, "
                             "name=array, ...) or numpy.save") from exc
        batches.append((file, batch) if with_files else batch)
    return batches
