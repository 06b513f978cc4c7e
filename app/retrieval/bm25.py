"""`BM25Searcher`: sparse retrieval over a bundle's bm25s index."""

from __future__ import annotations

import numpy as np

from app.retrieval.protocols import Retriever
from app.retrieval.types import Hit, ranked
from indexer.bm25 import BM25Index, top_k
from indexer.bundle import BM25_DIR, BundleInfo
from indexer.config import BM25Settings


class BM25Searcher(Retriever):
    """BM25 (bm25s, Lucene variant by default) over the passages of one bundle. Read-only, thread-safe."""

    name = "bm25"

    def __init__(self, index: BM25Index, passage_ids: list[str], doc_ids: list[str]) -> None:
        self.index = index
        self.passage_ids = passage_ids
        self.doc_ids = doc_ids

    @classmethod
    def from_bundle(cls, bundle: BundleInfo, passage_ids: list[str], doc_ids: list[str]) -> BM25Searcher:
        settings = BM25Settings(**bundle.manifest["config"]["bm25"])
        return cls(BM25Index.load(bundle.path(BM25_DIR), settings), passage_ids, doc_ids)

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> list[Hit]:
        """The k best passages for `query` (only where `mask` is non-zero, when given)."""
        scores = self.index.scores(query, mask)
        best = top_k(scores, k, mask)
        return ranked(self.name, [(i, self.passage_ids[i], self.doc_ids[i], s) for i, s in best])

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        return [self.search(q, k, mask) for q in queries]
