"""`QueryCache`: an LRU of query embeddings shared by every dense stage of a process.

Keyed by (encoder name, runtime, normalisation, text with whitespace collapsed), so a cached vector is
exactly what the same encoder would return for that text; a reload to a build with another model misses
by construction. Thread-safe; `hits` and `misses` count lookups for `/metrics`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np


def normalise_query(text: str) -> str:
    """Whitespace collapsed and trimmed: the only normalisation that cannot change the encoder's tokens."""
    return " ".join(text.split())


class QueryCache:
    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def encode(self, key: tuple, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors for `texts` (rows in order): cached rows reused, the rest computed by one `encode` call on
        the distinct missing texts and stored. Returned rows are copies: callers cannot alter the cache."""
        if self.size <= 0:
            return encode(list(texts))
        keys = [(*key, normalise_query(t)) for t in texts]
        found: dict[tuple, np.ndarray] = {}
        with self._lock:
            for k in keys:
                vector = self._items.get(k)
                if vector is not None:
                    self._items.move_to_end(k)
                    found[k] = vector
            self.hits += sum(1 for k in keys if k in found)
            self.misses += sum(1 for k in keys if k not in found)
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            vectors = encode([k[-1] for k in missing])
            with self._lock:
                for k, vector in zip(missing, vectors):
                    found[k] = self._items[k] = np.array(vector, dtype=np.float32)
                    self._items.move_to_end(k)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return np.stack([found[k] for k in keys])  # a new array: callers cannot alter the cached rows
