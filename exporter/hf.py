"""Local Hugging Face model directories (``config.json`` plus weights), offline only.

Needs the optional ``transformers`` package (``pip install 'planforge[hf]'``). Nothing is ever
downloaded: hub access is switched off before ``transformers`` is imported, and weights load
with ``local_files_only=True`` (safetensors, or torch checkpoints through transformers'
``weights_only`` loading).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from exporter.resolved import ResolvedModel
from foundation.errors import ExportError, UsageError
from foundation.files import sha256_source
from foundation.spec import InputSpec

OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class EncoderOutputs(torch.nn.Module):
    """Calls a Hugging Face encoder with (input_ids, attention_mask) and returns plain tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


@contextlib.contextmanager
def offline_and_quiet():
    """Hub access off and transformers quiet while a local directory loads, then as they were: the
    environment variables and transformers' verbosity and progress bar are process-wide state.
    (huggingface_hub reads HF_HUB_OFFLINE once, when first imported; ``local_files_only=True`` below
    keeps later loads offline whatever it read.)"""
    saved = {k: os.environ.get(k) for k in OFFLINE}
    for key in OFFLINE:
        os.environ.setdefault(key, "1")
    try:
        import transformers  # noqa: PLC0415 - optional extra, imported only for a Hugging Face directory
    except ImportError as exc:
        _restore(saved)
        raise UsageError("this is a Hugging Face model directory, but transformers is not installed; "
                         "install the optional extra: pip install 'planforge[hf]'") from exc
    hf_logging = transformers.utils.logging
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # only the CLI draws progress
    hf_logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def resolve_hf_dir(path: Path):
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
    try:
        with offline_and_quiet() as transformers, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # weights the checkpoint lacks (a pooler) initialise alike at build and compare
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        raise ExportError(f"transformers could not load {path}: {type(exc).__name__}: {exc}") from exc
    vocab = int(getattr(config, "vocab_size", 30522))
    max_len = min(int(getattr(config, "max_position_embeddings", 512)), 128)
    spec = InputSpec.parse([
        f"input_ids:int64:[batch=1..8@2,seq=1..{max_len}@16]:0..{vocab}",
        "attention_mask:int64:[batch,seq]:0..2",  # the valid range (the runtime checks it), as the zoo writes it
    ])
    return ResolvedModel(path.name, "hf", str(path.resolve()), spec, ("last_hidden_state",), sha256_source(path),
                         "embedding", EncoderOutputs(model).eval())


def load_tokenizer(path: Path):
    """The tokenizer a local Hugging Face directory ships (offline), or a UsageError saying it has none."""
    try:
        with offline_and_quiet() as transformers:
            return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{path} has no tokenizer transformers can load ({type(exc).__name__}: {exc}); "
                         "real text needs the model directory's tokenizer files") from exc
