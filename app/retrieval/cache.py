"""`QueryCache`: an LRU of query embeddings shared by every dense stage of a process.

Keyed by (encoder name, runtime, normalisation, text with whitespace collapsed), so a cached vector is
exactly what the same encoder would return for that text; a reload to a build with another model misses
by construction. Thread-safe; `hits` and `misses` count lookups for `/metrics`.

Queries' token vectors (MaxSim's query side, from the same forward pass as the pooled vector:
`app.retrieval.queries`) are kept beside them in a smaller LRU (`token_size` entries: a query's tokens take
~30× its vector's memory), also when the vector cache is off (`size` 0): they only need to outlive one
request, from its first stage to its second.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

Key = tuple[Hashable, ...]  # the encoder's: (model, runtime, normalisation)
TextKey = tuple[Key, str]  # an entry's: (the encoder's key, the text normalised)


def normalise_query(text: str) -> str:
    """Whitespace collapsed and trimmed: the only normalisation that cannot change the encoder's tokens."""
    return " ".join(text.split())


class QueryCache:
    def __init__(self, size: int = 4096, token_size: int = 256) -> None:
        self.size = size
        self.token_size = token_size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[TextKey, np.ndarray] = OrderedDict()
        self._tokens: OrderedDict[TextKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def encode(self, key: Key, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors for `texts` (rows in order): cached rows reused, the rest computed by one `encode` call on
        the distinct missing texts and stored. Returned rows are copies: callers cannot alter the cache."""
        if self.size <= 0:
            return encode(list(texts))
        keys = [(key, normalise_query(t)) for t in texts]
        found: dict[TextKey, np.ndarray] = {}
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
            vectors = encode([k[1] for k in missing])
            with self._lock:
                for k, vector in zip(missing, vectors):
                    found[k] = self._items[k] = np.array(vector, dtype=np.float32)
                    self._items.move_to_end(k)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return np.stack([found[k] for k in keys])  # a new array: callers cannot alter the cached rows

    def encode_both(
        self,
        key: Key,
        texts: Sequence[str],
        encode_both: Callable[[list[str]], tuple[np.ndarray, list[np.ndarray]]],
        vectors: bool = True,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Vectors and token vectors for `texts` (in order), computed together by one `encode_both` call on
        the distinct texts the cache cannot answer, and both stored.

        `vectors=True` (the first stage's lookup, counted as hits and misses): a text is answered when both
        are held. `vectors=False` (the second stage reading the query tokens its first stage just stored;
        not counted): when its tokens are held, and only tokens are returned (an empty vector array).
        Token vectors are kept even when `size` is 0 (the vector cache off): they only hand a request's
        pass from its first stage to its second. Token arrays are read-only; vector rows are copies."""
        if not texts:
            return encode_both([])
        keys = [(key, normalise_query(t)) for t in texts]
        found_vectors: dict[TextKey, np.ndarray] = {}
        found_tokens: dict[TextKey, np.ndarray] = {}
        with self._lock:
            for k in keys:
                vector, token = self._items.get(k), self._tokens.get(k)
                if token is not None and (vector is not None or not vectors):
                    self._tokens.move_to_end(k)
                    found_tokens[k] = token
                    if vector is not None:
                        self._items.move_to_end(k)
                        found_vectors[k] = vector
            if vectors:
                self.hits += sum(1 for k in keys if k in found_tokens)
                self.misses += sum(1 for k in keys if k not in found_tokens)
        missing = list(dict.fromkeys(k for k in keys if k not in found_tokens))
        if missing:
            new_vectors, new_tokens = encode_both([k[1] for k in missing])
            with self._lock:
                for k, vector, token in zip(missing, new_vectors, new_tokens):
                    token = np.array(token, dtype=np.float32)
                    token.flags.writeable = False
                    found_vectors[k], found_tokens[k] = np.array(vector, dtype=np.float32), token
                    if self.size > 0:
                        self._items[k] = found_vectors[k]
                        self._items.move_to_end(k)
                    if self.token_size > 0:
                        self._tokens[k] = token
                        self._tokens.move_to_end(k)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                while len(self._tokens) > self.token_size:
                    self._tokens.popitem(last=False)
        tokens = [found_tokens[k] for k in keys]
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32), tokens
        return np.stack([found_vectors[k] for k in keys]), tokens  # new rows: callers cannot alter the cache
