"""`DenseSearcher`: dual-encoder retrieval over a bundle's FAISS index, encoding queries exactly as the
passages were encoded (same model and normalisation, read from the manifest)."""

from __future__ import annotations

import faiss
import numpy as np

from app.retrieval.cache import QueryCache
from app.retrieval.types import Hit, ranked
from indexer.bundle import DENSE_DIR, BundleError, BundleInfo
from indexer.config import DenseSettings
from indexer.dense import load_index
from indexer.encoders import load_encoder, model_lock, unit_rows
from indexer.runtime import DirectEncoder
from indexer.tokens import unit_tokens


class DenseSearcher:
    """Inner-product search of encoded queries against passage vectors. Thread-safe."""

    name = "dense"

    def __init__(
        self,
        encoder,  # noqa: ANN001
        index: faiss.Index,
        settings: DenseSettings,
        passage_ids: list[str],
        doc_ids: list[str],
        cache: QueryCache | None = None,
    ) -> None:
        self.encoder = encoder
        self.cache = cache
        self._cache_key = (settings.model, getattr(encoder, "sift_runtime", "torch"), settings.normalize)
        self.index = index
        self.settings = settings
        self.passage_ids = passage_ids
        self.doc_ids = doc_ids
        # shared with every stage using this encoder (e.g. MaxSim); no encoder: a shard that only searches vectors
        self._encode_lock = model_lock(encoder) if encoder is not None else None
        self._threads = faiss.omp_get_max_threads()
        self._direct = DirectEncoder.of(encoder) if encoder is not None else None  # ONNX: lock-free numpy path

    @classmethod
    def from_bundle(
        cls,
        bundle: BundleInfo,
        passage_ids: list[str],
        doc_ids: list[str],
        device: str | None = None,
        encoder=None,  # noqa: ANN001
        cache: QueryCache | None = None,
    ) -> DenseSearcher:
        info = bundle.manifest.get("dense") or {}
        if not info.get("enabled"):
            raise BundleError(f"{bundle.root}: built without a dense index; rebuild with index.dense.enabled=true")
        settings = DenseSettings(**bundle.manifest["config"]["dense"])
        encoder = encoder or load_encoder(info["model"], device)
        dim = (
            encoder.get_embedding_dimension()
            if hasattr(encoder, "get_embedding_dimension")
            else encoder.get_sentence_embedding_dimension()
        )
        if dim != info["dimension"]:
            raise BundleError(
                f"query encoder {info['model']} gives {dim}-d vectors but the bundle holds {info['dimension']}-d ones"
            )
        return cls(encoder, load_index(bundle.path(DENSE_DIR), settings), settings, passage_ids, doc_ids, cache)

    @classmethod
    def vectors_only(cls, bundle: BundleInfo, passage_ids: list[str], doc_ids: list[str]) -> DenseSearcher:
        """A shard's FAISS index without a query encoder: queries arrive as vectors (`search_vectors`)."""
        settings = DenseSettings(**bundle.manifest["config"]["dense"])
        return cls(None, load_index(bundle.path(DENSE_DIR), settings), settings, passage_ids, doc_ids)

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors, normalised as the passages were (from the query cache when one is set)."""
        if self.cache is not None:
            return self.cache.encode(self._cache_key, queries, self._encode)
        return self._encode(queries)

    def _encode(self, queries: list[str]) -> np.ndarray:
        if self._direct is not None:
            vectors = self._direct.encode(queries)
        else:
            with self._encode_lock:
                vectors = self.encoder.encode(
                    queries,
                    batch_size=64,
                    normalize_embeddings=self.settings.normalize,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                )
        vectors = unit_rows(vectors) if self.settings.normalize else vectors
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def token_vectors(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's unit-normalised token vectors from this searcher's encoder (what a bundle's token store
        holds for passages; see `indexer.tokens`)."""
        if self._direct is not None:
            tokens = self._direct.tokens(texts)
        else:
            with self._encode_lock:
                out = self.encoder.encode(
                    texts, batch_size=32, output_value="token_embeddings", show_progress_bar=False
                )
            tokens = [t.float().cpu().numpy() for t in out]
        return [unit_tokens(t) for t in tokens]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for arbitrary texts (as `encode`) and their token count. The tokenizer is not thread-safe,
        so counting happens under the same lock as encoding."""
        with self._encode_lock:
            tokens = sum(len(ids) for ids in self.encoder.tokenizer(texts)["input_ids"])
        return self._encode(texts), int(tokens)

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> list[Hit]:
        return self.search_many([query], k, mask)[0]

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        """The k nearest passages for each query (restricted to `mask` when given)."""
        if not queries:
            return []
        return self.search_vectors(self.encode(queries), k, mask)

    def search_vectors(self, vectors: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
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
        if self.settings.index_type == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.settings.hnsw_ef_search)
        if self.settings.index_type == "ivfpq":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.settings.ivf_nprobe)
        return faiss.SearchParameters(sel=selector)
