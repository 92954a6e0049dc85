"""The bundles a server holds: a decoder behind the continuous-batching ``GenerationServer`` (served as
OpenAI's ``/v1``), any other bundle behind the dynamic-batching ``Scheduler`` (served as the Open Inference
Protocol's ``/v2``). Each is named by its directory (``--name`` style ``NAME=PATH`` overrides it)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from engines.bundle import read_manifest
from engines.runtime import Batching, ContinuousBatching, GenerationServer, Scheduler, load, schedule
from engines.runtime.generate.text import Tokenizer
from foundation.errors import UsageError


@dataclasses.dataclass
class Served:
    name: str
    path: Path
    generation: GenerationServer | None = None  # a decoder
    tokenizer: Tokenizer | None = None
    scheduler: Scheduler | None = None  # anything else
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def decoder(self) -> bool:
        return self.generation is not None

    def close(self, drain: bool = True) -> None:
        for part in (self.generation, self.scheduler):
            if part is not None:
                part.close(drain)


def parse(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named by its directory)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return Path(spec).resolve().name, Path(spec)


def open_models(specs: list[str], generation: ContinuousBatching, batching: Batching,
                threads: int | None = None, backend: str = "auto") -> dict[str, Served]:
    """Loads every bundle (all or none: what loaded is closed when one fails)."""
    served: dict[str, Served] = {}
    try:
        for spec in specs:
            name, path = parse(spec)
            if name in served:
                raise UsageError(f"two bundles are named {name!r}: name them apart with NAME=PATH")
            manifest = read_manifest(path)
            if manifest.decoder is not None:
                tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
                server = load(path, backend="ort-cpu" if backend == "auto" else backend, threads=threads,
                              batching=generation)
                served[name] = Served(name, path, generation=server, tokenizer=tokenizer)
            else:
                served[name] = Served(name, path, scheduler=schedule(path, batching, backend=backend,
                                                                      threads=threads))
    except BaseException:
        for model in served.values():
            model.close(drain=False)
        raise
    return served
