"""Retrieval stages. Each is one small class or function with one obvious method:

- `BM25Searcher.search(query, k)` and `DenseSearcher.search(query, k)` → `list[Hit]`
- `fuse(rankings, ...)` → one fused `list[Hit]`
- `Reranker.rerank(query, hits)` → re-scored `list[Hit]`

The interfaces the stages declare (retriever, dense retriever, query encoder, docstore, token store, text
reranker) are typed protocols: `app.retrieval.protocols`.
"""

from app.retrieval.bm25 import BM25Searcher
from app.retrieval.dense import DenseSearcher
from app.retrieval.fusion import FusionConfig, fuse
from app.retrieval.types import Hit, StageScore

__all__ = ["BM25Searcher", "DenseSearcher", "FusionConfig", "Hit", "StageScore", "fuse"]
