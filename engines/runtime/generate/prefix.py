"""The prefix cache: keys and values of prompt prefixes already computed, reused by later prompts that start
the same way (a shared system prompt, a few-shot preamble, a conversation's earlier turns).

As vLLM's automatic prefix caching: a prompt is cut into fixed-size blocks of ``block`` tokens, and each full
block is keyed by a hash of its tokens chained to its parent's key, so a key names the whole prefix up to
the block's end (the keys and values at a position depend on every token before it). A lookup walks the
prompt's chain from the first block and stops at the first block not held; at most ``(len - 1) // block``
blocks are used, so at least one token is computed and gives the first new token's logits. Held blocks are
bounded in bytes and evicted least recently used; a lookup touches the blocks it uses from the last to the
first, so a parent is always more recent than its children and the leaves of a chain go first (an evicted
parent would make its children unreachable while they still held memory).

Each entry is a copy: ``[past tensors, kv_heads, block, head_dim]`` float32, taken from a sequence's cache
after its prefill and copied into a new sequence's cache before its prefill (a 512-token prefix of Gemma 3
270M is 9.4 MB, copied in milliseconds; computing it takes a second on two cores).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Sequence

import numpy as np


class PrefixCache:
    """Blocks of keys and values by chained token hash, LRU within ``capacity`` bytes (module docstring)."""

    def __init__(self, capacity: int, block: int = 32):
        if block < 1:
            raise ValueError(f"prefix block of {block} tokens: expected at least 1")
        self.capacity, self.block = int(capacity), int(block)
        self._blocks: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.lookups = self.hits = self.hit_tokens = self.evicted = 0

    def keys(self, tokens: Sequence[int], blocks: int) -> list[bytes]:
        """The chained keys of the first ``blocks`` full blocks of ``tokens``."""
        out, parent = [], b""
        ids = np.asarray(tokens, np.int64)
        for k in range(blocks):
            parent = hashlib.blake2b(parent + ids[k * self.block:(k + 1) * self.block].tobytes(),
                                     digest_size=16).digest()
            out.append(parent)
        return out

    def lookup(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """The held blocks that start ``tokens``, in order (leaving at least one token to compute)."""
        usable = (len(tokens) - 1) // self.block
        found = []
        with self._lock:
            self.lookups += 1
            for key in self.keys(tokens, usable):
                entry = self._blocks.get(key)
                if entry is None:
                    break
                found.append((key, entry))
            for key, _ in reversed(found):  # leaves first, the root last: the root is the most recent
                self._blocks.move_to_end(key)
            self.hits += bool(found)
            self.hit_tokens += len(found) * self.block
        return [entry for _, entry in found]

    def insert(self, tokens: Sequence[int], read) -> int:
        """Holds the full blocks of ``tokens`` not held yet; ``read(start, stop)`` gives the keys and values of
        positions ``start:stop`` as one ``[past tensors, kv_heads, stop - start, head_dim]`` array. Returns
        the number of blocks added (none when a block is larger than the whole capacity)."""
        added = 0
        keys = self.keys(tokens, len(tokens) // self.block)
        for k, key in enumerate(keys):
            with self._lock:
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                    continue
            entry = np.array(read(k * self.block, (k + 1) * self.block), dtype=np.float32, copy=True)
            if entry.nbytes > self.capacity:
                return added
            with self._lock:
                if key in self._blocks:
                    continue
                while self.bytes + entry.nbytes > self.capacity and self._blocks:
                    _, old = self._blocks.popitem(last=False)
                    self.bytes -= old.nbytes
                    self.evicted += 1
                self._blocks[key] = entry
                self.bytes += entry.nbytes
                added += 1
        with self._lock:  # as a lookup leaves them: the root the most recent, the leaves first to go
            for key in reversed(keys):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
        return added

    def stats(self) -> dict:
        with self._lock:
            return {"blocks": len(self._blocks), "bytes": self.bytes, "capacity": self.capacity,
                    "block_tokens": self.block, "lookups": self.lookups, "hits": self.hits,
                    "hit_tokens": self.hit_tokens, "evicted": self.evicted}
