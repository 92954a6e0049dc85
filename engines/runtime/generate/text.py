"""Text in and out of a decoder bundle: its tokenizer (``tokenizer.json``, copied in at build) read with
the ``tokenizers`` package, which is Rust with Python bindings and no torch, so a production service can
generate from text without transformers. Optional: without it, generation takes and returns token ids.
Prompts are encoded with the tokenizer's own special tokens (Gemma's and LLaMA's start with BOS)."""

from __future__ import annotations

from pathlib import Path

from foundation.errors import UsageError


class Tokenizer:
    """Encodes prompts to ids and decodes ids to text with a bundle's ``tokenizer.json``."""

    def __init__(self, bundle: Path):
        path = Path(bundle) / "tokenizer.json"
        if not path.is_file():
            raise UsageError(f"{bundle} has no tokenizer.json: pass token ids, or rebuild the bundle from a model "
                             "directory or GGUF file that has a tokenizer")
        try:
            from tokenizers import Tokenizer as Fast  # noqa: PLC0415 - optional: text prompts only
        except ImportError as exc:
            raise UsageError("text prompts need the tokenizers package (pip install tokenizers); or pass token "
                             "ids") from exc
        self._tokenizer = Fast.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
