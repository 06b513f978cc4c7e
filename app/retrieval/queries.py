"""Query encoding on the serving path: one bi-encoder forward pass gives a query's pooled vector (dense
retrieval) and its token vectors (MaxSim), and both are kept in the process's `QueryCache`.

    QueryEncoder.encode(queries)         pooled vectors, normalised as the passages were
    QueryEncoder.query_tokens(queries)   unit token vectors (MaxSim's query side)
    QueryEncoder.passage_tokens(texts)   unit token vectors of arbitrary texts (re-encoded MaxSim candidates)
    QueryEncoder.embed(texts)            pooled vectors and token count (`/v1/embeddings`)

Invariants:
- With `tokens=True` (the composition root sets it when the second stage runs MaxSim), `encode` runs one
  forward pass per uncached query that yields both outputs and caches both; the second stage's
  `query_tokens` for the same query reads them back, not a second encode (also with the vector cache off:
  `QueryCache` keeps recent queries' token vectors whatever its size). Without any `QueryCache` (an encoder
  built outside a server), `query_tokens` encodes again.
- What `encode` and `query_tokens` return equals what two separate passes over the same texts give
  (same tokens, same padding, same model), so rankings do not depend on the one-pass path.
- Cached arrays are never handed out writeable: callers cannot alter the cache.

`DirectEncoder` runs an ONNX bi-encoder without torch or a lock (the default query runtime); any other
encoder runs through its sentence-transformers wrapper under the model's one lock (`model_lock`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from app.retrieval.cache import QueryCache
from app.retrieval.protocols import BiEncoder
from indexer.encoders import model_lock, unit_rows
from indexer.runtime import _OnnxModuleMixin
from indexer.tokens import unit_tokens

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Encoding
    from torch import Tensor


def padded(encodings: Sequence[Encoding], pad_id: int, pad_type_id: int = 0) -> tuple[np.ndarray, ...]:
    """Rust-tokenizer encodings as right-padded int64 arrays: (input ids, token type ids, attention mask),
    as long as the longest encoding (the direct paths' stand-in for a tokenizer's `padding=True`)."""
    longest = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), longest), pad_id, dtype=np.int64)
    types = np.full((len(encodings), longest), pad_type_id, dtype=np.int64)
    mask = np.zeros((len(encodings), longest), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        ids[row, :n], types[row, :n], mask[row, :n] = encoding.ids, encoding.type_ids, 1
    return ids, types, mask


class DirectEncoder:
    """A sentence-transformers bi-encoder on an ONNX runtime, run as Rust tokenizer → ONNX Runtime → pooling
    in numpy: no torch, no Python-side batching and no lock on the query path (the tokenizer copy is
    configured once and only read afterwards; ONNX Runtime sessions are thread-safe). Gives the vectors
    `wrapper.encode` gives (tests: cosine ≥ 0.9999), before normalisation.

    `DirectEncoder.of(wrapper)` is None unless the wrapper is exactly Transformer → Pooling (mean or cls) →
    optional Normalize, on an ONNX runtime, without a default prompt or lower-casing: anything else keeps
    the wrapper's own path."""

    def __init__(self, wrapper: SentenceTransformer) -> None:  # one that `of` accepts
        from tokenizers import Tokenizer

        # sentence-transformers' Transformer and Pooling modules, read by attribute (what `of` checked)
        transformer: Any = wrapper[0]
        pooling: Any = wrapper[1]
        model = transformer.model
        if not isinstance(model, _OnnxModuleMixin):
            raise TypeError("DirectEncoder runs a bi-encoder on an ONNX runtime only (see `DirectEncoder.of`)")
        self.model = model
        self.pooling: str = pooling.pooling_mode
        self.tokenizer = Tokenizer.from_str(wrapper.tokenizer.backend_tokenizer.to_str())
        self.tokenizer.enable_truncation(int(transformer.max_seq_length))
        self.tokenizer.no_padding()
        self.pad_id = int(wrapper.tokenizer.pad_token_id or 0)

    @classmethod
    def of(cls, wrapper: SentenceTransformer) -> DirectEncoder | None:
        try:
            modules = list(wrapper)
            names = [type(m).__name__ for m in modules]
            ok = (
                names[:2] == ["Transformer", "Pooling"]
                and names[2:] in ([], ["Normalize"])
                and isinstance(modules[0].model, _OnnxModuleMixin)
                and getattr(modules[1], "pooling_mode", None) in ("mean", "cls")
                and not getattr(modules[0], "do_lower_case", False)
                and not getattr(wrapper, "default_prompt_name", None)
                and hasattr(wrapper.tokenizer, "backend_tokenizer")
            )
        except (TypeError, IndexError, AttributeError):
            return None
        return cls(wrapper) if ok else None

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Pooled float32 vectors for `texts`, in order, not normalised (batches of similar lengths)."""
        return self.both(texts, batch_size, tokens=False)[0]

    def tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's token vectors (tokens × hidden, padding excluded, not normalised), in order: what
        `wrapper.encode(..., output_value="token_embeddings")` gives."""
        encodings = self.tokenizer.encode_batch(list(texts))
        if not encodings:
            return []
        hidden, _ = self._hidden(encodings)
        return [np.asarray(hidden[row, : len(e.ids)], dtype=np.float32) for row, e in enumerate(encodings)]

    def both(
        self, texts: Sequence[str], batch_size: int = 32, tokens: bool = True
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled vectors (as `encode`) and, with `tokens`, token vectors (as `tokens`) from one forward pass
        per batch; batches as `encode` makes them, so the pooled rows equal `encode`'s."""
        encodings = self.tokenizer.encode_batch(list(texts))
        pooled = np.empty((len(encodings), self.model.config.hidden_size), dtype=np.float32)
        out: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(encodings)
        if len(encodings) <= batch_size:
            batches = [list(range(len(encodings)))] if encodings else []
        else:
            order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
            batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        for rows in batches:
            batch = [encodings[i] for i in rows]
            hidden, mask = self._hidden(batch)
            pooled[rows] = self._pool(hidden, mask)
            if tokens:
                for row, i in enumerate(rows):
                    out[i] = np.asarray(hidden[row, : len(encodings[i].ids)], dtype=np.float32)
        return pooled, out if tokens else []

    def _hidden(self, encodings: list[Encoding]) -> tuple[np.ndarray, np.ndarray]:
        ids, _, mask = padded(encodings, self.pad_id)
        return self.model.run({"input_ids": ids, "attention_mask": mask})[0], mask

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return np.ascontiguousarray(hidden[:, 0], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        pooled: np.ndarray = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled


class QueryEncoder(BiEncoder):
    """The serving path's encoder of one bi-encoder model (see the module's invariants). Thread-safe."""

    def __init__(
        self,
        encoder: SentenceTransformer,
        model: str,
        normalize: bool,
        cache: QueryCache | None = None,
        tokens: bool = False,
    ) -> None:
        self._encoder = encoder
        self.normalize = normalize
        self.cache = cache
        self.tokens = tokens
        self._runtime: str = getattr(encoder, "sift_runtime", "torch")
        self._key = (model, self._runtime, normalize)
        self._lock = model_lock(encoder)  # shared with every stage using this model
        self._direct = DirectEncoder.of(encoder)  # ONNX: the lock-free numpy path

    @property
    def encoder(self) -> SentenceTransformer:
        return self._encoder

    @property
    def runtime(self) -> str:
        return self._runtime

    @property
    def dimension(self) -> int:
        encoder = self.encoder
        if hasattr(encoder, "get_embedding_dimension"):
            dimension = encoder.get_embedding_dimension()
        else:  # sentence-transformers before 5.x
            dimension = encoder.get_sentence_embedding_dimension()
        if dimension is None:
            raise ValueError("the bi-encoder does not report the dimension of its vectors")
        return int(dimension)

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors, normalised as the passages were (from the cache when one is set). With `tokens`,
        the same pass yields the queries' token vectors, cached for `query_tokens`."""
        if self.tokens:
            return self._both(queries, vectors=True)[0]
        if self.cache is not None:
            return self.cache.encode(self._key, queries, self._pooled)
        return self._pooled(queries)

    def query_tokens(self, queries: list[str]) -> list[np.ndarray]:
        """Each query's unit token vectors (MaxSim's query side); read back from the cache after `encode` of
        the same queries when `tokens` is on (not counted as a lookup: `encode` counted it)."""
        return self._both(queries, vectors=False)[1]

    def passage_tokens(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's unit token vectors (what a bundle's token store holds for passages), never cached."""
        if self._direct is not None:
            tokens = self._direct.tokens(texts)
        else:
            with self._lock:
                out = self.encoder.encode(
                    texts, batch_size=32, output_value="token_embeddings", show_progress_bar=False
                )
            tokens = [t.float().cpu().numpy() for t in out]
        return [unit_tokens(t) for t in tokens]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for arbitrary texts (as `encode`, never cached) and their token count. The tokenizer is not
        thread-safe, so counting happens under the model's lock."""
        with self._lock:
            tokens = sum(len(ids) for ids in self.encoder.tokenizer(texts)["input_ids"])
        return self._pooled(texts), int(tokens)

    # -- one forward pass ---------------------------------------------------------------------------------

    def _both(self, queries: list[str], vectors: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.cache is not None:
            return self.cache.encode_both(self._key, queries, self._encode_both, vectors=vectors)
        return self._encode_both(queries)

    def _pooled(self, texts: list[str]) -> np.ndarray:
        if self._direct is not None:
            vectors = self._direct.encode(texts)
        else:
            with self._lock:
                vectors = self.encoder.encode(
                    texts,
                    batch_size=64,
                    normalize_embeddings=self.normalize,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                )
        return self._finish(vectors)

    def _encode_both(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled vectors (as `_pooled`) and unit token vectors (as `passage_tokens`) from one pass."""
        if self._direct is not None:
            vectors, tokens = self._direct.both(texts)
        else:
            with self._lock:
                # a list of texts gives one dict of outputs per text (sentence-transformers' overloads type a
                # list of strings as one "conversation" input: a single dict)
                out = cast(
                    "list[dict[str, Tensor]]",
                    self.encoder.encode(texts, batch_size=64, output_value=None, show_progress_bar=False),
                )
            tokens = [o["token_embeddings"][: int(o["attention_mask"].sum())].float().cpu().numpy() for o in out]
            if out:
                vectors = np.stack([o["sentence_embedding"].float().cpu().numpy() for o in out])
            else:
                vectors = np.zeros((0, self.dimension), dtype=np.float32)
        return self._finish(vectors), [unit_tokens(t) for t in tokens]

    def _finish(self, vectors: np.ndarray) -> np.ndarray:
        vectors = unit_rows(vectors) if self.normalize else vectors
        return np.ascontiguousarray(vectors, dtype=np.float32)
