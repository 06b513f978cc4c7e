"""Haystack's documented hybrid retrieval with a ranker, run by bench/peers.py in var/peers/venv-haystack.

Indexing: `SentenceTransformersDocumentEmbedder` (the MiniLM bi-encoder by local path) → `DocumentWriter` into an
`InMemoryDocumentStore` (BM25 is built by the store), written to the index folder with `save_to_disk`.
Query: `InMemoryBM25Retriever` and `SentenceTransformersTextEmbedder` → `InMemoryEmbeddingRetriever` (top
`first_depth` each) → `DocumentJoiner(join_mode="reciprocal_rank_fusion")`, then
`SentenceTransformersSimilarityRanker` (Sift's cross-encoder folder, in float32 as Sift runs it on a CPU) over the
fused top `rerank_depth`; the rest of
the fused list follows in fused order. At rerank depth 0 the pipeline stops at the joiner (its first stage).
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
from haystack import Document, Pipeline  # noqa: E402
from haystack.components.joiners import DocumentJoiner  # noqa: E402
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever, InMemoryEmbeddingRetriever  # noqa: E402
from haystack.components.writers import DocumentWriter  # noqa: E402
from haystack.document_stores.in_memory import InMemoryDocumentStore  # noqa: E402

try:  # Haystack 3: the sentence-transformers components live in their integration package
    from haystack_integrations.components.embedders.sentence_transformers import (  # type: ignore[import-not-found]
        SentenceTransformersDocumentEmbedder,
        SentenceTransformersTextEmbedder,
    )
    from haystack_integrations.components.rankers.sentence_transformers import (  # type: ignore[import-not-found]
        SentenceTransformersSimilarityRanker,
    )
except ImportError:  # Haystack 2.x
    from haystack.components.embedders import (  # type: ignore[no-redef]
        SentenceTransformersDocumentEmbedder,
        SentenceTransformersTextEmbedder,
    )
    from haystack.components.rankers import SentenceTransformersSimilarityRanker  # type: ignore[no-redef]


class Index:
    def __init__(self, query: Pipeline, ranker: Any, k: int) -> None:
        self.query, self.ranker, self.k = query, ranker, k


def build(documents: list[dict[str, Any]], job: dict[str, Any]) -> Index:
    store = InMemoryDocumentStore(bm25_algorithm="BM25Okapi")
    indexing = Pipeline()
    indexing.add_component("embedder", SentenceTransformersDocumentEmbedder(model=job["encoder"], progress_bar=False))
    indexing.add_component("writer", DocumentWriter(document_store=store))
    indexing.connect("embedder.documents", "writer.documents")
    docs = [Document(id=d["id"], content=f"{d['title']}\n{d['text']}".strip()) for d in documents]
    indexing.run({"embedder": {"documents": docs}})
    os.makedirs(job["index_dir"], exist_ok=True)
    store.save_to_disk(os.path.join(job["index_dir"], "store.json"))

    depth = int(job["first_depth"])
    query = Pipeline()
    query.add_component("text_embedder", SentenceTransformersTextEmbedder(model=job["encoder"], progress_bar=False))
    query.add_component("embedding_retriever", InMemoryEmbeddingRetriever(document_store=store, top_k=depth))
    query.add_component("bm25_retriever", InMemoryBM25Retriever(document_store=store, top_k=depth))
    query.add_component("joiner", DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=depth))
    query.connect("text_embedder.embedding", "embedding_retriever.query_embedding")
    query.connect("embedding_retriever", "joiner")
    query.connect("bm25_retriever", "joiner")
    query.warm_up()
    ranker = None
    depths = [int(depth) for depth in job["configs"].values() if int(depth) > 0]
    if depths:
        # float32 as Sift loads it on a CPU: the folder is stored in fp16, which the ranker would otherwise keep
        ranker = SentenceTransformersSimilarityRanker(
            model=job["reranker"], top_k=max(depths), model_kwargs={"dtype": torch.float32}
        )
        ranker.warm_up()
    return Index(query, ranker, int(job["k"]))


def search(index: Index, text: str, rerank_depth: int) -> harness.Hits:
    fused = index.query.run({"text_embedder": {"text": text}, "bm25_retriever": {"query": text}})["joiner"]["documents"]
    hits = [(d.id, float(d.score or 0.0)) for d in fused]
    if not rerank_depth or index.ranker is None:
        return hits[: index.k]
    ranked = index.ranker.run(query=text, documents=fused[:rerank_depth], top_k=rerank_depth)["documents"]
    return harness.rerank_head(hits, [(d.id, float(d.score or 0.0)) for d in ranked])[: index.k]


if __name__ == "__main__":
    harness.run(build, search)
