"""An opt-in response cache for the serving layer (``engines.runtime.scheduler``), after Triton's: the key
hashes the bundle's model sha256 and every input's name, dtype, shape and bytes (BLAKE2b from the
standard library: well kept, fast, no dependency); entries are kept least-recently-used first out,
bounded in bytes. Hits return copies, so a caller cannot alter what the cache holds; what is stored
is a copy too. Unsafe for models with randomness or state (their outputs are not a function of the
inputs): leave it off for those.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Mapping

import numpy as np


class ResponseCache:
    def __init__(self, max_bytes: int, model_sha256: str = ""):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes, self.model = int(max_bytes), model_sha256
        self._entries: collections.OrderedDict[bytes, dict[str, np.ndarray]] = collections.OrderedDict()
        self._sizes: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def key(self, feeds: Mapping[str, np.ndarray]) -> bytes:
        h = hashlib.blake2b(self.model.encode(), digest_size=32)
        for name in sorted(feeds):
            array = np.ascontiguousarray(feeds[name])
            h.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            h.update(memoryview(array).cast("B") if array.size else b"")
        return h.digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return {k: v.copy() for k, v in entry.items()}

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> None:
        stored = {k: np.array(v, copy=True) for k, v in outputs.items()}
        size = sum(v.nbytes for v in stored.values()) + len(key)
        if size > self.max_bytes:
            return  # larger than the whole cache: never stored
        with self._lock:
            if key in self._entries:
                return
            self._entries[key], self._sizes[key] = stored, size
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, _ = self._entries.popitem(last=False)
                self.bytes -= self._sizes.pop(old)
                self.evictions += 1

    def stats(self) -> dict:
        with self._lock:
            lookups = self.hits + self.misses
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_ratio": self.hits / lookups if lookups else 0.0}
