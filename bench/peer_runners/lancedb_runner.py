"""LanceDB's hybrid search (native full-text + vector, RRF) with its cross-encoder reranker, run by
bench/peers.py in var/peers/venv-lancedb.

Indexing: a table in the index folder whose `vector` column the embedding registry's "sentence-transformers"
function (the MiniLM bi-encoder by local path) fills from `text`, then `create_fts_index("text")` (LanceDB's
native full-text index); the vectors are searched flat (no ANN index: exact, as Sift's flat FAISS index).
Query: `table.search(text, query_type="hybrid").rerank(RRFReranker()).limit(first_depth)` (the top
`first_depth` of each retriever fused by RRF), then `CrossEncoderReranker` (Sift's cross-encoder folder) over the
fused top `rerank_depth`; the rest follows in fused order. At rerank depth 0: the RRF hybrid search alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import lancedb  # noqa: E402
import torch  # noqa: E402
from lancedb.embeddings import get_registry  # noqa: E402
from lancedb.pydantic import LanceModel, Vector  # noqa: E402
from lancedb.rerankers import CrossEncoderReranker, RRFReranker  # noqa: E402


class Index:
    def __init__(self, table: Any, reranker: Any, first_depth: int, k: int) -> None:
        self.table, self.reranker, self.first_depth, self.k = table, reranker, first_depth, k
        self.fusion = RRFReranker()


def build(documents: list[dict[str, Any]], job: dict[str, Any]) -> Index:
    embedder = get_registry().get("sentence-transformers").create(name=job["encoder"], device="cpu")

    class Passage(LanceModel):  # the schema LanceDB's docs declare: the source field and its vector field
        doc_id: str
        text: str = embedder.SourceField()
        vector: Vector(embedder.ndims()) = embedder.VectorField()  # type: ignore[valid-type]

    db = lancedb.connect(job["index_dir"])
    table = db.create_table("documents", schema=Passage, mode="overwrite")
    table.add([{"doc_id": d["id"], "text": f"{d['title']}\n{d['text']}".strip()} for d in documents])
    table.create_fts_index("text", replace=True)
    reranker = None
    if any(int(depth) > 0 for depth in job["configs"].values()):
        # float32 as Sift loads it on a CPU (the folder is stored in fp16): kwargs go to sentence-transformers
        reranker = CrossEncoderReranker(model_name=job["reranker"], device="cpu", model_kwargs={"dtype": torch.float32})
    return Index(table, reranker, int(job["first_depth"]), int(job["k"]))


def search(index: Index, text: str, rerank_depth: int) -> harness.Hits:
    fused = (
        index.table.search(text, query_type="hybrid")
        .rerank(index.fusion)
        .limit(index.first_depth)
        .select(["doc_id", "text"])
        .to_arrow()
    )
    ids, scores = fused["doc_id"].to_pylist(), fused["_relevance_score"].to_pylist()
    hits = list(zip(ids, (float(s) for s in scores), strict=True))
    if not rerank_depth or index.reranker is None:
        return hits[: index.k]
    head = fused.slice(0, rerank_depth).rename_columns(
        ["_score" if name == "_relevance_score" else name for name in fused.column_names]
    )
    ranked = index.reranker.rerank_fts(text, head)  # scores `text` against the query, sorted, RRF score dropped
    rescored = list(
        zip(ranked["doc_id"].to_pylist(), (float(s) for s in ranked["_relevance_score"].to_pylist()), strict=True)
    )
    return harness.rerank_head(hits, rescored)[: index.k]


if __name__ == "__main__":
    harness.run(build, search)
