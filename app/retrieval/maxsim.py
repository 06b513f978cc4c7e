"""`MaxSimReranker`: a training-free second stage. Queries and candidate passages are encoded token by token
with the bi-encoder; a passage scores the mean over query tokens of the best cosine match among its tokens
(ColBERT-style late interaction). Same `score(pairs)` shape as the cross-encoder `Reranker`, so it plugs
into the micro-batcher and the interpolation setting unchanged.

Configure with `reranker.model: maxsim` (the all-MiniLM-L6-v2 bi-encoder) or `maxsim:<model id or path>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from app.retrieval.protocols import DenseRetriever, TextReranker, TokenStoreReader
from app.retrieval.reranker import truncate_texts
from indexer.config import DEFAULT_ENCODER
from indexer.encoders import load_encoder, model_lock

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PREFIX = "maxsim"


class MaxSimReranker(TextReranker):
    name = "rerank"

    def __init__(self, encoder: SentenceTransformer, batch_size: int = 32) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self._lock = model_lock(encoder)  # the bi-encoder may also serve dense search

    @property
    def tokenizer(self) -> Any:  # a Hugging Face tokenizer
        return self.encoder.tokenizer

    @staticmethod
    def model_name(spec: str) -> str:
        """The bi-encoder a `maxsim[:model]` spec names."""
        return spec.split(":", 1)[1] if ":" in spec else DEFAULT_ENCODER

    @classmethod
    def load(
        cls,
        spec: str,
        max_length: int = 256,
        device: str | None = None,
        batch_size: int = 32,
        encoder: SentenceTransformer | None = None,
    ) -> MaxSimReranker:
        """Load the spec's bi-encoder, or reuse `encoder` (the dense searcher's, when it is the same model;
        it is then left as configured rather than re-truncated to `max_length`)."""
        if encoder is None:
            encoder = load_encoder(cls.model_name(spec), device)
            encoder.max_seq_length = min(max_length, encoder.max_seq_length or max_length)
        return cls(encoder, batch_size)

    @property
    def runtime(self) -> str:
        """The runtime of the bi-encoder it scores with (see `indexer.runtime`)."""
        return getattr(self.encoder, "sift_runtime", "torch")

    @property
    def max_length(self) -> int:
        return int(self.encoder.max_seq_length or 512)

    def prepare(self, query: str, texts: list[str], max_tokens_per_doc: int | None) -> tuple[list[str], list[int], int]:
        """Texts to score against `query` (`/v1/rerank`), each cut to `max_tokens_per_doc` tokens; returns (texts,
        indices cut here or by `max_length`, tokens billed: the query's and each text's, each capped at
        `max_length`, as MaxSim encodes them apart). Under the encoder's lock: its tokenizer is not thread-safe."""
        with self._lock:
            texts, cut = truncate_texts(self.tokenizer, texts, max_tokens_per_doc)
            counts = [len(ids) for ids in self.tokenizer([query, *texts])["input_ids"]]
        limit = self.max_length
        truncated = cut | {i for i, n in enumerate(counts[1:]) if n > limit}
        return texts, sorted(truncated), int(sum(min(n, limit) for n in counts))

    def _tokens(self, texts: list[str]) -> list[np.ndarray]:
        out = self.encoder.encode(
            texts, batch_size=self.batch_size, output_value="token_embeddings", show_progress_bar=False
        )
        vectors = []
        for t in out:
            v = t.float().cpu().numpy()
            vectors.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
        return vectors

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        queries = list(dict.fromkeys(q for q, _ in pairs))
        passages = list(dict.fromkeys(p for _, p in pairs))
        with self._lock:
            q_vectors = dict(zip(queries, self._tokens(queries)))
            p_vectors = dict(zip(passages, self._tokens(passages)))
        return np.array([float((q_vectors[q] @ p_vectors[p].T).max(axis=1).mean()) for q, p in pairs], dtype=np.float32)


def is_maxsim(spec: str | None) -> bool:
    return spec is not None and (spec == PREFIX or spec.startswith(PREFIX + ":"))


class LateInteraction:
    """MaxSim as one stage of the combined second stage, over one bundle: passages' token vectors come from
    the bundle's token store (`indexer.tokens`, a dot product per candidate) or, for a bundle built without
    one, from re-encoding the candidates (an encoder pass per candidate: slow). Queries' token vectors come
    from the bundle's own bi-encoder (`DenseSearcher.query_tokens`: the forward pass that encoded the query
    for dense retrieval, read back from the query cache), so both sides use the model the passages were
    encoded with. Holds no per-request state."""

    def __init__(self, dense: DenseRetriever, store: TokenStoreReader | None = None) -> None:
        self.dense = dense
        self.store = store

    @property
    def stored(self) -> bool:
        return self.store is not None

    def score(self, query: str, rows: list[int], texts: list[str]) -> np.ndarray:
        """MaxSim of `query` against the passages `rows` (whose index texts are `texts`, used only when
        the bundle stores no token vectors)."""
        return self.score_many([query], [rows], [texts])[0]

    def score_many(self, queries: list[str], heads: list[list[int]], texts: list[list[str]]) -> list[np.ndarray]:
        """`score` for many queries, their token vectors encoded in one call."""
        out = [np.zeros(0, dtype=np.float32) for _ in queries]
        todo = [i for i, rows in enumerate(heads) if rows]
        encoded = self.dense.query_tokens([queries[i] for i in todo]) if todo else []
        for i, q in zip(todo, encoded):
            if self.store is not None:
                out[i] = self.store.maxsim(q, heads[i])
            else:
                passages = self.dense.token_vectors(texts[i])
                out[i] = np.array([float((q @ p.T).max(axis=1).mean()) for p in passages], dtype=np.float32)
        return out

    def prepare_texts(
        self, query: str, texts: list[str], rows: list[int | None], max_tokens_per_doc: int | None
    ) -> tuple[list[str], list[int], int, list[int | None] | None]:
        """MaxSim alone as `/v1/rerank`'s reranker: cut texts to `max_tokens_per_doc` bi-encoder tokens (under
        the encoder's lock: its tokenizer is not thread-safe); returns (texts, indices cut here or by the
        encoder's max length, tokens of the query and the documents, the stored rows to score by). A text
        sent by passage id and not cut is scored from the stored token vectors, as `/v1/search` scores it."""
        encoder = self.dense.encoder
        limit = int(encoder.max_seq_length)
        with model_lock(encoder):
            tokenizer = encoder.tokenizer
            texts, cut = truncate_texts(tokenizer, texts, max_tokens_per_doc)
            counts = [len(ids) for ids in tokenizer([query, *texts])["input_ids"]]
        truncated = cut | {i for i, n in enumerate(counts[1:]) if n > limit}
        tokens = int(sum(min(n, limit) for n in counts))
        stored = [r if i not in cut else None for i, r in enumerate(rows)] if self.store is not None else None
        return texts, sorted(truncated), tokens, stored

    def score_texts(self, query: str, texts: list[str], rows: list[int | None] | None) -> np.ndarray:
        """MaxSim of `query` against each text: from the stored token vectors of `rows[i]` when given, else by
        encoding the text (the mean over query tokens of the best cosine among the text's tokens)."""
        q = self.dense.query_tokens([query])[0]
        out = np.zeros(len(texts), dtype=np.float32)
        stored = {i: row for i, row in enumerate(rows or []) if row is not None}
        by_row = sorted(stored)
        if by_row and self.store is not None:
            out[by_row] = self.store.maxsim(q, [stored[i] for i in by_row])
        encode = sorted(set(range(len(texts))) - set(by_row))
        if encode:
            vectors = self.dense.token_vectors([texts[i] for i in encode])
            out[encode] = [float((q @ p.T).max(axis=1).mean()) for p in vectors]
        return out
