"""`DenseSearcher`: dual-encoder retrieval over a bundle's FAISS index, encoding queries exactly as the
passages were encoded (same model and normalisation, read from the manifest)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from app.retrieval.cache import QueryCache
from app.retrieval.protocols import BiEncoder, DenseRetriever
from app.retrieval.queries import QueryEncoder
from app.retrieval.types import Hit, ranked
from indexer.bundle import DENSE_DIR, BundleError, BundleInfo
from indexer.config import DenseSettings
from indexer.dense import load_index
from indexer.encoders import load_encoder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class DenseSearcher(DenseRetriever):
    """Inner-product search of encoded queries against passage vectors. Thread-safe. Queries are encoded by
    its query encoder (`QueryEncoder`; None: a shard that only searches vectors)."""

    name = "dense"

    def __init__(
        self,
        queries: BiEncoder | None,
        index: faiss.Index | None,
        settings: DenseSettings,
        passage_ids: list[str],
        doc_ids: list[str],
    ) -> None:
        self.queries = queries
        self.index = index
        self.settings = settings
        self.passage_ids = passage_ids
        self.doc_ids = doc_ids
        self._threads = faiss.omp_get_max_threads()

    @property
    def encoder(self) -> Any:  # the SentenceTransformer behind the query encoder (None: vectors only)
        return self.queries.encoder if self.queries is not None else None

    @property
    def runtime(self) -> str:
        return self.queries.runtime if self.queries is not None else "torch"

    @classmethod
    def from_bundle(
        cls,
        bundle: BundleInfo,
        passage_ids: list[str],
        doc_ids: list[str],
        device: str | None = None,
        encoder: SentenceTransformer | None = None,
        cache: QueryCache | None = None,
        query_tokens: bool = False,
    ) -> DenseSearcher:
        """The bundle's FAISS index and a query encoder of the bundle's model (`encoder` when given).
        `query_tokens`: the second stage runs MaxSim, so queries' token vectors come from the same pass."""
        info = bundle.manifest.get("dense") or {}
        if not info.get("enabled"):
            raise BundleError(f"{bundle.root}: built without a dense index; rebuild with index.dense.enabled=true")
        settings = DenseSettings(**bundle.manifest["config"]["dense"])
        queries = query_encoder(bundle, encoder or load_encoder(info["model"], device), cache, query_tokens)
        return cls(queries, load_index(bundle.path(DENSE_DIR), settings), settings, passage_ids, doc_ids)

    @classmethod
    def vectors_only(cls, bundle: BundleInfo, passage_ids: list[str], doc_ids: list[str]) -> DenseSearcher:
        """A shard's FAISS index without a query encoder: queries arrive as vectors (`search_vectors`)."""
        settings = DenseSettings(**bundle.manifest["config"]["dense"])
        return cls(None, load_index(bundle.path(DENSE_DIR), settings), settings, passage_ids, doc_ids)

    def _encoder(self) -> BiEncoder:
        if self.queries is None:
            raise TypeError("this dense searcher has no query encoder (a shard searched by vectors)")
        return self.queries

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors, normalised as the passages were (see `QueryEncoder.encode`)."""
        return self._encoder().encode(queries)

    def query_tokens(self, queries: list[str]) -> list[np.ndarray]:
        """Queries' unit token vectors, from the pass that encoded them when MaxSim is on."""
        return self._encoder().query_tokens(queries)

    def token_vectors(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's unit-normalised token vectors from this searcher's encoder (what a bundle's token store
        holds for passages; see `indexer.tokens`)."""
        return self._encoder().passage_tokens(texts)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for arbitrary texts (as `encode`) and their token count."""
        return self._encoder().embed(texts)

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> list[Hit]:
        return self.search_many([query], k, mask)[0]

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        """The k nearest passages for each query (restricted to `mask` when given)."""
        if not queries:
            return []
        return self.search_vectors(self.encode(queries), k, mask)

    def search_vectors(self, vectors: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        if self.index is None:
            raise TypeError("this dense searcher holds no index (a query encoder only)")
        k = min(k, self.index.ntotal)
        params = None
        if mask is not None:
            allowed = np.flatnonzero(mask > 0).astype(np.int64)
            if allowed.size == 0:
                return [[] for _ in range(len(vectors))]
            params = self._params(faiss.IDSelectorBatch(allowed))
        # a few queries: one thread (OpenMP's barrier costs more than it saves, and contends with the encoder's
        # threads); the setting is per calling thread, so a batch on another thread keeps every core
        faiss.omp_set_num_threads(1 if len(vectors) < 8 else self._threads)
        scores, ids = self.index.search(vectors, k, params=params) if params else self.index.search(vectors, k)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            scored = [
                (int(i), self.passage_ids[i], self.doc_ids[i], float(s)) for s, i in zip(row_scores, row_ids) if i >= 0
            ]
            results.append(ranked(self.name, scored))
        return results

    def _params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        # faiss's own stub (faiss/__init__.pyi) lacks SearchParametersHNSW and types the parameter classes'
        # constructors without the keyword arguments its Python wrapper takes (handle_SearchParameters)
        params: faiss.SearchParameters
        s = self.settings
        if s.index_type == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=s.hnsw_ef_search)  # type: ignore[attr-defined]
        elif s.index_type == "ivfpq":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=s.ivf_nprobe)  # type: ignore[call-arg]
        else:
            params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        return params


def query_encoder(
    bundle: BundleInfo,
    encoder: SentenceTransformer,
    cache: QueryCache | None = None,
    tokens: bool = False,
) -> QueryEncoder:
    """A query encoder for `bundle`'s dense index: `encoder` must give vectors of the bundle's dimension
    (normalised as the bundle's passages were)."""
    info = bundle.manifest.get("dense") or {}
    settings = DenseSettings(**bundle.manifest["config"]["dense"])
    queries = QueryEncoder(encoder, settings.model, settings.normalize, cache, tokens)
    if queries.dimension != info["dimension"]:
        raise BundleError(
            f"query encoder {info['model']} gives {queries.dimension}-d vectors but the bundle holds "
            f"{info['dimension']}-d ones"
        )
    return queries
