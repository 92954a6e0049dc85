"""Text in and out of a decoder bundle: its tokenizer (``tokenizer.json``, copied in at build) read with
the ``tokenizers`` package, which is Rust with Python bindings and no torch, so a production service can
generate from text without transformers. Optional: without it, generation takes and returns token ids.
Prompts are encoded with the tokenizer's own special tokens (Gemma's and LLaMA's start with BOS).
``Detokenizer`` turns tokens into text as they arrive, holding back what is not a whole character yet."""

from __future__ import annotations

import json
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
        config = Path(bundle) / "tokenizer_config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}
        template = Path(bundle) / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else _template(self.config.get("chat_template"))

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special``: with the tokenizer's own special tokens (BOS first), False for
        text that already holds them (a rendered chat template)."""
        return list(self._tokenizer.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def special(self, name: str) -> str:
        """A special token's text from ``tokenizer_config.json`` (``bos_token``, ``eos_token``), or ''."""
        value = self.config.get(name)
        return value.get("content", "") if isinstance(value, dict) else (value or "")


def _template(value) -> str | None:
    """tokenizer_config.json's chat template: a string, or a list of named ones (the ``default`` one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


class Detokenizer:
    """Text of tokens as they arrive (after Text Generation Inference's incremental decoding): each new
    token's text is the decoded tail of a short window minus the window's text before it, given only once it
    is whole (a token may end inside a character that the next completes, which decodes as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self._prefix = self._read = 0

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        now = self.tokenizer.decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is held back at the end (an incomplete character stays as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        now = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return now[len(before):]
