"""txtai's hybrid index with a cross-encoder over the top, run by bench/peers.py in var/peers/venv-txtai.

Indexing: `Embeddings(path=<bi-encoder>, hybrid=True, content=True, backend="numpy")`: txtai's hybrid index
(its BM25 scoring beside the dense vectors; exact search with the numpy backend, as Sift's flat FAISS index),
saved to the index folder. Query: `embeddings.search(text, first_depth)`, then txtai's
`Similarity(path=<cross-encoder>, crossencode=True)` pipeline (what its `Reranker` pipeline runs) over the top
`rerank_depth`, each passage cut to fit the cross-encoder's input (`clip`); the rest follows in hybrid order. At rerank depth 0: the hybrid search alone.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
from txtai import Embeddings  # noqa: E402
from txtai.pipeline import Similarity  # noqa: E402


class Index:
    def __init__(self, embeddings: Embeddings, similarity: Any, first_depth: int, k: int) -> None:
        self.embeddings, self.similarity, self.first_depth, self.k = embeddings, similarity, first_depth, k
        # one search at a time, as txtai's own `Application` runs them (`with self.lock`): an Embeddings
        # instance with content shares one SQLite cursor ("Recursive use of cursors not allowed" otherwise)
        self.lock = threading.Lock()


def build(documents: list[dict[str, Any]], job: dict[str, Any]) -> Index:
    embeddings = Embeddings(path=job["encoder"], hybrid=True, content=True, backend="numpy")
    embeddings.index((d["id"], f"{d['title']}\n{d['text']}".strip(), None) for d in documents)
    embeddings.save(job["index_dir"])
    similarity = None
    if any(int(depth) > 0 for depth in job["configs"].values()):
        # float32 as Sift loads it on a CPU (the folder is stored in fp16)
        similarity = Similarity(path=job["reranker"], crossencode=True, dtype=torch.float32)
    return Index(embeddings, similarity, int(job["first_depth"]), int(job["k"]))


def clip(similarity: Any, query: str, passage: str) -> str:
    """The passage cut to what fits beside the query in the cross-encoder's input (its tokenizer's
    `model_max_length`): txtai hands (query, passage) pairs to the model untruncated, and a longer pair fails
    ("The size of tensor a (627) must match the size of tensor b (512)"), as SciFact's longer abstracts do.
    Sift's own reranker truncates each pair at the same length."""
    tokenizer = similarity.crossencoder.pipeline.tokenizer
    room = tokenizer.model_max_length - len(tokenizer.tokenize(query)) - 3  # [CLS] query [SEP] passage [SEP]
    encoded = tokenizer(passage, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    return passage if len(offsets) <= room else passage[: offsets[max(room, 1) - 1][1]]


def search(index: Index, text: str, rerank_depth: int) -> harness.Hits:
    with index.lock:
        found = index.embeddings.search(text, index.first_depth)
    hits = [(str(r["id"]), float(r["score"])) for r in found]
    if not rerank_depth or index.similarity is None:
        return hits[: index.k]
    head = found[:rerank_depth]
    scored = index.similarity(text, [clip(index.similarity, text, r["text"]) for r in head])  # [(position, score)]
    return harness.rerank_head(hits, [(str(head[i]["id"]), float(s)) for i, s in scored])[: index.k]


if __name__ == "__main__":
    harness.run(build, search)
