"""Real English prose that needs no download: sentences from the docstrings of Python's standard library.

Used where a transformer needs realistic token-length distributions (the transformer benchmark, the
real-model tests): 6 to 40 words each, most of them far shorter than 128 tokens once tokenized.
"""

from __future__ import annotations

import importlib
import inspect
import re

MODULES = ("argparse", "json", "logging", "collections", "itertools", "functools", "pathlib", "subprocess",
           "threading", "asyncio", "csv", "datetime", "decimal", "fractions", "random", "statistics", "string",
           "textwrap", "email", "unittest", "http.client", "zipfile", "tarfile", "sqlite3", "socket", "shutil",
           "tempfile", "heapq", "bisect", "contextlib", "dataclasses", "enum", "typing", "pickle", "hashlib")


def sentences() -> list[str]:
    """Unique sentences of 6 to 40 words from docstrings of the standard library and its classes, in a
    fixed order."""
    found: dict[str, None] = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(obj) or "" for _, obj in sorted(vars(mod).items())
                                              if inspect.isclass(obj) or inspect.isfunction(obj)]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and not re.search(r"[>{}\[\]|=]", sentence):
                    found.setdefault(sentence, None)
    return list(found)
