"""The stage interfaces: what the pipeline, the engine, MaxSim, the answerer and the shard fan-out call on each
stage, typed. Every implementation, local, sharded or remote, declares the one it implements by subclassing it
(`class DenseSearcher(DenseRetriever)`), so the type checker (`make lint`: mypy, strict on these modules) checks
each against its protocol and refuses to construct one that lacks a member; the protocols are also
`runtime_checkable` (tests/test_protocols.py checks every class at run time too).

    Retriever         name, search_many                    BM25Searcher, DenseSearcher, ShardedSearcher,
                                                           ShardedDenseSearcher, serving_ray.RemoteRetriever
    VectorIndex       search_vectors (a shard's dense      DenseSearcher, ShardedDenseSearcher,
                      index, searched by vectors)          serving_ray.RemoteVectorIndex
    DenseRetriever    Retriever + VectorIndex + encoder,   DenseSearcher, ShardedDenseSearcher
                      encode, query_tokens, token_vectors,
                      embed
    BiEncoder         encoder, runtime, dimension, encode, QueryEncoder
                      query_tokens, passage_tokens, embed
                      (one forward pass: pooled + tokens)
    DocstoreReader    passages, passages_by_id, document,  indexer.docstore.Docstore, ShardedDocstore,
                      passage_rows, passage_texts,         serving_ray.RemoteShard
                      filter_mask, unavailable, close
    TokenStoreReader  maxsim                               indexer.tokens.TokenStore, ShardedTokenStore,
                                                           serving_ray.RemoteShard
    TextReranker      name, runtime, max_length,           Reranker (cross-encoder), MaxSimReranker
                      tokenizer, prepare, score

`DocstoreReader` and `TokenStoreReader` are defined beside their local implementations in `indexer/` (which
never imports `app/`) and re-exported here.

Rows: every retriever, docstore and token store answers in the rows of the build it serves (`Hit.idx`, the
docstore's `idx`); a shard answers in its own rows and the fan-out (`app.retrieval.shards`) adds its offset.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from app.retrieval.types import Hit
from indexer.docstore import DocstoreReader
from indexer.tokens import TokenStoreReader

__all__ = [
    "BiEncoder",
    "DenseRetriever",
    "DocstoreReader",
    "Retriever",
    "TextReranker",
    "TokenStoreReader",
    "VectorIndex",
]


@runtime_checkable
class Retriever(Protocol):
    """A first-stage retriever: the `k` best passages of each query, best first, only among the rows where
    `mask` > 0 when a mask is given (one value per row). `name` is its stage (`bm25`, `dense`): the search
    modes name retrievers by it and every hit records it."""

    name: str

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]: ...


@runtime_checkable
class VectorIndex(Protocol):
    """Nearest passages of query vectors already encoded (what a dense shard answers: the ingress encodes
    each query once and only vectors travel)."""

    def search_vectors(self, vectors: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[list[Hit]]: ...


@runtime_checkable
class BiEncoder(Protocol):
    """The query side of a bi-encoder on the serving path (`app.retrieval.queries.QueryEncoder`): one forward
    pass gives a query's pooled vector and its token vectors (see that module's invariants)."""

    @property
    def encoder(self) -> Any:  # the sentence-transformers model (tokenizer, max length), or a test's stand-in
        ...

    @property
    def runtime(self) -> str:
        """What runs the model (`indexer.runtime`: torch, onnx, …)."""
        ...

    @property
    def dimension(self) -> int: ...

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors (rows in order), normalised as the passages were."""
        ...

    def query_tokens(self, queries: list[str]) -> list[np.ndarray]:
        """Each query's unit token vectors (MaxSim's query side), from the pass `encode` ran when cached."""
        ...

    def passage_tokens(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's unit token vectors, as a bundle's token store holds passages'."""
        ...

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors of arbitrary texts (as `encode`, never cached) and their token count."""
        ...


@runtime_checkable
class DenseRetriever(Retriever, VectorIndex, Protocol):
    """Dense retrieval with its query encoder: what the pipeline (traced as encode + search), MaxSim (query
    and candidate token vectors) and the engine (`/v1/embeddings`) call on the `dense` retriever."""

    @property
    def encoder(self) -> Any:  # the sentence-transformers model behind the query encoder (None: vectors only)
        ...

    @property
    def runtime(self) -> str:
        """What runs the query encoder (`GET /v1/info`)."""
        ...

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors, normalised as the passages were."""
        ...

    def query_tokens(self, queries: list[str]) -> list[np.ndarray]:
        """Queries' unit token vectors, read back from the pass that encoded them when MaxSim is on."""
        ...

    def token_vectors(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's unit token vectors (re-encoded MaxSim candidates)."""
        ...

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for arbitrary texts and their token count (`/v1/embeddings`)."""
        ...


@runtime_checkable
class TextReranker(Protocol):
    """A second-stage model scoring (query, passage text) pairs, behind the micro-batcher: the cross-encoder
    (`Reranker`) or MaxSim re-encoding both sides (`MaxSimReranker`)."""

    name: str

    @property
    def runtime(self) -> str: ...

    @property
    def max_length(self) -> int:
        """Tokens the model reads of a pair (longer input is truncated)."""
        ...

    @property
    def tokenizer(self) -> Any:  # a Hugging Face tokenizer (not thread-safe: used under the model's lock)
        ...

    def prepare(self, query: str, texts: list[str], max_tokens_per_doc: int | None) -> tuple[list[str], list[int], int]:
        """Texts to score against `query` (`/v1/rerank`), each cut to `max_tokens_per_doc` tokens: (texts,
        indices cut here or by `max_length`, tokens billed)."""
        ...

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """One float32 relevance score per pair, in order (synchronous: the micro-batcher's thread calls it)."""
        ...
